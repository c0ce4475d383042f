"""Words as readers and search know them: one definition for the pages (Python) and queries (``gluscope.js``).

Tokenizers cut words into pieces (``"Appl" + "ause"``); a page names the whole word around an
example's peak token, search finds neurons by it, and a layer table filters by it. The rules:

* **key** (:func:`word_key`): Unicode NFC, lowercased, NFC again, then the characters of
  :data:`TRIM` removed from both ends. Code points, not UTF-16 units, and an explicit trim set
  (Python's ``strip()`` and JavaScript's ``trim()`` disagree on U+FEFF and U+001C..U+001F), so a
  decomposed ``é`` in the corpus and a composed one typed in a query are one word.
* **whole word** (:func:`word_around`): neighbouring pieces join while letters or digits meet across
  the boundary and the later piece starts without a space, except between two characters of a script
  written without spaces (:data:`UNSPACED`: Han, kana, Thai, ...), where a word has no visible end.
* **terms** (:func:`index_terms`, :func:`query_terms`): what the search index stores. A key without
  unspaced characters is one term: for an example, the key of its word *up to its peak piece*, what
  the model had read there (a neuron that fires on "App" of "Applause" is found by "app", one that
  fires on its "ause" by "applause"). Runs of unspaced characters become character bigrams (a lone
  character is its own term), the way search engines index Chinese and Japanese without a
  dictionary; the index keeps the bigrams from two characters before the peak token to two after it,
  and the peak token's characters alone. Measured against jieba's dictionary segmentation (Material's
  search for Chinese) in ``bench/cjk_terms.py``.
* **shards** (:func:`shard_of`): the index is split into files of about the same size, each a range
  of terms in code-point order; the manifest lists each shard's first term, and a term belongs to
  the last shard whose first term is not after it.

``assets/gluscope/rules.js`` implements the same functions; the constants reach it from
:func:`js_constants` (written into the site as ``words-data.js``), and ``tests/test_words.py`` runs
both on the same 1,000 strings.
"""

from __future__ import annotations

import bisect
import json
import unicodedata
from typing import Sequence

#: Trimmed from both ends of a key: Unicode's White_Space characters and the zero-width ones that
#: tokenizers and editors leave in text (U+200B, U+2060, U+FEFF).
TRIM = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000\u200b\u2060\ufeff"
    + "".join(chr(c) for c in range(0x2000, 0x200B)))
#: Scripts written without spaces between words, as code point ranges (inclusive): CJK ideographs
#: (with extensions and compatibility forms), kana, Thai, Lao, Khmer, Myanmar, Tibetan.
UNSPACED: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0EFF),    # Thai, Lao
    (0x0F00, 0x0FFF),    # Tibetan
    (0x1000, 0x109F),    # Myanmar
    (0x1780, 0x17FF),    # Khmer
    (0x2E80, 0x2FDF),    # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),    # 々 〆 〇
    (0x3021, 0x3029),    # Hangzhou numerals
    (0x3031, 0x3035),    # kana repeat marks
    (0x3040, 0x30FF),    # Hiragana, Katakana
    (0x31F0, 0x31FF),    # Katakana phonetic extensions
    (0x3400, 0x4DBF),    # CJK extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFF66, 0xFF9F),    # halfwidth Katakana
    (0x1B000, 0x1B16F),  # kana supplement and extensions
    (0x20000, 0x3134F),  # CJK extensions B..G, compatibility supplement
)
_UNSPACED_STARTS = [lo for lo, _ in UNSPACED]
#: Pieces joined on each side of the peak token into a whole word (a long compound stays readable).
WORD_LIMIT = 8


def unspaced(ch: str) -> bool:
    """Whether ``ch`` (one code point) belongs to a script written without spaces."""
    c = ord(ch)
    i = bisect.bisect_right(_UNSPACED_STARTS, c) - 1
    return i >= 0 and c <= UNSPACED[i][1]


def word_key(text: str) -> str:
    """How search and the layer tables know ``text``: NFC, lowercase, NFC, :data:`TRIM` off both ends."""
    key = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    start, stop = 0, len(key)
    while start < stop and key[start] in TRIM:
        start += 1
    while stop > start and key[stop - 1] in TRIM:
        stop -= 1
    return key[start:stop]


def _joins(left: str | None, right: str | None) -> bool:
    if not left or not right:
        return False
    a, b = left[-1], right[0]
    return a.isalnum() and b.isalnum() and not (unspaced(a) and unspaced(b))


