"""Search terms for text without spaces: character bigrams (what gluscope indexes) against jieba's words
(what Material's search uses for Chinese), on real Chinese text, for shard balance and recall.

Neurons are simulated: peaks at random token positions of a Chinese corpus cut by a byte-level BPE
tokenizer trained here (so tokens are pieces of one to a few characters, as a model's are). Each peak
is indexed under the terms of its scheme (bigrams of the peak token with one character on each side,
``words.index_terms``; or the jieba word(s) the peak token's characters belong to, segmenting the text
around it in precise mode as Material does), then sharded as the site shards its index. A query is
found when every one of its terms is among the peak's: queries are (1) the jieba word at the peak
(what a reader who knows the word types), (2) two characters of the peak token with a neighbour (part of
a longer word) and (3) the peak token's text.

    pip install jieba                  # only for this benchmark
    python bench/cjk_terms.py [--text /usr/share/games/fortunes/chinese] [--peaks 40000]

The text: Debian's ``fortunes-zh`` package (2 MB of modern Chinese: sayings, tips, Debian's code of conduct).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mkdocs_gluscope.light import search as lsearch  # noqa: E402
from mkdocs_gluscope.words import index_terms, query_terms, unspaced, word_key  # noqa: E402


def corpus(path: Path) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(encoding="utf-8", errors="replace"))
    return [t.strip() for t in text.split("\n%\n") if sum(unspaced(ch) for ch in t) > 20]


def tokenizer(texts: list[str], size: int = 8000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=Path("/usr/share/games/fortunes/chinese"))
    p.add_argument("--peaks", type=int, default=40000)
    p.add_argument("--shard-bytes", type=int, default=lsearch.SHARD_BYTES)
    args = p.parse_args()
    try:
        import jieba
    except ImportError:
        sys.exit("this benchmark needs jieba (pip install jieba)")
    jieba.setLogLevel(60)
    texts = corpus(args.text)
    tok = tokenizer(texts)
    rng = random.Random(0)
    docs = []
    for text in texts:
        enc = tok.encode(text)
        # Each token's display string, as a model's vocabulary gives it (whole characters here).
        pieces = [text[a:b] for a, b in enc.offsets]
        if len(pieces) > 8:
            docs.append((text, pieces, enc.offsets))
    print(f"corpus: {len(texts)} texts, {sum(len(t) for t in texts):,} characters, "
          f"{sum(len(d[1]) for d in docs):,} tokens ({statistics.mean(len(p) for d in docs for p in d[1]):.2f} "
          "characters a token)")
    peaks = []
    while len(peaks) < args.peaks:
        text, pieces, offsets = rng.choice(docs)
        j = rng.randrange(len(pieces))
        if any(unspaced(ch) for ch in pieces[j]):
            peaks.append((text, pieces, offsets, j))
    started = time.perf_counter()
    schemes: dict[str, list[list[str]]] = {"bigrams": [], "jieba": []}
    asked: dict[str, list[str]] = {"the jieba word at the peak": [], "two characters at the peak": [], "the peak token": []}
    segmented: dict[str, list[tuple[int, int, str]]] = {}
    for text, pieces, offsets, j in peaks:
        window = pieces[max(0, j - 8):j + 9]
        schemes["bigrams"].append(index_terms(window, j - max(0, j - 8)))
        if text not in segmented:
            spans, at = [], 0
            for word in jieba.cut(text):
                spans.append((at, at + len(word), word))
                at += len(word)
            segmented[text] = spans
        a, b = offsets[j]
        hit = [w for s, e, w in segmented[text] if s < b and e > a and word_key(w)]
        schemes["jieba"].append(sorted({word_key(w) for w in hit}))
        asked["the jieba word at the peak"].append(max(hit, key=len) if hit else "")
        asked["two characters at the peak"].append(text[a - 1:a + 1] if a > 0 and rng.random() < 0.5 else text[a:a + 2])
        asked["the peak token"].append(pieces[j])
    print(f"terms of {len(peaks):,} peaks in {time.perf_counter() - started:.1f} s")
    # A query's terms as each scheme makes them: bigrams of its runs; or jieba's words of it (Material
    # segments a query as it segmented the pages).
    as_terms = {"bigrams": query_terms, "jieba": lambda q: [k for k in (word_key(w) for w in jieba.cut(q)) if k]}
    for name, terms in schemes.items():
        with tempfile.TemporaryDirectory() as tmp:
            items = [(t, -1.0 / len(ts), -1.0 / len(ts), -1.0, f"0.{i}", 0) for i, ts in enumerate(terms) for t in ts]
            run = lsearch.write_sorted(items, Path(tmp) / "run.jsonl")
            lsearch.SHARD_BYTES = args.shard_bytes
            counts = lsearch.write_shards([run], Path(tmp) / "search")
            sizes = [f.stat().st_size for f in (Path(tmp) / "search").glob("[0-9]*.json")]
        print(f"\n{name}: {counts['terms']:,} terms, {counts['postings']:,} postings (at most {lsearch.POSTINGS} a term), "
              f"{counts['shards']} shards for {args.shard_bytes // 1024} KB each: largest {max(sizes) / 1024:.1f} KB, "
              f"median {statistics.median(sizes) / 1024:.1f} KB; {statistics.mean(len(t) for t in terms):.2f} terms a peak")
        for question, texts in asked.items():
            pairs = [(as_terms[name](q), ts) for q, ts in zip(texts, terms) if q]
            found = sum(1 for q, ts in pairs if q and all(t in ts for t in q))
            print(f"  recall, query = {question}: {found / max(len(pairs), 1):.1%} of {len(pairs):,}")


if __name__ == "__main__":
    main()
