"""Activations files of realistic shape written with the store API, no model needed.

Values follow the contract's signs (a gate+_in- example has gate > 0 and in < 0 at its position),
so pages built from them look like real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.distributions import BAND_OF_BIN, DENSITY_HALF, HIST_EDGES, N_BANDS, N_BINS
from mkdocs_gluscope.store import HOOKS, VOCAB_DIRECTIONS, VOCAB_WEIGHTS, ActivationsWriter

DEFAULT_VOCAB = ["<s>"] + [f" w{i}" for i in range(1, 300)]


def write_synthetic(path: Path, *, layers: int = 2, d_mlp: int = 8, k: int = 4, before: int = 3, after: int = 1,
                    vocab: Sequence[str] = DEFAULT_VOCAB, docs: Sequence[Sequence[int]] | None = None,
                    titles: Sequence[str] | None = None, seed: int = 0, model: str = "synthetic/tiny",
                    layer_ids: Sequence[int] | None = None, dataset: str = "synthetic corpus", act_fn: str = "silu",
                    nonfinite: np.ndarray | None = None, distributions: bool = True, samples: int = 4,
                    band_samples: int = 2, vocab_k: int | None = 6, experts: dict[int, int] | None = None,
                    shared: Sequence[int] | None = None) -> Path:
    """``nonfinite`` ([layers, d_mlp, 5] int64): ``stats/nonfinite`` (default: none anywhere).
    ``experts`` (model layer -> routed experts) and ``shared`` (model layers with a shared expert) add
    expert rows of ``d_mlp`` neurons each, as a mixture-of-experts run records them (``layers`` dense
    layers stay; give ``layer_ids`` so the expert layers are others).

    ``distributions`` (default) also writes histograms, the density, ``samples`` random examples per
    case, ``band_samples`` per case and band, and (unless ``vocab_k`` is None) vocabulary projections
    of ``vocab_k`` tokens, all consistent with the counts and the contract's signs (see
    :func:`distribution_arrays`); ``distributions=False`` writes a file as collected before them."""
    rng = np.random.default_rng(seed)
    drng = np.random.default_rng([seed, 1])  # its own stream: the other data do not depend on distributions
    if docs is None:
        docs = [[0] + list(rng.integers(1, len(vocab), size=int(rng.integers(3, 40)))) for _ in range(max(k * 3, 12))]
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tokens = int(lengths.sum() - len(docs))
    attrs = {"model": model, "dataset": dataset, "n_docs": len(docs), "dtype": "float32",
             "act_fn": act_fn, "include_bos": False, "has_bos": True, "refactor_glu": True,
             "layers": list(layer_ids) if layer_ids is not None else list(range(layers))}
    with ActivationsWriter(path, n_layers=layers, d_mlp=d_mlp, k=k, context_before=before, context_after=after,
                           attrs=attrs, samples=samples if distributions else 0, band_samples=band_samples) as w:
        w.write_corpus(np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]), offsets, list(vocab),
                       doc_title=titles)

        def arrays(count_total: int) -> dict:
            return _neuron_arrays(rng, drng, d_mlp, k, before, after, docs, lengths, count_total, act_fn,
                                  distributions, samples, band_samples)

        for layer in range(layers):
            extra = arrays(n_tokens)
            if nonfinite is not None:
                extra["nonfinite"] = np.asarray(nonfinite[layer], dtype=np.int64)
            w.write_layer(layer, extra)
        for group, rows in (("experts", [(lay, e) for lay, n in (experts or {}).items() for e in range(n)]),
                            ("shared_experts", [(lay, -1) for lay in (shared or [])])):
            if not rows:
                continue
            routed = [n_tokens if e < 0 else int(n_tokens * (0.1 + 0.8 * ((7 * lay + 3 * e) % 10) / 10))
                      for lay, e in rows]
            w.add_experts(group, [lay for lay, _ in rows], [e for _, e in rows], routed, d_mlp)
            for row, total in enumerate(routed):
                w.write_neurons(row, 0, arrays(total), group=group)
            w.write_weights({
                "flipped": rng.random((len(rows), d_mlp)) < 0.3,
                "cos_gate_in": rng.uniform(0, 0.5, (len(rows), d_mlp)).astype(np.float32),
                "cos_gate_out": rng.uniform(-0.3, 0.3, (len(rows), d_mlp)).astype(np.float32),
                "cos_in_out": rng.uniform(-0.3, 0.3, (len(rows), d_mlp)).astype(np.float32)}, group=group)
        if distributions and vocab_k:
            w.write_vocab(*vocab_arrays(drng, layers, d_mlp, vocab_k, len(vocab)))
        w.write_weights({
            "flipped": rng.random((layers, d_mlp)) < 0.3,
            "cos_gate_in": rng.uniform(0, 0.5, (layers, d_mlp)).astype(np.float32),
            "cos_gate_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
            "cos_in_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
        })
        w.close(n_tokens=n_tokens)
    return path


G_SIGN = np.array([1, 1, -1, -1], dtype=np.float32)  # sign of gate in each case
I_SIGN = np.array([1, -1, 1, -1], dtype=np.float32)  # sign of in


def _bin_value(rng: np.random.Generator, b: int) -> float:
    """A |value| inside histogram bin ``b``, away from its edges (so float32 keeps it there)."""
    lo, hi = float(HIST_EDGES[b]), float(HIST_EDGES[b + 1])
    lo, hi = (2.0**-12 if lo == 0 else lo * 1.05), (lo * 1.5 if not np.isfinite(hi) else hi * 0.95)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _examples(rng, lengths, before, after, act_fn, cases_bins: list[list[int]]) -> dict[str, np.ndarray]:
    """Examples of each case ``c`` whose |post| lies in each bin of ``cases_bins[c]`` (-1: an empty
    slot): doc, pos, value [C, H, n], gate and in windows [C, n, W] with the case's signs at the centre."""
    C, n, W = len(cases_bins), len(cases_bins[0]), before + 1 + after
    doc = np.full((C, n), -1, np.int32)
    pos = np.full((C, n), -1, np.int32)
    value = np.full((C, 4, n), np.nan, np.float32)
    gate = np.full((C, n, W), np.nan, np.float32)
    in_ = np.full((C, n, W), np.nan, np.float32)
    for c, bins in enumerate(cases_bins):
        for s, b in enumerate(bins):
            if b < 0:
                continue
            d = int(rng.integers(len(lengths)))
            while lengths[d] < 2:
                d = int(rng.integers(len(lengths)))
            p = int(rng.integers(1, lengths[d]))
            g = np.float32(G_SIGN[c] * rng.uniform(0.5, 2.0))
            sw = np.float32(act_values(np.array([g], np.float32), act_fn)[0])
            # |post| in bin b; where act(gate) is 0 (ReLU, gate < 0) post is 0 whatever in is.
            i = np.float32(I_SIGN[c] * (_bin_value(rng, b) / abs(float(sw)) if sw else rng.uniform(0.5, 2.0)))
            t = p + np.arange(-before, after + 1)
            inside = (t >= 0) & (t < lengths[d])
            gate[c, s] = np.where(inside, rng.normal(size=W), np.nan)
            in_[c, s] = np.where(inside, rng.normal(size=W), np.nan)
            gate[c, s, before], in_[c, s, before] = g, i
            doc[c, s], pos[c, s] = d, p
            value[c, :, s] = [sw * i, i, g, sw]
    return {"doc": doc, "pos": pos, "value": value, "gate": gate, "in": in_}


