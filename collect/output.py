"""From a run's statistics to the activations file: each layer's arrays as the file stores them,
the expert groups, and the provenance attributes."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collect.config import CollectConfig, expert_key, experts_key, shard_batches
from collect.effects import FINAL_SCALE_KEY, NextTokenScores, describe as describe_effects, file_final_scale
from collect.corpus import Corpus, token_strings
from collect.model import LoadedModel, dtype_name
from collect.stats import LayerStats, hist_and_density
from collect.vocab import file_vocab
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import SHARED, ActivationsWriter


def finalize(state: LayerStats, window_dtype: str) -> dict[str, np.ndarray]:
    """One layer's arrays as the file stores them."""
    empty = (state.count == 0)[..., None]
    gate, in_ = state.ordered_windows()
    nan = float("nan")
    return {
        "count": state.count.cpu().numpy(),
        "nonfinite": state.nonfinite.cpu().numpy(),
        "sum": state.sum.cpu().numpy(),
        "min": torch.where(empty, nan, state.min).cpu().numpy(),
        "max": torch.where(empty, nan, state.max).cpu().numpy(),
        "top_value": state.top_value.cpu().numpy(),
        "top_doc": state.top_doc.to(torch.int32).cpu().numpy(),
        "top_pos": state.top_pos.to(torch.int32).cpu().numpy(),
        # Through float32: numpy has no bfloat16 (the state's dtype for float32 files of bfloat16 models).
        "top_gate": gate.float().cpu().numpy().astype(window_dtype),
        "top_in": in_.float().cpu().numpy().astype(window_dtype),
        **(finalize_distributions(state, window_dtype) if state.has_distributions else {}),
    }


def finalize_distributions(state: LayerStats, window_dtype: str) -> dict[str, np.ndarray]:
    """The distributions' arrays as the file stores them (hooks before the examples' axes)."""
    hist, density = hist_and_density(state)
    out = {"hist": hist.cpu().numpy(), "density": density.cpu().numpy()}
    for prefix, group in (("sample", "samples"), ("band", "bands")):
        value = getattr(state, prefix + "_value")  # [N, C, (R,) S, H] -> [N, C, H, (R,) S]
        out.update({
            f"{group}_doc": getattr(state, prefix + "_doc").to(torch.int32).cpu().numpy(),
            f"{group}_pos": getattr(state, prefix + "_pos").to(torch.int32).cpu().numpy(),
            f"{group}_value": value.movedim(-1, 2).float().cpu().numpy(),
            f"{group}_gate": getattr(state, prefix + "_gate").float().cpu().numpy().astype(window_dtype),
            f"{group}_in": getattr(state, prefix + "_in").float().cpu().numpy().astype(window_dtype),
        })
    return out


def counted_tokens(corpus: Corpus, config: CollectConfig) -> int:
    """Counted positions of the documents this run (or shard) processes: every position from
    ``first_counted_position`` on, as the ``valid`` mask of :func:`collect_statistics`."""
    docs = np.concatenate([b.docs for b in shard_batches(corpus, config.batch_tokens, config.shard)])
    first = config.counted_from(corpus.has_bos)
    return int(np.maximum(corpus.lengths[docs] - first, 0).sum())


