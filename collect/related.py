"""Related neurons by weights: which later neurons read what a neuron writes, which write alike.

A neuron adds ``post * w_out`` to the residual stream. A later layer's MLP reads the stream through
its pre-MLP norm ``N(x) = g * (x - [mean x]) * s + b`` (RMSNorm without the mean), so the direct path
changes that layer's neuron ``m``'s gate by ``post * s * score`` with

    score = w_gate[m] . (g * (v - [mean v])) = C(g * w_gate[m]) . v,   v = N_post(w_out[n])

(``C`` removes the mean, for a centring norm only; ``N_post`` is the linear part of a norm on the
MLP's output, OLMo-2's and Gemma-2/3's, the identity elsewhere; the same for ``in`` with ``w_in``).
``s > 0``, so the sign of ``post * score`` says which way the gate moves: a neuron whose case has
``post > 0`` feeds the gate+ side of the later neurons with the highest scores and the gate- side of
those with the lowest; a case with ``post < 0`` the other way round. Scores use the weights after
refactor_glu, as the file records them: flipping a neuron negates its ``w_out`` (so its scores, and
its post) and a later neuron's ``w_in`` (so its ``in`` scores), and which case a neuron feeds follows.
``s`` (the later layer's 1/rms at a position) and attention in between are left out: the lists rank
later neurons of all later layers by the raw score.

Same layer: the neurons whose ``w_out`` is most alike (highest cosine) and most opposite (lowest).

The top-k selection is :func:`collect.vocab.extreme_tokens` (blocks of sources x targets, one score
block in memory at a time, ties to the lower index), with later neurons in place of tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from collect.vocab import extreme_tokens, find_modules, linear_part, norm_scale

#: Later neurons per list (each of gate/in x top/bottom), and same-layer neurons per list.
RELATED_K = 10


def _reads(w: torch.Tensor, scale: torch.Tensor | None, centres: bool) -> torch.Tensor:
    """``C(g * w)`` [N, d] float32: what a later neuron's ``w`` reads from the residual stream."""
    out = w.float() if scale is None else w.float() * scale
    return out - out.mean(dim=-1, keepdim=True) if centres else out