def distribution_arrays(rng: np.random.Generator, count: np.ndarray, mag: np.ndarray, lengths: np.ndarray,
                        before: int, after: int, act_fn: str, samples: int, band_samples: int) -> dict[str, np.ndarray]:
    """One layer's ``hist``, ``density``, ``samples_*`` and ``bands_*`` for ``write_layer``, consistent
    with ``count`` [N, C]: every (case, hook) histogram sums to the case's count; the density's
    quadrant of each case holds exactly its count; samples and bands are at positions inside documents,
    with the case's signs, their |post| drawn from the case's hook_post histogram (bands: inside their band),
    and as many per list as the case (band) has positions."""
    N, C, H = count.shape[0], 4, 4
    centres = np.arange(N_BINS)
    hist = np.zeros((N, C, H, N_BINS), np.int64)
    density = np.zeros((N, 2 * DENSITY_HALF, 2 * DENSITY_HALF), np.int64)
    parts: dict[str, list] = {}
    dead = act_values(np.array([-1.0], np.float32), act_fn)[0] == 0  # act(gate) = 0 for gate < 0 (ReLU)
    for n in range(N):
        sample_bins, band_bins = [], []
        for c in range(C):
            for h in range(H):
                centre = 11 + np.log2(mag[n, c, h] + 1e-3) + (-3 if h == 3 and G_SIGN[c] < 0 else 0)
                p = np.exp(-0.5 * ((centres - centre) / 2.0) ** 2)
                hist[n, c, h] = rng.multinomial(count[n, c], p / p.sum())
                if dead and G_SIGN[c] < 0 and HOOKS[h] in ("hook_post", "swish"):
                    hist[n, c, h] = 0
                    hist[n, c, h, 0] = count[n, c]  # every value is 0: the under-flow bin
            # The quadrant of case c: gate cells 12..23 when gate > 0 (0..11 when < 0), in likewise.
            cells = np.arange(DENSITY_HALF)
            pg = np.exp(-0.5 * ((cells - rng.uniform(4, 8)) / 1.5) ** 2)
            pi = np.exp(-0.5 * ((cells - rng.uniform(4, 8)) / 2.0) ** 2)
            quad = rng.multinomial(count[n, c], (np.outer(pg, pi) / np.outer(pg, pi).sum()).ravel())
            quad = quad.reshape(DENSITY_HALF, DENSITY_HALF)
            gi = cells + DENSITY_HALF if G_SIGN[c] > 0 else DENSITY_HALF - 1 - cells
            ii = cells + DENSITY_HALF if I_SIGN[c] > 0 else DENSITY_HALF - 1 - cells
            density[n][np.ix_(gi, ii)] += quad
            post_hist = hist[n, c, 0]
            drawn = rng.choice(N_BINS, size=min(samples, int(count[n, c])), replace=True,
                               p=post_hist / post_hist.sum()) if count[n, c] else np.zeros(0, int)
            sample_bins.append(list(drawn) + [-1] * (samples - len(drawn)))
            bands = []
            for r in range(N_BANDS):
                in_band = np.where(BAND_OF_BIN == r, post_hist, 0)
                m = min(band_samples, int(in_band.sum()))
                drawn = rng.choice(N_BINS, size=m, p=in_band / in_band.sum()) if m else np.zeros(0, int)
                bands += list(drawn) + [-1] * (band_samples - m)
            band_bins.append(bands)
        for group, bins, shape in (("samples", sample_bins, (samples,)), ("bands", band_bins, (N_BANDS, band_samples))):
            ex = _examples(rng, lengths, before, after, act_fn, bins)
            for name, a in ex.items():
                if name == "value":
                    a = a.reshape((C, H) + shape)
                elif name in ("doc", "pos"):
                    a = a.reshape((C,) + shape)
                else:
                    a = a.reshape((C,) + shape + (a.shape[-1],))
                parts.setdefault(f"{group}_{name}", []).append(a)
    return {"hist": hist, "density": density, **{k: np.stack(v) for k, v in parts.items()}}


