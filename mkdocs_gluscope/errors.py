"""The one exception type a user sees as a single ``gluscope: error: ...`` line."""


class GluscopeError(Exception):
    """Bad input or an unusable environment; the message says what was wrong and what would do."""
