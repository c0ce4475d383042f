"""Site build cost: a 1,000-neuron site from a synthetic activations file of realistic shape.

Prints the plugin's own milliseconds per page (its hooks: page Markdown, index pages, document
shards, example HTML) and the whole `mkdocs build` time.

    python bench/site_build.py [--neurons 1000] [--k 16] [--before 16] [--after 2]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--neurons", type=int, default=1000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--before", type=int, default=16)
    p.add_argument("--after", type=int, default=2)
    p.add_argument("--docs", type=int, default=3000)
    args = p.parse_args()

    import numpy as np

    from mkdocs_gluscope.plugin import GluscopePlugin
    from sites import build, write_project
    from synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="gluscope-site-bench-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    rng = np.random.default_rng(0)
    vocab = ["<s>"] + [f" {w}" for w in ("the", "of", "and", "to", "in", "a", "that", "is")] + [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 9)))) for _ in range(5000)]
    docs = [[0] + list(rng.integers(1, len(vocab), size=int(rng.integers(64, 512)))) for _ in range(args.docs)]
    layers = 4
    d_mlp = -(-args.neurons // layers)
    t0 = time.perf_counter()
    write_synthetic(root / "data" / "act.h5", layers=layers, d_mlp=d_mlp, k=args.k, before=args.before,
                    after=args.after, vocab=vocab, docs=docs)
    made = time.perf_counter() - t0
    neurons = [f"{n // d_mlp}.{n % d_mlp}" for n in range(args.neurons)]

    spent: dict[str, float] = defaultdict(float)
    for name in ("on_config", "on_files", "on_post_page"):
        original = getattr(GluscopePlugin, name)

        def timed(self, *a, _original=original, _name=name, **kw):
            start = time.perf_counter()
            try:
                return _original(self, *a, **kw)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(GluscopePlugin, name, timed)

    config = write_project(root, {"activations": "data/act.h5", "neurons": neurons},
                           nav=[{"Home": "index.md"}, {"Neurons": "neurons/index.md"}])
    t0 = time.perf_counter()
    site = build(config)
    total = time.perf_counter() - t0
    plugin = sum(spent.values())
    pages = list(site.glob("neurons/L*/N*/index.html"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"synthetic file: {args.neurons} neurons listed, k={args.k}, window {args.before}+1+{args.after}, "
          f"{args.docs} documents (written in {made:.1f} s)")
    print(f"plugin: {1000 * plugin / len(pages):.2f} ms per page ({plugin:.1f} s in all: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()) + ")")
    print(f"whole build: {total:.1f} s for {len(pages)} neuron pages ({1000 * total / len(pages):.1f} ms per page); "
          f"site {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