def provenance(config: CollectConfig, loaded: LoadedModel, corpus: Corpus, layers: list[int]) -> dict[str, Any]:
    import transformers

    from mkdocs_gluscope import __version__

    attrs = {
        "model": config.model,
        "dataset": ", ".join(config.dataset),
        "text_column": config.text_column,
        "split": config.split,
        "seed": config.seed,
        "n_docs": corpus.n_docs,
        "max_tokens": config.max_tokens,
        "max_doc_tokens": config.max_doc_tokens,
        "long_docs": config.long_docs,
        "include_bos": config.include_bos,
        "skip_positions": config.skip_positions,
        "bos": config.bos,
        "has_bos": corpus.has_bos,
        "refactor_glu": config.refactor_glu,
        "act_fn": loaded.act_fn_name,
        "dtype": dtype_name(loaded.dtype),  # what ran, e.g. bfloat16 where "auto" was asked
        "dtype_requested": config.dtype,
        "corpus_sha256": corpus.sha256(),
        "device": str(loaded.device),
        "layers": layers,
        "engine": config.engine,
        "adapter": loaded.adapter,  # the TransformerLens architecture adapter that located the MLPs
        "n_model_layers": loaded.n_layers,
        "window_dtype": config.window_dtype,
        "batch_tokens": config.batch_tokens,
        "shard": config.shard or "",
        "gluscope_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    attrs.update(loaded.definitions())
    if loaded.skipped:
        attrs["skipped_layers"] = loaded.skipped  # the model's layers without an MLP (attention, state space)
    attrs.update(config.extra_attrs)
    return attrs


def write_experts(writer: ActivationsWriter, loaded: LoadedModel, experts: dict[int, list[int | str]],
                  states: dict[int | str, LayerStats], routed: dict[str, torch.Tensor], window_dtype: str) -> None:
    """The ``experts`` and ``shared_experts`` groups: one row per recorded (layer, expert). A layer's
    routed experts were reduced as one wide layer (:func:`collect.config.experts_key`), expert after
    expert: each row is one expert's slice of it."""
    for group, shared in (("experts", False), ("shared_experts", True)):
        rows = [(layer, e) for layer, chosen in experts.items() for e in chosen if (e == SHARED) == shared]
        if not rows:
            continue
        sizes = {loaded.moe[layer].shared.d_mlp if shared else loaded.moe[layer].d_expert for layer, _ in rows}
        if len(sizes) > 1:
            raise GluscopeError(f"the recorded layers' experts differ in size ({sorted(sizes)}); record them in "
                                "separate runs with --layers")
        d = sizes.pop()
        counts, arrays = [], []
        for layer in dict.fromkeys(layer for layer, _ in rows):
            if shared:
                counts.append(int(routed[expert_key(layer, SHARED)]))
                arrays.append(finalize(states[expert_key(layer, SHARED)], window_dtype))
                continue
            wide = finalize(states[experts_key(layer)], window_dtype)
            n = [e for e in experts[layer] if e != SHARED]
            counts += routed[experts_key(layer)].tolist()
            arrays += [{name: values[g * d:(g + 1) * d] for name, values in wide.items()} for g in range(len(n))]
        writer.add_experts(group, [layer for layer, _ in rows], [-1 if shared else e for _, e in rows], counts, d)
        for row, values in enumerate(arrays):
            writer.write_neurons(row, 0, values, group=group)
        writer.write_weights({name: torch.stack([loaded.expert_facts[layer, e][name] for layer, e in rows]).numpy()
                              for name in ("flipped", "cos_gate_in", "cos_gate_out", "cos_in_out")}, group=group)


def write_activations(config: CollectConfig, loaded: LoadedModel, corpus: Corpus, facts: dict[str, torch.Tensor],
                      states: dict[int | str, LayerStats], routed: dict[str, torch.Tensor], dense_layers: list[int],
                      experts: dict[int, list[int | str]], *, world_size: int, elapsed_s: float) -> Path:
    """Write the run's file: corpus, every dense layer's statistics (rows in ``dense_layers`` order),
    the weight facts, the expert groups and the vocabulary projections; returns its path."""
    vocab_size = max(len(loaded.tokenizer), int(corpus.tokens.max()) + 1)
    attrs = provenance(config, loaded, corpus, dense_layers)
    attrs["world_size"] = world_size
    if experts:
        attrs["expert_layers"] = list(experts)
        attrs["n_experts"] = sorted({loaded.moe[layer].n_experts for layer in experts})
        attrs["n_experts_per_layer"] = [loaded.moe[layer].n_experts for layer in experts]  # as expert_layers
    # Vocabulary projections of the (refactored) weights: no corpus needed (collect.vocab).
    vocab, vocab_attrs = file_vocab(loaded, dense_layers, experts)
    attrs.update(vocab_attrs)
    attrs["elapsed_s"] = round(elapsed_s, 1)
    with ActivationsWriter(config.out, n_layers=len(dense_layers), d_mlp=loaded.d_mlp, k=config.k,
                           context_before=config.context_before, context_after=config.context_after,
                           window_dtype=config.window_dtype, attrs=attrs, samples=config.samples,
                           band_samples=config.band_samples) as writer:
        writer.write_corpus(corpus.tokens, corpus.doc_offsets, token_strings(loaded.tokenizer, vocab_size),
                            source_index=corpus.source_index, doc_title=corpus.titles)
        effects = FINAL_SCALE_KEY in routed  # each example's direct effect on the output (collect.effects)
        if effects:
            writer.add_effects(file_final_scale(routed[FINAL_SCALE_KEY]), describe_effects(loaded))
            next_scores = NextTokenScores(loaded, dense_layers)
        for row, layer in enumerate(dense_layers):
            arrays = finalize(states[layer], config.window_dtype)
            if effects:
                arrays["top_next_score"] = next_scores(layer, states[layer].top_doc, states[layer].top_pos,
                                                       corpus.tokens, corpus.doc_offsets)
            writer.write_layer(row, arrays)
        writer.write_weights({name: values.numpy() for name, values in facts.items()})  # in `layers` order
        write_experts(writer, loaded, experts, states, routed, config.window_dtype)
        for group, (token, score) in vocab.items():  # rows in the order of the datasets above
            writer.write_vocab(token, score, group=group)
        path = writer.close(n_tokens=counted_tokens(corpus, config))
    return path