def vocab_arrays(rng: np.random.Generator, layers: int, d_mlp: int, K: int, V: int) -> tuple[np.ndarray, np.ndarray]:
    """``vocab/token`` and ``vocab/score`` [layers, d_mlp, 3, 2, K]: distinct non-BOS tokens per
    (weight, direction) where the vocabulary has enough, top scores positive and descending, bottom scores negative and ascending."""
    shape = (layers, d_mlp, len(VOCAB_WEIGHTS), len(VOCAB_DIRECTIONS), K)
    token = np.zeros(shape, np.int32)
    for idx in np.ndindex(shape[:3]):
        token[idx] = rng.choice(np.arange(1, V) if V > 1 else [0], size=(2, K), replace=V - 1 < 2 * K)
    top = -np.sort(-rng.gamma(2.0, 0.5, size=shape[:3] + (K,)), axis=-1)
    score = np.stack([top, -top[..., ::-1][..., ::-1] * rng.uniform(0.5, 1.5)], axis=3).astype(np.float32)
    return token, score


def set_attrs(path: Path, **attrs) -> None:
    """Change root attributes (provenance) of a written file."""
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def stage_early_list(path: Path, *, positions: Sequence[int], bos: float = 60.0, sink: float = 20.0,
                     values: Sequence[float] | None = None, layer: int = 0, neuron: int = 0, case: int = 0,
                     hook: int = 0) -> None:
    """One list of examples at chosen positions, as models with attention sinks give them: gate = in = 1
    on ordinary tokens, ``bos`` on each document's BOS, and ``sink`` at position 1 of the first example only."""
    with h5py.File(path, "a") as f:
        before = int(f.attrs["context_before"])
        W = f["top/gate"].shape[-1]
        pos = np.asarray(positions, dtype=np.int32)
        doc = np.arange(len(pos), dtype=np.int32)
        lengths = np.diff(f["corpus/doc_offsets"][...])[doc]
        assert (pos < lengths).all(), "documents too short for these positions"
        t = pos[:, None] + np.arange(-before, W - before)
        inside = (t >= 0) & (t < lengths[:, None])
        g = np.where(inside, 1.0, np.nan)
        g[t == 0] = bos
        g[0, (t[0] == 1)] = sink
        sel = (layer, neuron, case, hook, slice(0, len(pos)))
        staged = [("top/gate", g), ("top/in", g), ("top/pos", pos), ("top/doc", doc)]
        if values is not None:
            staged.append(("top/value", np.asarray(values, dtype=np.float32)))
        for name, new in staged:
            data = f[name][...]
            data[sel] = new
            f[name][...] = data


