"""Synthetic activations files shaped like a real model's, written layer by layer in blocks of neurons.

``write_shaped`` makes a file with every dataset a collection writes (statistics, top-k lists with
windows, histograms, density, random and band samples, weights), values of realistic size and
shape, and documents shared between a neuron's lists as in the real demo file (77% of a neuron's 256
top-k examples are distinct: within a gate+ case the gate and act(gate) lists are the same examples,
and a post example is the in list's example of the same rank 40% of the time). Memory stays that of
one block of 1,024 neurons, so a 7B model's file (32 x 11,008 neurons, 21M tokens) is written on a
small machine:

    python bench/shaped.py --shape olmo-7b --out /tmp/olmo.h5      # about 30 min and 8 GB on 2 cores

Shapes: ``smollm2`` (the demo: 30 x 1,536, 200k tokens) and ``olmo-7b`` (the paper's OLMo-7B-0424:
32 x 11,008, k = 16, windows 16 + 1 + 2, 21M tokens in documents of up to 1,024 tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mkdocs_gluscope.activations import act_values  # noqa: E402
from mkdocs_gluscope.distributions import BAND_OF_BIN, DENSITY_HALF, N_BANDS, N_BINS, SAMPLES, BAND_SAMPLES  # noqa: E402
from mkdocs_gluscope.store import NEURON_BLOCK, ActivationsWriter  # noqa: E402

SHAPES = {
    "smollm2": dict(layers=30, d_mlp=1536, n_tokens=200_000, vocab=49152, doc_tokens=1024,
                    model="synthetic/SmolLM2-135M-shaped", dataset="synthetic State of the Union-shaped corpus"),
    "olmo-7b": dict(layers=32, d_mlp=11008, n_tokens=21_000_000, vocab=50280, doc_tokens=1024,
                    model="synthetic/OLMo-7B-0424-shaped", dataset="synthetic Dolma-shaped corpus"),
}
SYLLABLES = ("ab al an ar as at be ca ce co con de di dis en er es ex for ge in is it la le li lo ma me mi "
             "mo na ne no or pa pe per pre pro ra re ri ro sa se si so sta sub ta te ter ti to tra tu un ur "
             "ve vi").split()
FUNCTION_WORDS = (" the", " of", " and", " to", " in", " a", " that", " is", " for", " we", " our", " will",
                  " it", " be", " this", " with", " have", " by", " as", " on", ",", ".", "\n", " (", ")", "[", "]")
SHARE_POST_IN = 0.4
G_SIGN = np.array([1, 1, -1, -1], dtype=np.float32)
I_SIGN = np.array([1, -1, 1, -1], dtype=np.float32)


def vocabulary(rng: np.random.Generator, size: int) -> tuple[list[str], list[list[int]]]:
    """Display strings like a byte-level BPE vocabulary's (leading spaces, word pieces) and the token ids
    each of a set of words is cut into (long words in two or three pieces)."""
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
        else:
            cuts = sorted(int(c) for c in rng.choice(np.arange(2, len(word) - 1), replace=False,
                                                     size=min(int(rng.integers(1, 3)), len(word) - 3)))
            bounds = [0] + cuts + [len(word)]
            pieces = [(" " if a == 0 else "") + word[a:b] for a, b in zip(bounds, bounds[1:])]
        for piece in pieces:
            if piece not in index and len(vocab) < size:
                index[piece] = len(vocab)
                vocab.append(piece)
        if all(p in index for p in pieces):
            words.append([index[p] for p in pieces])
    return vocab, words


def corpus(rng: np.random.Generator, vocab: list[str], words: list[list[int]], n_tokens: int, doc_tokens: int):
    """Documents of Zipf-distributed words, up to ``doc_tokens`` tokens each, the first token the BOS."""
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    weights /= weights.sum()
    lengths_w = np.array([len(w) for w in words])
    flat = np.concatenate([np.asarray(w, dtype=np.int32) for w in words])
    starts = np.concatenate([[0], np.cumsum(lengths_w)[:-1]])
    # One stream of words' pieces, cut into documents (each led by the BOS).
    chosen = rng.choice(len(words), size=int(n_tokens / (weights * lengths_w).sum()) + 1000, p=weights)
    piece_starts = np.repeat(starts[chosen], lengths_w[chosen])
    within = np.arange(len(piece_starts)) - np.repeat(np.cumsum(lengths_w[chosen]) - lengths_w[chosen], lengths_w[chosen])
    stream = flat[piece_starts + within]
    lengths = []
    while sum(lengths) < n_tokens:
        length = int(min(doc_tokens, rng.integers(200, 3 * doc_tokens)))
        lengths.append(length)
    lengths = np.array(lengths)
    body = lengths - 1
    need = int(body.sum())
    if need > len(stream):
        stream = np.resize(stream, need)
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens[offsets[:-1]] = 0
    mask = np.ones(len(tokens), dtype=bool)
    mask[offsets[:-1]] = False
    tokens[mask] = stream[:need]
    return tokens, offsets, lengths


def _bfloat16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def block_arrays(rng: np.random.Generator, n: int, k: int, before: int, after: int, lengths: np.ndarray,
                 n_tokens: int) -> dict[str, np.ndarray]:
    """Every dataset of ``n`` neurons, as ``ActivationsWriter.write_neurons`` takes them."""
    C = H = 4
    W = before + 1 + after
    n_docs = len(lengths)
    count = np.floor(rng.dirichlet(np.ones(C) * 0.7, size=n) * (n_tokens - n_docs)).astype(np.int64)
    # k distinct documents per list; lists of a case share examples as in the real demo file.
    top_doc = rng.integers(0, n_docs, size=(n, C, H, k)).astype(np.int32)
    other = rng.integers(0, n_docs, size=(n, C, k)).astype(np.int32)
    shared = rng.random((n, C, k)) < SHARE_POST_IN
    top_doc[:, :, 0] = np.where(shared, top_doc[:, :, 1], other)
    top_doc[:, :2, 3] = top_doc[:, :2, 2]
    top_pos = (rng.random((n, C, H, k)) * (lengths[top_doc] - 1)).astype(np.int32) + 1
    top_pos[:, :, 0] = np.where(shared, top_pos[:, :, 1], top_pos[:, :, 0])
    top_pos[:, :2, 3] = top_pos[:, :2, 2]
    scale = rng.gamma(2.0, 0.6, size=(n, 1, 1, 1, 1)).astype(np.float32)
    gate = (rng.normal(size=(n, C, H, k, W)) * scale).astype(np.float32)
    in_ = (rng.normal(size=(n, C, H, k, W)) * scale).astype(np.float32)
    peak = -np.sort(-np.abs(rng.normal(size=(n, C, H, k)) * 2 + 3).astype(np.float32) * scale[..., 0], axis=-1)
    gate[..., before] = G_SIGN[None, :, None, None] * peak
    in_[..., before] = I_SIGN[None, :, None, None] * peak
    for x in (gate, in_):
        x[:, :, 0] = np.where(shared[..., None], x[:, :, 1], x[:, :, 0])
        x[:, :2, 3] = x[:, :2, 2]
    t = top_pos[..., None] + np.arange(-before, after + 1)
    inside = (t >= 0) & (t < lengths[top_doc][..., None])
    gate, in_ = (np.where(inside, _bfloat16(x), np.nan).astype(np.float16) for x in (gate, in_))
    g32, i32 = gate.astype(np.float32), in_.astype(np.float32)
    swish = act_values(g32[..., before], "silu").astype(np.float32)
    # A bfloat16 model's hooks are bfloat16 values (act(gate) and post too).
    values = _bfloat16(np.stack([_bfloat16(swish[:, :, 0]) * i32[:, :, 0, :, before], i32[:, :, 1, :, before],
                                 g32[:, :, 2, :, before], swish[:, :, 3]], axis=2))
    mag = np.abs(values).max(-1)
    sign = np.sign(values[..., 0])
    # Histograms: each (case, hook) over about ten octaves around the neuron's scale, summing to the count.
    centre = 10 + np.log2(scale[:, 0, 0, 0, 0] + 1e-3)  # [n]
    bins = np.arange(N_BINS)
    p = np.exp(-0.5 * ((bins[None, :] - centre[:, None]) / 2.0) ** 2)
    p /= p.sum(-1, keepdims=True)
    hist = np.zeros((n, C, H, N_BINS), np.int64)
    for c in range(C):
        for h in range(H):
            hist[:, c, h] = rng.multinomial(count[:, c], p)
    # Density: each case's quadrant, a blob of cells around the neuron's scale.
    density = np.zeros((n, 2 * DENSITY_HALF, 2 * DENSITY_HALF), np.int64)
    cells = np.arange(DENSITY_HALF)
    q = np.exp(-0.5 * ((cells[None, :] - (centre[:, None] / 2)) / 1.5) ** 2)
    q2 = (q[:, :, None] * q[:, None, :]).reshape(n, -1)
    q2 /= q2.sum(-1, keepdims=True)
    for c in range(C):
        quad = rng.multinomial(count[:, c], q2).reshape(n, DENSITY_HALF, DENSITY_HALF)
        gi = cells + DENSITY_HALF if G_SIGN[c] > 0 else DENSITY_HALF - 1 - cells
        ii = cells + DENSITY_HALF if I_SIGN[c] > 0 else DENSITY_HALF - 1 - cells
        density[:, gi[:, None], ii[None, :]] += quad
    out = {"count": count, "nonfinite": np.zeros((n, C + 1), np.int64),
           "sum": (sign * mag * 0.2 * count[..., None]).astype(np.float64),
           "min": np.where(sign > 0, 0.001, -mag).astype(np.float32), "max": np.where(sign > 0, mag, -0.001).astype(np.float32),
           "top_value": values.astype(np.float32), "top_doc": top_doc, "top_pos": top_pos, "top_gate": gate, "top_in": in_,
           "hist": hist, "density": density}
    # Random samples (S per case) and band samples (S2 per case and band, where the band has tokens).
    band_filled = np.stack([(np.where(BAND_OF_BIN == r, hist[:, :, 0], 0).sum(-1) > 0) for r in range(N_BANDS)], axis=-1)
    for group, shape, filled in (("samples", (SAMPLES,), count[..., None] > 0),
                                 ("bands", (N_BANDS, BAND_SAMPLES), band_filled[..., None])):
        doc = rng.integers(0, n_docs, size=(n, C) + shape).astype(np.int32)
        pos = (rng.random((n, C) + shape) * (lengths[doc] - 1)).astype(np.int32) + 1
        doc = np.where(filled, doc, -1)
        pos = np.where(filled, pos, -1)
        spread = scale.reshape((n,) + (1,) * (len(shape) + 2))
        g = (rng.normal(size=(n, C) + shape + (W,)) * spread).astype(np.float32)
        i = (rng.normal(size=(n, C) + shape + (W,)) * spread).astype(np.float32)
        g[..., before] = np.abs(g[..., before]) * G_SIGN.reshape((1, C) + (1,) * len(shape))
        i[..., before] = np.abs(i[..., before]) * I_SIGN.reshape((1, C) + (1,) * len(shape))
        t = pos[..., None] + np.arange(-before, after + 1)
        inside = (doc[..., None] >= 0) & (t >= 0) & (t < lengths[np.clip(doc, 0, None)][..., None])
        g, i = (np.where(inside, _bfloat16(x), np.nan).astype(np.float16) for x in (g, i))
        sw = act_values(g[..., before].astype(np.float32), "silu").astype(np.float32)
        ic = i[..., before].astype(np.float32)
        value = _bfloat16(np.stack([_bfloat16(sw) * ic, ic, g[..., before].astype(np.float32), sw], axis=2))  # [n, C, H, *shape]
        value = np.where(doc[:, :, None] >= 0, value, np.nan).astype(np.float32)
        out.update({f"{group}_doc": doc, f"{group}_pos": pos, f"{group}_value": value, f"{group}_gate": g, f"{group}_in": i})
    return out


def write_shaped(path: Path, *, layers: int, d_mlp: int, n_tokens: int, vocab: int, doc_tokens: int, model: str,
                 dataset: str, k: int = 16, before: int = 16, after: int = 2, seed: int = 0, log=print) -> Path:
    """A file of the shape given, written block by block (see the module docstring)."""
    rng = np.random.default_rng(seed)
    strings, words = vocabulary(rng, vocab)
    tokens, offsets, lengths = corpus(rng, strings, words, n_tokens, doc_tokens)
    n_docs = len(lengths)
    attrs = {"model": model, "dataset": dataset, "n_docs": n_docs, "dtype": "bfloat16", "act_fn": "silu",
             "include_bos": False, "has_bos": True, "refactor_glu": True, "layers": list(range(layers))}
    start = time.perf_counter()
    with ActivationsWriter(path, n_layers=layers, d_mlp=d_mlp, k=k, context_before=before, context_after=after,
                           attrs=attrs, samples=SAMPLES, band_samples=BAND_SAMPLES) as w:
        w.write_corpus(tokens, offsets, strings, doc_title=[f"document {d} · source {d % 97}" for d in range(n_docs)])
        for layer in range(layers):
            for first in range(0, d_mlp, NEURON_BLOCK):
                n = min(NEURON_BLOCK, d_mlp - first)
                w.write_neurons(layer, first, block_arrays(rng, n, k, before, after, lengths, int(lengths.sum() - n_docs)))
            log(f"layer {layer + 1}/{layers} written ({time.perf_counter() - start:.0f} s)")
        w.write_weights({
            "flipped": rng.random((layers, d_mlp)) < 0.3,
            "cos_gate_in": rng.uniform(0, 0.5, (layers, d_mlp)).astype(np.float32),
            "cos_gate_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
            "cos_in_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
        })
        w.close(n_tokens=int(lengths.sum() - n_docs))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    t0 = time.perf_counter()
    write_shaped(args.out, **shape)
    print(f"{args.out}: {args.out.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
