"""A whole model's word index without its site: the first search results for some words.

Builds only what the light layout's search box reads (every neuron's postings, from
``light.search.postings`` with each layer's case scales, as ``light.build`` computes them, merged
into the shards by ``light.search.write_shards``), then looks each word up as the browser does (its
first query term, the shard holding it, the postings in the shard's order). Faster than a whole site
build when only the ranking is in question (the demo: is 28.473 first for "applause" and "Laughter"?).

    python bench/search_check.py data/demo.h5 applause Laughter [--layers 28 29]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mkdocs_gluscope.light import search as lsearch  # noqa: E402
from mkdocs_gluscope.pick import layer_case_scales  # noqa: E402
from mkdocs_gluscope.store import ActivationsFile  # noqa: E402
from mkdocs_gluscope.words import query_terms, shard_of  # noqa: E402

BLOCK = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("activations", type=Path)
    p.add_argument("words", nargs="+")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="only these layers (default: all)")
    p.add_argument("--top", type=int, default=5, help="results to print per word")
    args = p.parse_args()
    start, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="gluscope-search-check-") as tmp, ActivationsFile(args.activations) as f:
        words = lsearch.WordFinder(f.vocab)
        runs = []
        layers = args.layers if args.layers is not None else f.layers
        for layer in layers:
            scales = tuple(float(x) for x in layer_case_scales(f, layer))
            postings: list = []
            for a in range(0, f.d_mlp, BLOCK):
                for data in f.neurons(layer, a, min(a + BLOCK, f.d_mlp), tokens=False):
                    ids = f.window_tokens(data.top_doc[:, :1], data.top_pos[:, :1])[:, 0]  # hook_post lists
                    postings.extend(lsearch.postings(data, words, ids, scales))
            runs.append(lsearch.write_sorted(postings, Path(tmp) / f"postings-{layer:04d}.txt"))
        folder = Path(tmp) / "search"
        totals = lsearch.write_shards(runs, folder)
        firsts = json.loads((folder / "firsts.json").read_text(encoding="utf-8"))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        print(f"word index of {len(layers) * f.d_mlp:,} neurons ({args.activations.name}): {totals['terms']:,} terms in "
              f"{totals['shards']:,} shards; {elapsed:.0f} s ({cpu:.0f} CPU s); load average {os.getloadavg()[0]:.1f}")
        for word in args.words:
            term = query_terms(word)[0]
            found = json.loads((folder / f"{shard_of(term, firsts)}.json").read_text(encoding="utf-8")).get(term, [])
            print(f"search {word!r} (term {term!r}): " + (", ".join(
                f"{nid} (case {c}, score {score}, share {share}, peak {peak})"
                for nid, c, score, share, peak in found[:args.top]) or "no neuron"))


if __name__ == "__main__":
    main()
