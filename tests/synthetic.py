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
from mkdocs_gluscope.store import ActivationsWriter

DEFAULT_VOCAB = ["<s>"] + [f" w{i}" for i in range(1, 300)]


def write_synthetic(path: Path, *, layers: int = 2, d_mlp: int = 8, k: int = 4, before: int = 3, after: int = 1,
                    vocab: Sequence[str] = DEFAULT_VOCAB, docs: Sequence[Sequence[int]] | None = None,
                    titles: Sequence[str] | None = None, seed: int = 0, model: str = "synthetic/tiny",
                    layer_ids: Sequence[int] | None = None, dataset: str = "synthetic corpus", act_fn: str = "silu",
                    nonfinite: np.ndarray | None = None) -> Path:
    """``nonfinite`` ([layers, d_mlp, 5] int64): ``stats/nonfinite`` (default: none anywhere)."""
    rng = np.random.default_rng(seed)
    if docs is None:
        docs = [[0] + list(rng.integers(1, len(vocab), size=int(rng.integers(3, 40)))) for _ in range(max(k * 3, 12))]
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tokens = int(lengths.sum() - len(docs))
    W = before + 1 + after
    C = H = 4
    attrs = {"model": model, "dataset": dataset, "n_docs": len(docs), "dtype": "float32",
             "act_fn": act_fn, "include_bos": False, "has_bos": True, "refactor_glu": True,
             "layers": list(layer_ids) if layer_ids is not None else list(range(layers))}
    with ActivationsWriter(path, n_layers=layers, d_mlp=d_mlp, k=k, context_before=before, context_after=after,
                           attrs=attrs) as w:
        w.write_corpus(np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]), offsets, list(vocab),
                       doc_title=titles)
        g_sign = np.array([1, 1, -1, -1], dtype=np.float32)[:, None, None]
        i_sign = np.array([1, -1, 1, -1], dtype=np.float32)[:, None, None]
        for layer in range(layers):
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
            w.write_layer(layer, {
                "count": count,
                "nonfinite": (np.zeros(count.shape[:-1] + (count.shape[-1] + 1,), np.int64) if nonfinite is None
                              else np.asarray(nonfinite[layer], dtype=np.int64)),
                "sum": (mag * count[..., None] * 0.3 * signs[None, :, :, 0]).astype(np.float64),
                "min": (np.where(signs[None, :, :, 0] > 0, 0.01, -mag * 3)).astype(np.float32),
                "max": (np.where(signs[None, :, :, 0] > 0, mag * 3, -0.01)).astype(np.float32),
                "top_value": top_value,
                "top_doc": np.take_along_axis(top_doc, order, -1),
                "top_pos": np.take_along_axis(top_pos, order, -1),
                "top_gate": np.take_along_axis(gate, order[..., None], 3),
                "top_in": np.take_along_axis(in_, order[..., None], 3),
            })
        w.write_weights({
            "flipped": rng.random((layers, d_mlp)) < 0.3,
            "cos_gate_in": rng.uniform(0, 0.5, (layers, d_mlp)).astype(np.float32),
            "cos_gate_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
            "cos_in_out": rng.uniform(-0.3, 0.3, (layers, d_mlp)).astype(np.float32),
        })
        w.close(n_tokens=n_tokens)
    return path


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
