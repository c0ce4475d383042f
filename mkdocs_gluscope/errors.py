"""The one exception type a user sees as a single ``gluscope: error: ...`` line, and how any text
from a file is printed: one line, nothing a terminal acts on."""


class GluscopeError(Exception):
    """Bad input or an unusable environment; the message says what was wrong and what would do."""


def printable(text: object) -> str:
    """``text`` with every character that is not printable (newlines, terminal escape sequences,
    bidirectional overrides, other control and format characters) written as ``repr`` writes it
    (``\\n``, ``\\x1b``, ``\\u202e``), and every other character, non-ASCII included, as it is: safe to
    print to a terminal or a log, and always one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
