"""A whole model as a site: every neuron of a demo-shaped file, built with ``mkdocs build`` (light layout).

Writes a synthetic activations file shaped like the demo (SmolLM2-135M: 30 layers x 1536 neurons, k = 16,
windows of 16 + 1 + 2 tokens, float16 windows holding bfloat16 values as the demo's bfloat16 run
gives them, a 200k-token corpus of ~1,000-token documents with word pieces and titles), builds the
site with ``neurons: all``, and prints the build time, the total size (bytes of all files, as GitHub
Pages counts them), the largest and the median neuron page (page + example data file), and the size
of each kind of file.

    python bench/site_scale.py [--layers 30] [--d-mlp 1536] [--file FILE] [--keep DIR] [--workers N]

``--file`` builds from an existing activations file instead (e.g. the real ``data/demo.h5``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SYLLABLES = ("ab al an ar as at be ca ce co con de di dis en er es ex for ge in is it la le li lo ma me mi "
             "mo na ne no or pa pe per pre pro ra re ri ro sa se si so sta sub ta te ter ti to tra tu un ur "
             "ve vi").split()
SHARE_POST_IN = 0.4
FUNCTION_WORDS = (" the", " of", " and", " to", " in", " a", " that", " is", " for", " we", " our", " will",
                  " it", " be", " this", " with", " have", " by", " as", " on", ",", ".", "\n", " (", ")", "[", "]")


def demo_vocab(rng: np.random.Generator, size: int = 49152) -> tuple[list[str], list[list[int]]]:
    """Display strings like a byte-level BPE vocabulary's (leading spaces, word pieces) and the
    token ids each of a set of words is cut into (long words in two or three pieces)."""
    vocab = ["<|endoftext|>"] + list(FUNCTION_WORDS) + ["Appl", "ause", "L", "aughter"]
    index = {s: i for i, s in enumerate(vocab)}
    words: list[list[int]] = [[index[s]] for s in FUNCTION_WORDS]
    words += [[index[" ("], index["Appl"], index["ause"], index[")"]], [index["["], index["L"], index["aughter"], index["]"]]]
    while len(vocab) < size:
        word = "".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 5))))
        if rng.random() < 0.1:
            word = word.capitalize()
        if len(word) <= 5 or rng.random() < 0.5:
            pieces = [" " + word]
        else:  # pieces after the first have no leading space
            cuts = sorted(int(c) for c in rng.choice(np.arange(2, len(word) - 1), replace=False,
                                                     size=min(int(rng.integers(1, 3)), len(word) - 3)))
            bounds = [0] + cuts + [len(word)]
            pieces = [(" " if a == 0 else "") + word[a:b] for a, b in zip(bounds, bounds[1:])]
        for piece in pieces:
            if piece not in index:
                index[piece] = len(vocab)
                vocab.append(piece)
        words.append([index[piece] for piece in pieces])
    return vocab, words


def write_demo_shaped(path: Path, *, layers: int = 30, d_mlp: int = 1536, k: int = 16, before: int = 16,
                      after: int = 2, n_tokens: int = 200_000, doc_tokens: int = 1024, seed: int = 0) -> Path:
    """A demo-shaped activations file, written layer by layer through the store API."""
    from mkdocs_gluscope.activations import act_values
    from mkdocs_gluscope.store import ActivationsWriter

    rng = np.random.default_rng(seed)
    vocab, words = demo_vocab(rng)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1  # Zipf-like word frequencies
    weights /= weights.sum()
    docs: list[np.ndarray] = []
    total = 0
    while total < n_tokens:
        length = int(min(doc_tokens, rng.integers(200, 3 * doc_tokens)))
        chosen = rng.choice(len(words), size=length, p=weights)
        ids = np.concatenate([[0]] + [words[w] for w in chosen])[:length]
        docs.append(ids.astype(np.int32))
        total += len(ids)
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_docs = len(docs)
    titles = [f"{1790 + d // 2} · President {d % 45}" for d in range(n_docs)]
    W = before + 1 + after
    C = H = 4
    attrs = {"model": "synthetic/SmolLM2-135M-shaped", "dataset": "synthetic State of the Union-shaped corpus",
             "n_docs": n_docs, "dtype": "bfloat16", "act_fn": "silu", "include_bos": False, "has_bos": True,
             "refactor_glu": True, "layers": list(range(layers))}
    g_sign = np.array([1, 1, -1, -1], dtype=np.float32)[:, None, None, None]
    i_sign = np.array([1, -1, 1, -1], dtype=np.float32)[:, None, None, None]
    with ActivationsWriter(path, n_layers=layers, d_mlp=d_mlp, k=k, context_before=before, context_after=after,
                           attrs=attrs) as w:
        w.write_corpus(np.concatenate(docs), offsets, vocab, doc_title=titles)
        for layer in range(layers):
            count = np.floor(rng.dirichlet(np.ones(C) * 0.7, size=d_mlp) * (n_tokens - n_docs)).astype(np.int64)
            # k distinct documents per list. Lists of a case share examples as in the real demo file (where
            # 77% of a neuron's 256 examples are distinct): within a gate+ case the gate and act(gate) lists
            # are the same (SiLU rises for gate > 0), and each post example is the in list's example of the
            # same rank with probability SHARE_POST_IN (otherwise a document the in list does not have).
            perm = np.argsort(rng.random((d_mlp, C, H, n_docs)), axis=-1)[..., :2 * k].astype(np.int32)
            top_doc = perm[..., :k].copy()
            shared = rng.random((d_mlp, C, k)) < SHARE_POST_IN
            top_doc[:, :, 0] = np.where(shared, top_doc[:, :, 1], perm[:, :, 1, k:])
            top_doc[:, :2, 3] = top_doc[:, :2, 2]
            top_pos = (rng.random((d_mlp, C, H, k)) * (lengths[top_doc] - 1)).astype(np.int32) + 1
            top_pos[:, :, 0] = np.where(shared, top_pos[:, :, 1], top_pos[:, :, 0])
            top_pos[:, :2, 3] = top_pos[:, :2, 2]
            scale = rng.gamma(2.0, 0.6, size=(d_mlp, 1, 1, 1, 1)).astype(np.float32)
            gate = (rng.normal(size=(d_mlp, C, H, k, W)) * scale).astype(np.float32)
            in_ = (rng.normal(size=(d_mlp, C, H, k, W)) * scale).astype(np.float32)
            peak = np.abs(rng.normal(size=(d_mlp, C, H, k)) * 2 + 3).astype(np.float32) * scale[..., 0]
            peak = -np.sort(-peak, axis=-1)
            gate[..., before] = g_sign[None, ..., 0] * peak
            in_[..., before] = i_sign[None, ..., 0] * peak
            for x in (gate, in_):  # a shared example has the same windows in every list
                x[:, :, 0] = np.where(shared[..., None], x[:, :, 1], x[:, :, 0])
                x[:, :2, 3] = x[:, :2, 2]
            t = top_pos[..., None] + np.arange(-before, after + 1)
            inside = (t >= 0) & (t < lengths[top_doc][..., None])
            gate, in_ = (np.where(inside, _bfloat16(x), np.nan).astype(np.float32) for x in (gate, in_))
            swish = act_values(gate[..., before], "silu").astype(np.float32)
            values = np.stack([swish[:, :, 0] * in_[:, :, 0, :, before], in_[:, :, 1, :, before],
                               gate[:, :, 2, :, before], swish[:, :, 3]], axis=2)
            mag = np.abs(values).max(-1)
            sign = np.sign(values[..., 0])
            w.write_layer(layer, {
                "count": count, "nonfinite": np.zeros((d_mlp, C + 1), np.int64),
                "sum": (sign * mag * 0.2 * count[..., None]).astype(np.float64),
                "min": np.where(sign > 0, 0.001, -mag).astype(np.float32),
                "max": np.where(sign > 0, mag, -0.001).astype(np.float32),
                "top_value": values.astype(np.float32), "top_doc": top_doc, "top_pos": top_pos,
                "top_gate": gate, "top_in": in_,
            })
        w.write_weights({
            "flipped": rng.random((layers, d_mlp)) < 0.3,
            "cos_gate_in": rng.uniform(0, 0.5, (layers, d_mlp)).astype(np.float32),
            "cos_gate_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
            "cos_in_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
        })
        w.close(n_tokens=int(lengths.sum() - n_docs))
    return path


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (round to nearest even), as a bfloat16 model computes its activations."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def site_figures(site: Path, prefix: str = "neurons") -> dict:
    sizes = {p: p.stat().st_size for p in site.rglob("*") if p.is_file()}
    pages = {p: n for p, n in sizes.items() if p.name == "index.html" and p.parent.name.startswith("N")
             and p.parent.parent.parent.name == prefix}
    data = {(p.parent.name, p.stem): n for p, n in sizes.items() if p.suffix == ".bin" and p.parent.parent.name == "x"}
    neuron = sorted(n + data.get((p.parent.parent.name, p.parent.name), 0) for p, n in pages.items())
    kinds: dict[str, int] = {}
    for p, n in sizes.items():
        rel = p.relative_to(site).parts
        kind = ("neuron pages" if p in pages else "example data" if p.suffix == ".bin" and "x" in rel else
                "search shards" if rel[:2] == ("gluscope", "search") else "layer tables" if rel[:2] == ("gluscope", "layers")
                else "documents" if rel[:2] == ("gluscope", "docs") else "theme and other pages")
        kinds[kind] = kinds.get(kind, 0) + n
    return {"total": sum(sizes.values()), "files": len(sizes), "pages": len(pages), "neuron": neuron,
            "page_only": sorted(pages.values()), "kinds": kinds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-mlp", type=int, default=1536)
    p.add_argument("--file", type=Path, default=None, help="build from this activations file instead")
    p.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
    p.add_argument("--workers", type=int, default=None, help="processes writing pages (default: all CPUs)")
    p.add_argument("--neurons", nargs="+", default=["all"], help='neuron ids to publish (default: all)')
    p.add_argument("--config", type=Path, default=ROOT / "mkdocs.yml", help="the site whose theme to use")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mkdocs").setLevel(logging.WARNING)
    logging.getLogger("mkdocs.plugins.gluscope").setLevel(logging.INFO)

    import yaml

    from sites import build

    root = args.keep or Path(tempfile.mkdtemp(prefix="gluscope-site-scale-"))
    if args.keep and root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    if args.file:
        activations = args.file.resolve()
        made = 0.0
    else:
        activations = root / "data" / "act.h5"
        t0 = time.perf_counter()
        write_demo_shaped(activations, layers=args.layers, d_mlp=args.d_mlp)
        made = time.perf_counter() - t0
    # The demo site's own mkdocs.yml (theme, palette, navigation, hand-written pages), all neurons.
    config = yaml.load(args.config.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    shutil.copytree(ROOT / "site_src", root / "site_src")
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "gluscope" in plugin:
            plugin["gluscope"] = {"activations": str(activations), "neurons": args.neurons, "layout": "light"}
            if args.workers:
                plugin["gluscope"]["workers"] = args.workers
    config["site_dir"] = str(root / "site")
    config["markdown_extensions"] = [e for e in config["markdown_extensions"]
                                     if not (isinstance(e, dict) and "pymdownx.snippets" in e)] + [
        {"pymdownx.snippets": {"base_path": [str(root / "site_src")], "check_paths": True}}]
    (root / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    t0 = time.perf_counter()
    # A smaller model than the demo's breaks the hand-written pages' links to demo neurons: not strict then.
    site = build(root / "mkdocs.yml", strict=args.neurons == ["all"] and (bool(args.file) or (args.layers, args.d_mlp) == (30, 1536)))
    total = time.perf_counter() - t0
    f = site_figures(site)
    n = f["neuron"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu}, {cores} cores")
    print(f"activations file: {activations.name}, {activations.stat().st_size / 1e6:.0f} MB"
          + (f" (written in {made:.0f} s)" if made else ""))
    print(f"build: {total:.0f} s for {f['pages']:,} neuron pages ({1000 * total / max(f['pages'], 1):.1f} ms per page)")
    print(f"site: {f['total'] / 1e6:.0f} MB in {f['files']:,} files")
    print(f"neuron page + its example data: median {statistics.median(n) / 1e3:.1f} KB, largest {n[-1] / 1e3:.1f} KB; "
          f"page alone: median {statistics.median(f['page_only']) / 1e3:.1f} KB, largest {f['page_only'][-1] / 1e3:.1f} KB")
    for kind, size in sorted(f["kinds"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind}: {size / 1e6:.1f} MB")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