def word_around(tokens: Sequence[str | None], centre: int, limit: int = WORD_LIMIT) -> tuple[str, str, str]:
    """The whole word that the token at ``centre`` is a piece of, as display strings ``(before, peak,
    after)``: neighbours join while letters or digits meet across the piece boundary and the later
    piece starts without a space (``"Appl" + "ause"``), but not between two characters of a script
    written without spaces. ``tokens`` are the window's display strings (None outside the document)."""
    start = stop = centre
    while start > 0 and centre - start < limit and _joins(tokens[start - 1], tokens[start]):
        start -= 1
    while stop + 1 < len(tokens) and stop - centre < limit and _joins(tokens[stop], tokens[stop + 1]):
        stop += 1
    return "".join(tokens[start:centre]), tokens[centre] or "", "".join(tokens[centre + 1:stop + 1])  # type: ignore[arg-type]


def _runs(key: str) -> list[tuple[bool, str]]:
    """``key`` cut into maximal runs of unspaced and other characters: ``[(unspaced, text), ...]``."""
    runs: list[tuple[bool, str]] = []
    for ch in key:
        kind = unspaced(ch)
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + ch)
        else:
            runs.append((kind, ch))
    return runs


def _bigrams(run: str) -> list[str]:
    return [run] if len(run) < 2 else [run[i:i + 2] for i in range(len(run) - 1)]


def query_terms(text: str) -> list[str]:
    """The terms a query looks up: each space-separated word's key, and for runs of unspaced
    characters their bigrams; without repeats, in order."""
    out: dict[str, None] = {}
    for word in word_key(text).split():
        key = word_key(word)
        if not any(unspaced(ch) for ch in key):
            if key:
                out[key] = None
            continue
        for is_unspaced, run in _runs(key):
            run = word_key(run)
            for term in (_bigrams(run) if is_unspaced else [run] if run else []):
                out[term] = None
    return list(out)


#: Characters of text without spaces on each side of the peak token that an example's bigrams reach.
CONTEXT = 2


def _beside(tokens: Sequence[str | None], centre: int, step: int) -> str:
    """Up to :data:`CONTEXT` characters of unspaced text next to the peak token (``step`` -1: before
    it, +1: after it), across tokens, nearest first, stopping at any other character."""
    found = ""
    i = centre + step
    while 0 <= i < len(tokens) and tokens[i] and len(found) < CONTEXT:
        for ch in (reversed(tokens[i]) if step < 0 else tokens[i]):  # type: ignore[arg-type]
            if not unspaced(ch) or len(found) == CONTEXT:
                return found
            found += ch
        i += step
    return found


def index_terms(tokens: Sequence[str | None], centre: int) -> list[str]:
    """The terms an example whose peak token is ``tokens[centre]`` is found by. When its whole word
    (:func:`word_around`) has no unspaced character: the key of the word up to and with the peak token
    (a causal model at that token has read no further). Else the word's other runs, the bigrams of the
    unspaced text from :data:`CONTEXT` characters before the peak token to as many after it, and each
    unspaced character of the peak token alone (a query of one character)."""
    before, peak, after = word_around(tokens, centre)
    key = word_key(before + peak + after)
    if not key:
        return []
    if not any(unspaced(ch) for ch in key):
        read = word_key(before + peak)
        return [read] if read else []
    left = _beside(tokens, centre, -1)[::-1] if not before else ""
    right = _beside(tokens, centre, 1) if not after else ""
    out: dict[str, None] = {}
    for is_unspaced, run in _runs(word_key(left + before + peak + after + right)):
        run = word_key(run)
        for term in (_bigrams(run) if is_unspaced else [run] if run else []):
            out[term] = None
    for ch in word_key(peak):
        if unspaced(ch):
            out[ch] = None
    return list(out)


def shard_of(term: str, firsts: Sequence[str]) -> int:
    """The shard holding ``term``: the last of ``firsts`` (each shard's first term, ascending in
    code-point order, ``firsts[0] == ""``) that is not after ``term``."""
    return max(0, bisect.bisect_right(firsts, term) - 1)


def js_constants() -> str:
    """``words-data.js``: this module's constants for ``rules.js`` (an ES module)."""
    return ("// Written by mkdocs_gluscope.words.js_constants: the word rules' constants, one definition.\n"
            f"export const TRIM = {json.dumps(''.join(sorted(TRIM)))};\n"
            f"export const UNSPACED = {json.dumps([list(r) for r in UNSPACED])};\n"
            f"export const WORD_LIMIT = {WORD_LIMIT};\n"
            f"export const CONTEXT = {CONTEXT};\n")
