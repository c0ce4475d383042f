"""Vocabulary projections of every neuron's weights: which tokens it writes, which tokens drive it.

Computed from the weights alone, after refactor_glu (so they follow the recorded signs), and written
to ``vocab/token`` and ``vocab/score`` ``[layer, neuron, 3, 2, K]`` (:data:`VOCAB_WEIGHTS` x
:data:`VOCAB_DIRECTIONS` x :data:`VOCAB_K`). For neuron ``n`` and token ``t``:

* ``out``: ``W_U[t] . (g_final * g_post * w_out[n])``, the logit of ``t`` added per unit of ``post``
  through the direct path, up to the positive ``1/rms`` factor of the final norm (which does not
  change the order). ``g_final`` is the final norm's elementwise scale, ``g_post`` that of a norm
  applied to the MLP's output before it joins the residual stream (OLMo-2's and Gemma-2/3's
  ``post_feedforward_layernorm``; 1 elsewhere; this ignores that such a norm also divides by the rms
  of the whole MLP output). A norm's scale is measured by applying the module to probes, so
  Gemma's ``(1 + weight)`` needs no special case; a centering norm (LayerNorm, OLMo's parameter-free
  one) also removes the mean of ``w_out`` first. Final-logit soft-capping (Gemma 2) is monotone and
  ignored; an unembedding bias does not depend on the neuron and is ignored.
* ``gate`` / ``in``: ``w_gate[n] . N(e_t)`` and ``w_in[n] . N(e_t)`` (biases left out): the value
  ``gate``/``in`` would take if the residual stream were exactly token ``t``'s embedding. ``e_t`` is
  the output of the model's embedding module (so any embedding scale it applies, e.g. Gemma's
  ``sqrt(d_model)``, is included); ``N`` is the layer's pre-MLP norm module applied as a function
  (RMSNorm, LayerNorm, Gemma's ``(1 + weight)`` alike). A model without a pre-MLP norm (OLMo-2
  normalises after the MLP) uses ``e_t`` itself.

``top`` holds the K tokens of highest score, highest first; ``bottom`` the K of lowest score, lowest
(most negative) first. Only ids below the tokenizer's length are considered: the padding rows of an
embedding matrix never appear. Scores are float32 computed from float32 copies of the weights;
equal scores order by lower token id, which also wins a tie for the last place. The work runs over
blocks of tokens and neurons on the model's device, so no ``[d_mlp, vocab]`` matrix is ever held.

Finding the modules (embedding, unembedding, final norm, each layer's ``ln2``/``ln2_post``) goes
through TransformerLens' adapter, as :mod:`collect.architectures` does for the MLPs; the math
(:func:`norm_scale`, :func:`linear_part`, :func:`extreme_tokens`) takes tensors and functions only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mkdocs_gluscope.store import VOCAB_DIRECTIONS, VOCAB_K, VOCAB_WEIGHTS

assert VOCAB_WEIGHTS == ("out", "gate", "in") and VOCAB_DIRECTIONS == ("top", "bottom")  # the order below

Norm = Callable[[torch.Tensor], torch.Tensor]
#: probe magnitude: large against every norm's eps (c^2 >> eps), exact in bfloat16 and float16
_PROBE = 64.0


@torch.no_grad()
def norm_scale(norm: Norm, d_model: int, *, dtype: torch.dtype, device: torch.device | str
               ) -> tuple[torch.Tensor, bool]:
    """The elementwise scale ``g`` [d_model] (float32) of a norm module, and whether it centres.

    For ``N(x) = g * (x - [mean x]) / sqrt(var x + eps) + b`` (RMSNorm without the mean, LayerNorm
    with it, Gemma's ``g = 1 + weight``): on a mean-zero probe ``s`` scaled by a large ``c``,
    ``N(c s) - N(0) = g * s / std(s)``. Two alternating-sign probes cover every coordinate (one
    would do for an even ``d_model``). On ``c * ones`` a centring norm gives ``N(0)`` again."""
    index = torch.arange(d_model)
    probes = []
    for shift in (0, 1):
        s = torch.where((index + shift) % 2 == 0, 1.0, -1.0)
        if d_model % 2:  # keep the probe's mean zero: one coordinate left out, a different one each time
            s[-1 if shift == 0 else 0] = 0.0
        probes.append(s)
    ones = torch.ones(d_model)
    batch = torch.stack([torch.zeros(d_model), _PROBE * probes[0], _PROBE * probes[1], _PROBE * ones])
    out = norm(batch.to(device=device, dtype=dtype)).float().cpu()
    zero = out[0]
    scale = torch.zeros(d_model)
    for row, s in zip(out[1:3], probes):
        std = s.pow(2).mean().sqrt()
        known = s != 0
        scale[known] = ((row - zero) * std / s)[known]
    flat = out[3] - zero
    centres = bool(flat.norm() <= 1e-3 * scale.norm())
    return scale.to(device), centres


def linear_part(vectors: torch.Tensor, scale: torch.Tensor, centres: bool) -> torch.Tensor:
    """A norm's linear part applied to ``vectors`` [..., d_model]: ``scale * (v - [mean v])``."""
    if centres:
        vectors = vectors - vectors.mean(dim=-1, keepdim=True)
    return vectors * scale


def out_directions(w_out: torch.Tensor, post: tuple[torch.Tensor, bool] | None,
                   final: tuple[torch.Tensor, bool] | None) -> torch.Tensor:
    """``g_final * g_post * w_out`` of every neuron, ``[N, d_model]`` float32, from ``w_out``
    ``[d_model, N]`` and the :func:`norm_scale` of the post-MLP and final norms (None: no such norm):
    its dot product with ``W_U[t]`` is the ``out`` score of token ``t`` (also each example's effect,
    :mod:`collect.effects`)."""
    out = w_out.float().T
    if post is not None:
        out = linear_part(out, *post)
    return linear_part(out, *final) if final is not None else out


def _merge(best_value: torch.Tensor, best_id: torch.Tensor, value: torch.Tensor, ids: torch.Tensor, k: int,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two candidate lists [B, *], best first; equal values by lower id."""
    value, ids = torch.cat([best_value, value], dim=1), torch.cat([best_id, ids], dim=1)
    order = ids.argsort(dim=1, stable=True)
    value, ids = value.gather(1, order), ids.gather(1, order)
    order = value.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return value.gather(1, order), ids.gather(1, order)


def _chunk_best(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row of ``scores`` [B, T] (unordered), where ties at the k-th
    value go to the lower columns: ``topk`` alone leaves that choice to the kernel."""
    if k < scores.shape[1]:
        # Usually the k-th and (k+1)-th values differ in every row: then topk's k are the ones, and
        # the caller orders them (ties inside the k by id). Only a tie across the k-th place needs more.
        values, index = scores.topk(k + 1, dim=1, largest=largest, sorted=True)
        if bool((values[:, k - 1] != values[:, k]).all()):
            return values[:, :k], index[:, :k]
    threshold = scores.topk(k, dim=1, largest=largest, sorted=True).values[:, -1:]
    better = scores > threshold if largest else scores < threshold
    tied = scores == threshold
    keep = better | (tied & (tied.cumsum(dim=1) <= k - better.sum(dim=1, keepdim=True)))
    column = torch.arange(scores.shape[1], device=scores.device)
    index = torch.where(keep, column, column + scores.shape[1]).topk(k, dim=1, largest=False).indices
    return scores.gather(1, index), index


@torch.no_grad()
def extreme_tokens(inputs: Callable[[int, int], Sequence[torch.Tensor]], weights: Sequence[torch.Tensor],
                   n_tokens: int, *, k: int = VOCAB_K, token_chunk: int = 8192, neuron_block: int = 4096
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top and bottom ``k`` tokens of ``score[n, t] = weights[j][n] . inputs(a, b)[j][t - a]``.

    ``inputs(a, b)`` gives, for tokens ``a .. b``, one float32 ``[b - a, d]`` matrix per weight
    matrix in ``weights`` (each ``[N, d]``, any dtype). Returns ``ids`` (int64) and ``scores``
    (float32), ``[N, len(weights), 2, k]``: direction 0 the highest scores, highest first;
    1 the lowest, lowest first. With fewer than ``k`` tokens the rest is id -1, score NaN.
    Memory: one ``[neuron_block, token_chunk]`` float32 score block at a time."""
    n_neurons = weights[0].shape[0]
    device = weights[0].device
    kk = min(k, n_tokens)
    token_chunk = max(token_chunk, kk)
    # Running lists, [weight, direction] -> (values [N, kk], ids [N, kk]); the placeholders lose to any token.
    best = [[(torch.full((n_neurons, kk), -torch.inf if largest else torch.inf, device=device),
              torch.full((n_neurons, kk), -1, dtype=torch.long, device=device))
             for largest in (True, False)] for _ in weights]
    for a in range(0, n_tokens, token_chunk):
        b = min(a + token_chunk, n_tokens)
        xs = inputs(a, b)
        for j, (x, w) in enumerate(zip(xs, weights)):
            for n0 in range(0, n_neurons, neuron_block):
                n1 = min(n0 + neuron_block, n_neurons)
                scores = w[n0:n1].float() @ x.T  # [block, tokens]
                for direction, largest in enumerate((True, False)):
                    top_value, top_index = _chunk_best(scores, min(kk, b - a), largest)
                    value, ids = best[j][direction]
                    value[n0:n1], ids[n0:n1] = _merge(value[n0:n1], ids[n0:n1], top_value, top_index + a,
                                                      kk, largest)
    out_ids = torch.full((n_neurons, len(weights), 2, k), -1, dtype=torch.long)
    out_scores = torch.full((n_neurons, len(weights), 2, k), float("nan"))
    for j in range(len(weights)):
        for direction in range(2):
            value, ids = best[j][direction]
            out_scores[:, j, direction, :kk] = value.cpu()
            out_ids[:, j, direction, :kk] = ids.cpu()
    return out_ids, out_scores


# ---------------------------------------------------------------------------------------------------
# The model's modules (glue)


@dataclass
class VocabModules:
    embed: torch.nn.Module  # ids -> embeddings as the model's first layer sees them
    unembed: torch.Tensor  # [vocab, d_model]
    final_norm: torch.nn.Module | None
    pre_mlp: dict[int, torch.nn.Module | None]  # by model layer
    post_mlp: dict[int, torch.nn.Module | None]
    n_tokens: int  # token ids considered: 0 .. n_tokens - 1
    names: dict[str, str]  # what each norm is, for the file's vocab_norm attribute


def find_modules(loaded: Any, layers: list[int]) -> VocabModules:
    """Embedding, unembedding and norms of a located model, through its TransformerLens adapter
    (the language tower of a multimodal model); a ValueError if a declared module is missing."""
    from collect.architectures import _sub, adapter_for

    hf = loaded.hf_model
    mapping = adapter_for(hf).component_mapping or {}

    def module(key: str, fallback: Any = None) -> Any:
        name = getattr(mapping.get(key), "name", None)
        found = _sub(hf, name) if name else fallback
        if name and found is None:
            raise ValueError(f"the adapter's {key} ({name}) is not a module of the model")
        return found

    embed = module("embed", hf.get_input_embeddings())
    unembed = module("unembed", hf.get_output_embeddings())
    final = module("ln_final")
    if embed is None or unembed is None:
        raise ValueError("no embedding or unembedding found")
    blocks = mapping["blocks"]
    stack = _sub(hf, blocks.name)
    pre: dict[int, Any] = {}
    post: dict[int, Any] = {}
    names = {"final": getattr(mapping.get("ln_final"), "name", "none"), "pre": "none", "post": "none"}
    for key, into in (("ln2", pre), ("ln2_post", post)):
        sub = blocks.submodules.get(key)
        for layer in layers:
            into[layer] = _sub(stack[layer], sub.name) if sub is not None else None
            if sub is not None and into[layer] is None:
                raise ValueError(f"layer {layer}'s {key} ({sub.name}) is not a module of the model")
        if sub is not None:
            names["pre" if key == "ln2" else "post"] = sub.name
    n_tokens = min(len(loaded.tokenizer), embed.weight.shape[0], unembed.weight.shape[0])
    return VocabModules(embed=embed, unembed=unembed.weight, final_norm=final, pre_mlp=pre, post_mlp=post,
                        n_tokens=n_tokens, names=names)


def describe(names: dict[str, str]) -> str:
    """The file's ``vocab_norm`` attribute: how the norms entered the scores."""
    post = f" * g({names['post']})" if names["post"] != "none" else ""
    final = f"g({names['final']})" if names["final"] != "none" else "1"
    pre = f"{names['pre']}(e_t)" if names["pre"] != "none" else "e_t (no pre-MLP norm)"
    return (f"out: W_U[t] . ({final}{post} * w_out), g = a norm's elementwise scale (mean removed first "
            f"for a centring norm); gate, in: w . {pre}, e_t = the embedding module's output")


@torch.no_grad()
def vocab_projections(loaded: Any, rows: list[tuple[int, Any]], *, k: int = VOCAB_K, token_chunk: int = 8192,
                      neuron_block: int = 4096) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``vocab/token`` and ``vocab/score`` ``[len(rows), d_mlp, 3, 2, k]`` of ``rows``, each a model
    layer and a set of its gated neurons (:class:`collect.architectures.GatedMLP`: a dense layer's
    MLP or an expert), of a prepared model, and the root attributes describing them."""
    layers = sorted({layer for layer, _ in rows})
    m = find_modules(loaded, layers)
    device, dtype, d_model = m.unembed.device, m.unembed.dtype, m.unembed.shape[1]
    final = norm_scale(m.final_norm, d_model, dtype=dtype, device=device) if m.final_norm is not None else None
    post_scales = {layer: norm_scale(m.post_mlp[layer], d_model, dtype=dtype, device=device)
                   for layer in layers if m.post_mlp[layer] is not None}
    shape = (len(rows), rows[0][1].d_mlp, len(VOCAB_WEIGHTS), len(VOCAB_DIRECTIONS), k)
    token, score = np.empty(shape, dtype=np.int32), np.empty(shape, dtype=np.float32)
    for row, (layer, mlp) in enumerate(rows):
        # out: the direction each neuron writes, [N, d_model], through the post-MLP norm, then the final norm.
        out = out_directions(mlp.w_out, post_scales.get(layer), final)

        def inputs(a: int, b: int, pre: Any = m.pre_mlp[layer]) -> list[torch.Tensor]:
            embedded = m.embed(torch.arange(a, b, device=device))
            x = (pre(embedded) if pre is not None else embedded).float()
            return [m.unembed[a:b].float(), x, x]

        ids, scores = extreme_tokens(inputs, [out, mlp.w_gate, mlp.w_in], m.n_tokens, k=k,
                                     token_chunk=token_chunk, neuron_block=neuron_block)
        token[row], score[row] = ids.numpy(), scores.numpy()  # weights in VOCAB_WEIGHTS order
    attrs = {"vocab_k": k, "vocab_tokens": m.n_tokens, "vocab_norm": describe(m.names)}
    return token, score, attrs


def file_vocab(loaded: Any, dense_layers: list[int], experts: dict[int, list[int | str]]
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """``vocab/`` of every group of a collection's file (``""`` the dense layers in ``dense_layers``
    order, ``experts``/``shared_experts`` in the rows order of ``collect.output.write_experts``) and the
    root attributes; nothing, with a warning, where the model's modules are not where its adapter
    says (the statistics do not need them)."""
    from mkdocs_gluscope.store import SHARED

    groups = {"": [(layer, loaded.mlps[layer]) for layer in dense_layers]}
    for group, shared in (("experts", False), ("shared_experts", True)):
        groups[group] = [(layer, loaded.moe[layer].shared if e == SHARED else loaded.moe[layer].experts[e])
                         for layer, chosen in experts.items() for e in chosen if (e == SHARED) == shared]
    out, attrs = {}, {}
    try:
        for group, rows in groups.items():
            if rows:
                token, score, attrs = vocab_projections(loaded, rows)
                out[group] = (token, score)
    except ValueError as e:
        print(f"gluscope: no vocab/ in this file: {e}", file=sys.stderr)
        return {}, {}
    return out, attrs
