"""Words, search terms and shard keys: one definition, the same in Python and in the browser's JS."""

from __future__ import annotations

import random
import unicodedata

from jsrules import needs_node, run_js
from mkdocs_gluscope import render, words

# Pieces of text from several scripts; strings are drawn from these so that every rule is exercised.
SCRIPTS = {
    "latin": ["Applause", "café", "cafe\u0301", "naïve", "Straße", "ÉCOLE", "Zoë", " the", "arms", "Darmstadt"],
    "cyrillic": ["Москва", "привет", "ЁЖИК", "слово"],
    "greek": ["ΟΔΥΣΣΕΥΣ", "λόγος", "Σίσυφος", "ΑΘΗΝΑ"],
    "arabic": ["مرحبا", "السلام", "كتاب", "\u0627\u0644\u0652"],
    "hebrew": ["שלום", "ספר", "\u05e9\u05c1\u05b8"],
    "cjk": ["中华人民共和国", "经济", "人民", "增长", "𠀀𠀁"],
    "kana": ["ありがとう", "カタカナ", "ｶﾀｶﾅ", "東京タワー"],
    "korean": ["안녕하세요", "한국어", "\u1112\u1161\u11ab"],
    "emoji": ["😀", "👍🏽", "🇩🇪", "👨\u200d👩\u200d👧", "😀a"],
    "space": [" ", "\u00a0", "\ufeff", "\u200b", "\u3000", "\t", "\n", "\x1c", "\u2028"],
    "marks": ["\u0301", "\u0308", "\u0327", "\u20dd", "\u0e31"],
    "digits": ["42", "٣", "१२", "½", "Ⅻ"],
    "punctuation": [".", ",", "(", ")", "[", "]", "-", "'", "&", "<", "\"", "—", "。", "、"],
}


def samples(n: int = 1000, seed: int = 17) -> list[str]:
    rng = random.Random(seed)
    pieces = [p for group in SCRIPTS.values() for p in group]
    out = []
    for i in range(n):
        group = list(SCRIPTS.values())[i % len(SCRIPTS)]  # every script leads some strings
        text = rng.choice(group) + "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 4)))
        if rng.random() < 0.3:
            text = unicodedata.normalize("NFD", text)
        out.append(text)
    return out


def windows(texts: list[str], seed: int = 5) -> list[tuple[list[str | None], int]]:
    """Token windows cut from the strings, with a peak position (None for outside the document)."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        cuts = sorted(rng.sample(range(1, max(len(text), 2)), k=min(3, max(len(text) - 1, 0)))) if len(text) > 1 else []
        bounds = [0] + cuts + [len(text)]
        tokens: list[str | None] = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [text]
        if rng.random() < 0.2:
            tokens = [None] + tokens
        out.append((tokens, rng.randrange(len(tokens)) if tokens[0] is not None else len(tokens) - 1))
    return out


def test_keys_are_nfc_lowercase_code_points_with_one_trim_set():
    assert words.word_key("cafe\u0301") == words.word_key("Café") == "café"  # decomposed = composed
    assert words.word_key("\ufeffApplause\u200b ") == "applause"  # U+FEFF: JS trim() would strip, Python strip() not
    assert words.word_key("\x1cx") == "\x1cx"  # Python strip() would strip U+001C, JS trim() not: neither does
    assert words.word_key("ΟΔΥΣΣΕΥΣ") == "οδυσσευς"  # final sigma, as both languages lowercase it


def test_whole_words_join_pieces_but_not_unspaced_characters():
    assert words.word_around([" (", "Appl", "ause", ")"], 2) == ("Appl", "ause", "")
    assert words.word_around(["中华", "人民", "共和国"], 1) == ("", "人民", "")
    assert words.index_terms(["中华", "人民", "共和国"], 1) == ["中华", "华人", "人民", "民共", "共和", "人", "民"]
    assert words.index_terms([" the", "[", "L", "aughter", "]"], 3) == ["laughter"]
    assert words.index_terms([" the", "[", "L", "aughter", "]"], 2) == ["l"]  # read so far: the model saw "L"
    assert words.query_terms("中华人民") == ["中华", "华人", "人民"]
    assert words.query_terms(" Applause  now") == ["applause", "now"]
    assert render.word_around is words.word_around  # one definition


def test_shards_are_ranges_of_terms_in_code_point_order():
    firsts = ["", "b", "z", "\uffff", "😀"]
    assert [words.shard_of(t, firsts) for t in ["a", "b", "ba", "zz", "\ufffe", "\uffff", "😀a", "😀"]] == [
        0, 1, 1, 2, 2, 3, 4, 4]


@needs_node
def test_the_js_rules_agree_with_python_on_1000_strings(tmp_path):
    texts = samples()
    assert len(texts) == 1000
    cut = windows(texts)
    firsts = sorted({""} | {words.word_key(t)[:2] for t in texts[::7]})
    calls = ([("wordKey", [t]) for t in texts] + [("queryTerms", [t]) for t in texts]
             + [("shardOf", [words.word_key(t), firsts]) for t in texts]
             + [("wordAround", [tokens, centre]) for tokens, centre in cut]
             + [("indexTerms", [tokens, centre]) for tokens, centre in cut]
             + [("unspaced", [t[0]]) for t in texts if t])
    expected = ([words.word_key(t) for t in texts] + [words.query_terms(t) for t in texts]
                + [words.shard_of(words.word_key(t), firsts) for t in texts]
                + [list(words.word_around(tokens, centre)) for tokens, centre in cut]
                + [words.index_terms(tokens, centre) for tokens, centre in cut]
                + [words.unspaced(t[0]) for t in texts if t])
    got = run_js(tmp_path, calls)
    wrong = [(call, want, have) for call, want, have in zip(calls, expected, got) if want != have]
    assert not wrong, wrong[:10]


@needs_node
def test_the_js_text_and_number_formats_agree_with_python(tmp_path):
    texts = samples(300, seed=3) + ["<script>", "{{ 7*7 }}", "\x00\x7f\x85", "   ", "\n\t\r",
                                     "abc\u202edef", "\u2067א\u2069b\u200f", "\ue000 7 \ue000", "\u061c\u200e"]
    rng = random.Random(1)
    numbers = ([0.0, -0.0, 1.0625, 1.0635, 10.625, 0.03125, 12345.5, 9999.5, 0.00012345, 1e-5, 1e20, -3.14159,
                99995.0, 0.5, 2.5, 1234.5, 123.45, 1.5e-7, 6.103515625e-05]
               + [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 8) for _ in range(300)]
               + [float(f"{rng.randint(1, 99999)}e{rng.randint(-9, 6)}") for _ in range(200)]
               + [rng.randint(1, 4096) / 2 ** rng.randint(0, 16) for _ in range(200)])
    calls = ([("mdText", [t]) for t in texts] + [("tokenLabel", [t]) for t in texts] + [("fmt", [x]) for x in numbers]
             + [("fmtInt", [n]) for n in (0, 7, 1234, -56789, 21_000_000_000)])
    expected = ([render.md_text(t) for t in texts] + [render.token_label(t) for t in texts]
                + [render.fmt(x) for x in numbers] + [render.fmt(n) for n in (0, 7, 1234, -56789, 21_000_000_000)])
    got = run_js(tmp_path, calls)
    wrong = [(call, want, have) for call, want, have in zip(calls, expected, got) if want != have]
    assert not wrong, wrong[:10]