@torch.no_grad()
def related_by_weights(loaded: Any, layers: list[int], *, k: int = RELATED_K, target_chunk: int = 8192,
                       source_block: int = 4096, progress: Callable[[int], None] | None = None
                       ) -> dict[str, np.ndarray]:
    """``related/`` arrays of the weights part for ``layers`` (model layers, ascending, dense, of a
    prepared model): ``feeds_layer``/``feeds_neuron`` int32 and ``feeds_score`` float32 ``[L, N, 2, 2, k]``
    (axis 2: the later neuron's gate, in; axis 3: highest scores first, lowest first; over the later
    layers among ``layers``) and ``alike_neuron`` int32 / ``alike_score`` float32 ``[L, N, 2, k]``
    (cosine of ``w_out`` in the same layer: highest, lowest); -1 and NaN where a list has no entry."""
    m = find_modules(loaded, layers)
    device, dtype, d_model = m.unembed.device, m.unembed.dtype, m.unembed.shape[1]
    N = loaded.d_mlp
    pre = {layer: norm_scale(m.pre_mlp[layer], d_model, dtype=dtype, device=device) if m.pre_mlp[layer] is not None
           else (None, False) for layer in layers}
    L = len(layers)
    feeds_layer = np.full((L, N, 2, 2, k), -1, np.int32)
    feeds_neuron = np.full((L, N, 2, 2, k), -1, np.int32)
    feeds_score = np.full((L, N, 2, 2, k), np.nan, np.float32)
    alike_neuron = np.full((L, N, 2, k), -1, np.int32)
    alike_score = np.full((L, N, 2, k), np.nan, np.float32)
    for i, layer in enumerate(layers):
        mlp = loaded.mlps[layer]
        v = mlp.w_out.float().T  # [N, d]: what each neuron writes
        if m.post_mlp[layer] is not None:
            v = linear_part(v, *norm_scale(m.post_mlp[layer], d_model, dtype=dtype, device=device))
        later = layers[i + 1:]
        if later:
            def inputs(a: int, b: int, later: list[int] = later) -> list[torch.Tensor]:
                # targets a..b of the later layers' neurons, in layer order: their gate and in reads
                gates, ins = [], []
                for t0 in range(a - a % N, b, N):
                    target = later[t0 // N]
                    lo, hi = max(a, t0) - t0, min(b, t0 + N) - t0
                    tm = loaded.mlps[target]
                    gates.append(_reads(tm.w_gate[lo:hi], *pre[target]))
                    ins.append(_reads(tm.w_in[lo:hi], *pre[target]))
                return [torch.cat(gates), torch.cat(ins)]

            ids, scores = extreme_tokens(inputs, [v, v], len(later) * N, k=k, token_chunk=target_chunk,
                                         neuron_block=source_block)
            ids = ids.numpy()
            found = ids >= 0
            feeds_layer[i] = np.where(found, np.asarray(later)[np.clip(ids, 0, None) // N], -1)
            feeds_neuron[i] = np.where(found, ids % N, -1)
            feeds_score[i] = scores.numpy()
        unit = torch.nn.functional.normalize(mlp.w_out.float().T, dim=-1)
        ids, scores = extreme_tokens(lambda a, b: [unit[a:b]], [unit], N, k=min(k + 1, N), token_chunk=target_chunk,
                                     neuron_block=source_block)
        ids, scores = ids[:, 0].numpy(), scores[:, 0].numpy()  # [N, 2, k + 1]
        for direction in range(2):
            keep = ids[:, direction] != np.arange(N)[:, None]  # a neuron is not its own neighbour
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            chosen_ids = np.take_along_axis(ids[:, direction], order, 1)
            chosen = np.take_along_axis(keep, order, 1)
            width = chosen.shape[1]
            alike_neuron[i, :, direction, :width] = np.where(chosen, chosen_ids, -1)
            alike_score[i, :, direction, :width] = np.where(chosen, np.take_along_axis(scores[:, direction], order, 1),
                                                            np.nan)
        if progress is not None:
            progress(i + 1)
    return {"feeds_layer": feeds_layer, "feeds_neuron": feeds_neuron, "feeds_score": feeds_score,
            "alike_neuron": alike_neuron, "alike_score": alike_score}


def describe(loaded: Any, layers: list[int]) -> str:
    """The ``related_weights`` attribute: how the scores were computed, with the model's module names."""
    m = find_modules(loaded, layers[:1])
    pre = m.names["pre"] if m.names["pre"] != "none" else "no pre-MLP norm"
    post = f" through {m.names['post']}'s elementwise scale" if m.names["post"] != "none" else ""
    return (f"feeds: w_gate[m] . (g * w_out[n]) and w_in[m] . (g * w_out[n]), g = the elementwise scale of the later "
            f"layer's {pre} (mean removed first for a centring norm), w_out{post}; weights after refactor_glu; the "
            "later layer's 1/rms and attention left out. alike: cosine of w_out within the layer")


def weights_part(f: Any, model: str, *, dtype: str | None = None, device: str = "auto",
                 progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The weights part of ``related/`` for an activations file ``f`` (an open ``ActivationsFile``) from
    ``model``, loaded with the file's refactor_glu and layers; refused unless the model's weight facts
    are the file's (the same model, refactored the same way). ``dtype`` None: the file's ``dtype``,
    what the collection ran (refactor_glu decides each flip by the sign of w_gate . w_in in the
    loaded weights, so a float32 checkpoint run in bfloat16 may flip a neuron whose dot is near 0
    that float32 does not flip). Returns the arrays and root attributes."""
    from collect.model import dtype_name, load_model
    from mkdocs_gluscope.errors import GluscopeError

    if not f.layers:
        raise GluscopeError(f"{str(f.path)!r} has no dense layers; related neurons cover dense layers only")
    ran = str(f.attrs.get("dtype", "float32"))
    loaded, facts = load_model(model, dtype=dtype or ran, device=device,
                               refactor=bool(f.attrs.get("refactor_glu", True)), layers=f.layers)
    if sorted(loaded.mlps) != sorted(f.layers) or loaded.d_mlp != f.d_mlp:
        raise GluscopeError(f"--model {model!r} has {loaded.d_mlp} neurons in layers {sorted(loaded.mlps)}, but "
                            f"{str(f.path)!r} records {f.d_mlp} in layers {f.describe_layers()}")
    order = [sorted(loaded.mlps).index(layer) for layer in f.layers]
    flipped = facts["flipped"].numpy()[order]
    cosine = facts["cos_gate_in"].numpy()[order]
    if not np.array_equal(flipped, f.weights("flipped")) or not np.allclose(cosine, f.weights("cos_gate_in"),
                                                                            atol=1e-2):
        loaded_as = dtype_name(loaded.dtype)
        if loaded_as != ran:
            raise GluscopeError(f"--model {model!r} loaded in {loaded_as} gives other refactor_glu flips or "
                                f"cos(w_gate, w_in) than {str(f.path)!r}, whose collection ran in {ran}: give "
                                f"--dtype {ran} (or leave --dtype out), or another model")
        raise GluscopeError(f"--model {model!r} is not the model {str(f.path)!r} was collected from (its weights "
                            "give other refactor_glu flips or cos(w_gate, w_in)); give the same model")
    arrays = related_by_weights(loaded, list(f.layers), progress=progress)
    return arrays, {"related_weights": describe(loaded, list(f.layers))}