def _neuron_arrays(rng, drng, d_mlp: int, k: int, before: int, after: int, docs, lengths: np.ndarray, n_tokens: int,
                   act_fn: str, distributions: bool, samples: int, band_samples: int) -> dict:
    """One layer's (or expert's) arrays for ``write_neurons``, its case counts summing to ``n_tokens`` at most."""
    W = before + 1 + after
    C = H = 4
    g_sign = np.array([1, 1, -1, -1], dtype=np.float32)[:, None, None]
    i_sign = np.array([1, -1, 1, -1], dtype=np.float32)[:, None, None]
    share = rng.dirichlet(np.ones(C), size=d_mlp)
    count = np.floor(share * n_tokens).astype(np.int64)
    mag = rng.gamma(2.0, 1.0, size=(d_mlp, C, H)).astype(np.float32)
    top_doc = np.full((d_mlp, C, H, k), -1, dtype=np.int32)
    top_pos = np.full((d_mlp, C, H, k), -1, dtype=np.int32)
    n_fill = min(k, len(docs))
    for n in range(d_mlp):
        for c in range(C):
            for h in range(H):
                chosen = rng.choice(len(docs), size=n_fill, replace=False)
                top_doc[n, c, h, :n_fill] = chosen
                top_pos[n, c, h, :n_fill] = [int(rng.integers(1, lengths[d])) if lengths[d] > 1 else 0
                                             for d in chosen]
    gate = rng.normal(size=(d_mlp, C, H, k, W)).astype(np.float32)
    in_ = rng.normal(size=(d_mlp, C, H, k, W)).astype(np.float32)
    centre = before
    gate[..., centre] = np.abs(gate[..., centre]) * g_sign * 2
    in_[..., centre] = np.abs(in_[..., centre]) * i_sign * 2
    # NaN outside each document.
    t = top_pos[..., None] + np.arange(-before, after + 1)
    inside = (top_doc[..., None] >= 0) & (t >= 0) & (t < lengths[np.clip(top_doc, 0, None)][..., None])
    gate[~inside] = np.nan
    in_[~inside] = np.nan
    swish = act_values(gate[..., centre], act_fn).astype(np.float32)
    hooks = np.stack([swish[:, :, 0] * in_[:, :, 0, :, centre], in_[:, :, 1, :, centre],
                      gate[:, :, 2, :, centre], swish[:, :, 3]], axis=2)
    order = np.argsort(-np.abs(hooks), axis=-1, kind="stable")
    top_value = np.take_along_axis(hooks, order, -1).astype(np.float32)
    top_value[top_doc < 0] = np.nan
    signs = np.stack([g_sign * i_sign, i_sign, g_sign, g_sign], axis=1)[..., 0]  # [C, H, 1]
    extra = (distribution_arrays(drng, count, mag, lengths, before, after, act_fn, samples, band_samples)
             if distributions else {})
    return {
        **extra,
        "count": count,
        "nonfinite": np.zeros(count.shape[:-1] + (count.shape[-1] + 1,), np.int64),
        "sum": (mag * count[..., None] * 0.3 * signs[None, :, :, 0]).astype(np.float64),
        "min": (np.where(signs[None, :, :, 0] > 0, 0.01, -mag * 3)).astype(np.float32),
        "max": (np.where(signs[None, :, :, 0] > 0, mag * 3, -0.01)).astype(np.float32),
        "top_value": top_value,
        "top_doc": np.take_along_axis(top_doc, order, -1),
        "top_pos": np.take_along_axis(top_pos, order, -1),
        "top_gate": np.take_along_axis(gate, order[..., None], 3),
        "top_in": np.take_along_axis(in_, order[..., None], 3),
    }
