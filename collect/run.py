"""The collection run: one pass of the model over the corpus, statistics on the device, one file.

Robustness: the state is checkpointed atomically every ``checkpoint_every`` seconds and on Ctrl-C
or SIGTERM (at the end of the batch in flight, so a checkpoint always holds whole batches);
``resume`` continues from it and gives the same file as an uninterrupted run. A checkpoint
remembers the options and a fingerprint of the tokenized corpus, so it is never resumed over
other documents. The file itself is written to ``OUT.tmp`` and renamed, so a file at ``OUT`` is
always complete.

The jobs around the loop live in their own modules: the options and their checks (``config``),
Ctrl-C and SIGTERM (``interrupt``), checkpoints (``checkpoint``), the compiled statistics and their
guard (``compiled``), the memory plan (``memory``), and the file's arrays and provenance (``output``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from collect import distributed
from collect.allocator import keep_freed_memory
from collect.checkpoint import CheckpointWriter, load_checkpoint
from collect.batch import Batch, Flags, LayerPaths
from collect.compiled import use_own_compile_cache
from collect.config import (CollectConfig, RunFacts, check_config, check_positions, expert_key, experts_key,
                            resolve_experts, resolve_layers, shard_batches, state_sizes)
from collect.corpus import Corpus, read_texts, tokenize_corpus
from collect.distributed import FailFast, World, add_into_rank0, any_rank, broadcast_object, merge_into_rank0
from collect.effects import FINAL_SCALE_KEY, final_scale_hook, share_final_scales, start_final_scales
from collect.interrupt import Interrupted, StopOnSignal
from collect.memory import PackedLength, check_state_fits, keep_hooks, out_of_memory_hint
from collect.model import LoadedModel, dtype_name, load_model, max_positions, run_with_mlp_hooks
from collect.moe import PackBuffers, pack_experts
from collect.output import write_activations
from collect.stats import LayerStats, Packing, state_window_dtype
from mkdocs_gluscope.distributions import EMPTY_PRIORITY, document_pieces, position_priority
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import SHARED

__all__ = ["CollectConfig", "Interrupted", "collect", "collect_statistics"]


def collect(config: CollectConfig, *, stop_after_batches: int | None = None) -> Path:
    """Run a whole collection and write ``config.out``. Returns its path.

    Under torchrun every process runs this; they share the batches and rank 0 writes the file
    (:mod:`collect.distributed`)."""
    check_config(config)
    use_own_compile_cache()
    keep_freed_memory()  # the hooks' memory reused from layer to layer, not faulted in again
    world, device = distributed.init(config.device)
    try:
        with FailFast(world, clean=(Interrupted,)).guard() as fail_fast:
            path = _collect(config, world, device, stop_after_batches=stop_after_batches, fail_fast=fail_fast)
    except Interrupted:  # every rank stopped at the same batch, after a checkpoint
        distributed.finish(world)
        raise
    distributed.finish(world)
    return path


def _collect(config: CollectConfig, world: World, device: str, *, stop_after_batches: int | None,
             fail_fast: FailFast | None = None) -> Path:
    started = time.monotonic()
    # Only the requested layers are located (and refactored): --layers can pick the layers we can record.
    loaded, facts = load_model(config.model, dtype=config.dtype, device=device,
                               refactor=config.refactor_glu, engine=config.engine, layers=config.layers)
    layers = resolve_layers(config.layers, loaded.n_layers)
    experts = resolve_experts(config.experts, loaded)
    if config.experts is not None and not loaded.moe:
        raise GluscopeError(f"--experts {','.join(map(str, config.experts))}: the requested layers have no experts "
                            "(no mixture-of-experts layer among them)")
    dense_layers = [layer for layer in layers if layer not in loaded.moe]
    texts = read_texts(config.dataset, text_column=config.text_column, split=config.split, seed=config.seed)
    corpus = tokenize_corpus(texts, loaded.tokenizer, max_tokens=config.max_tokens,
                             max_doc_tokens=config.max_doc_tokens, long_docs=config.long_docs, bos=config.bos)
    check_positions(corpus, max_positions(loaded.hf_model), config.max_doc_tokens)
    plan = check_state_fits(loaded, layers, config, experts)
    if config.progress and world.is_main:
        print(f"gluscope: {plan}", file=sys.stderr, flush=True)
    run_facts = RunFacts(dtype=dtype_name(loaded.dtype), corpus_sha256=corpus.sha256())
    if not distributed.all_equal(world, dataclasses.asdict(run_facts)):
        raise GluscopeError("the torchrun processes disagree on the tokenized corpus or the dtype; give every "
                            "node the same dataset files, model and torch version")
    routed: dict[str, torch.Tensor] = {}
    states = collect_statistics(loaded, corpus, config, layers, stop_after_batches=stop_after_batches,
                                facts=run_facts, world=world, experts=experts, routed=routed, fail_fast=fail_fast)
    if not world.is_main:
        return config.out  # rank 0 writes the file
    path = write_activations(config, loaded, corpus, facts, states, routed, dense_layers, experts,
                             world_size=world.size, elapsed_s=time.monotonic() - started)
    config.checkpoint_path.unlink(missing_ok=True)
    return path


def collect_statistics(
    loaded: LoadedModel,
    corpus: Corpus,
    config: CollectConfig,
    layers: list[int],
    *,
    stop_after_batches: int | None = None,
    facts: RunFacts | None = None,
    world: World | None = None,
    experts: dict[int, list[int | str]] | None = None,
    routed: dict[str, torch.Tensor] | None = None,
    fail_fast: FailFast | None = None,
) -> dict[int | str, LayerStats]:
    """Run the model over every batch of the corpus and return each layer's statistics (on rank 0
    of a torchrun collection: the merge of every rank's; on other ranks: empty): dense layers by
    number; for the mixture-of-experts layers, the routed experts in ``experts`` (see
    :func:`resolve_experts`) as one wide layer by :func:`experts_key` (expert after expert) and a
    shared expert by :func:`expert_key`, with the tokens routed to each added to ``routed`` (a
    ``[experts]`` tensor for the routed ones). ``fail_fast``: under torchrun, the guard that ends
    this rank when another fails (:class:`collect.distributed.FailFast`).

    Each layer-batch takes the fastest exact path of its device (:mod:`collect.batch`); a MoE layer's
    routed experts run there as one wide layer over their packed tokens. On a CPU the kernel (dense
    layers and shared experts), or the compiled code checked at once; on a GPU nothing in the layer
    loop waits for the device: a layer-batch whose fast statistics are unusable (a NaN or inf where
    the fast path assumes finite values, more changed lists or example candidates than the
    capacities, more of an expert's tokens in a document than the packed length) leaves those
    statistics unchanged, decided on the device, and after the batch's forward pass one host sync
    reads every flag; the rare flagged dense layers are then computed again, exactly, from the hooks
    kept for them where memory allows (:func:`collect.memory.keep_hooks`), else by a second forward
    pass of those layers (flagged experts always by a second forward pass: their packed tokens may
    not all have fit). On a CPU, where a sync costs nothing, capacities and packed lengths are exact.
    """
    world = world or World()
    experts = resolve_experts(None, loaded) if experts is None else experts  # default: every expert
    routed = routed if routed is not None else {}
    facts = facts or RunFacts(dtype=dtype_name(loaded.dtype), corpus_sha256=corpus.sha256())
    device = loaded.device
    window = config.context_before + 1 + config.context_after
    window_dtype = state_window_dtype(config.window_dtype, loaded.dtype)
    batches = shard_batches(corpus, config.batch_tokens, config.shard)

    sizes = state_sizes(loaded, layers, experts)
    paths = LayerPaths(device, loaded.d_mlp, config.compile)

    def empty(key: int | str) -> LayerStats:
        # The GPU's path keeps the top-k windows in host memory (stats.WindowWrites).
        return LayerStats.empty(sizes[key], config.k, window, device, window_dtype, config.samples,
                                config.band_samples, windows_on_host=paths.deferred)

    start = 0
    states: dict[int | str, LayerStats] = {key: empty(key) for key in sizes}
    for layer, chosen in experts.items():
        n_routed = sum(1 for e in chosen if e != SHARED)
        if n_routed:
            routed[experts_key(layer)] = torch.zeros(n_routed, dtype=torch.int64, device=device)
        if SHARED in chosen:
            routed[expert_key(layer, SHARED)] = torch.zeros((), dtype=torch.int64, device=device)
    if config.resume:
        restored = load_checkpoint(config, device, facts, windows_on_host=paths.deferred) if world.is_main else None
        start = broadcast_object(world, restored[0] if restored is not None else 0)
        if restored is not None:
            states = restored[1]
            routed.update({key: value.to(device) for key, value in restored[2].items()})
            print(f"gluscope: resuming from {config.checkpoint_path} after {start}/{len(batches)} batches",
                  file=sys.stderr)
    keep = keep_hooks(loaded, [layer for layer in layers if layer not in loaded.moe], config, paths.deferred)
    final_norm = start_final_scales(loaded, corpus, routed, device) if config.effects else None
    sampling = _Sampling.of(corpus, config) if config.samples > 0 else None
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    first_counted = config.counted_from(corpus.has_bos)
    lengths_all = corpus.lengths
    packed_length = {layer: PackedLength(device) for layer in experts}
    pack_buffers = PackBuffers()
    checkpoints = CheckpointWriter()
    if fail_fast is not None:  # another rank's failure ends this process: finish the checkpoint in flight first
        fail_fast.on_abort.append(checkpoints.wait)

    from tqdm.auto import tqdm

    def tokens(batch_indices: range) -> int:
        return int(sum(lengths_all[batches[i].docs].sum() for i in batch_indices))

    total = tokens(range(len(batches)))
    last_checkpoint = time.monotonic()
    # Rounds: in round r, rank i takes batch start + r * N + i; the batches before a round's start
    # are done by every rank, so a checkpoint holds whole rounds and resumes with any number of ranks.
    n_rounds = -(-(len(batches) - start) // world.size)
    # The signal handlers are in place before the bar shows: once progress shows, SIGTERM checkpoints.
    with StopOnSignal() as ctrl_c, out_of_memory_hint(config), _gc_spares_the_model():
        bar = tqdm(total=total, initial=tokens(range(start)), unit="tok", unit_scale=True,
                   disable=not (config.progress and world.is_main), desc="collect", dynamic_ncols=True)
        for round_ in range(n_rounds):
            first_of_round = start + round_ * world.size
            index = first_of_round + world.rank
            if index < len(batches):
                _run_batch(loaded, corpus, batches[index], layers, states, config, paths, keep, pad_id,
                           first_counted, device, experts, routed, sampling, packed_length, final_norm, pack_buffers)
            finished = min(first_of_round + world.size, len(batches))
            bar.update(tokens(range(first_of_round, finished)))
            stop, due = any_rank(world, [
                ctrl_c.requested or (stop_after_batches is not None and finished >= stop_after_batches),
                world.is_main and time.monotonic() - last_checkpoint > config.checkpoint_every], device)
            if finished < len(batches) and (stop or due):
                states = merge_into_rank0(world, states, empty)
                _share_routed(world, routed)
                if world.is_main:
                    checkpoints.save(config.checkpoint_path, config, finished, states, facts, routed, wait=stop)
                last_checkpoint = time.monotonic()
            if stop and finished < len(batches):
                bar.close()
                checkpoints.wait()
                raise Interrupted(
                    f"stopped after {finished}/{len(batches)} batches; checkpoint written to "
                    f"{str(config.checkpoint_path)!r}; rerun the same command with --resume to continue",
                    ctrl_c.signum)
        bar.close()
        checkpoints.wait()
    _share_routed(world, routed)
    return merge_into_rank0(world, states, empty)


def _share_routed(world: World, routed: dict[str, torch.Tensor]) -> None:
    """Under torchrun: the final norm's scales shared by every rank (an elementwise maximum), the
    tokens routed to each expert summed into rank 0 (the scales must not be summed)."""
    share_final_scales(world, routed.get(FINAL_SCALE_KEY))
    routed.update(add_into_rank0(world, {k: v for k, v in routed.items() if k != FINAL_SCALE_KEY}))


def _run_batch(loaded: LoadedModel, corpus: Corpus, batch: Any, layers: list[int],
               states: dict[int | str, LayerStats], config: CollectConfig, paths: LayerPaths, keep: bool,
               pad_id: int, first_counted: int, device: torch.device,
               experts: dict[int, list[int | str]] | None = None,
               routed: dict[str, torch.Tensor] | None = None,
               sampling: "_Sampling | None" = None,
               packed_length: "dict[int, PackedLength] | None" = None, final_norm: Any = None,
               pack_buffers: PackBuffers | None = None) -> None:
    """One batch through the model, every layer's statistics updated (see collect_statistics):
    dense layers and experts by :class:`~collect.batch.LayerPaths` (a MoE layer's routed experts as one
    wide layer over their packed tokens; a flagged layer-batch of the GPU's path redone exactly
    after the batch's one host sync, a dense one from the hooks kept for it where ``keep``, else by
    a second forward pass), with the tokens routed to each expert added to ``routed``; with
    ``sampling``, the distributions too; with ``final_norm`` (:class:`collect.effects.FinalNorm`),
    the run goes on to the final norm and records its scale at every position; ``pack_buffers``: where
    each MoE layer's packed experts are written (one layer's at a time)."""
    experts = experts or {}
    routed = routed if routed is not None else {}
    packed_length = packed_length or {}
    lengths_np = corpus.lengths[batch.docs]
    ids = np.full((len(batch.docs), batch.length), pad_id, dtype=np.int64)
    for row, doc in enumerate(batch.docs):
        ids[row, : lengths_np[row]] = corpus.document(doc)
    input_ids = torch.from_numpy(ids).to(device, non_blocking=True)
    lengths = torch.from_numpy(lengths_np).to(device)
    doc_ids = torch.from_numpy(batch.docs).to(device)
    t = torch.arange(batch.length, device=device)
    valid = (t[None, :] < lengths[:, None]) & (t[None, :] >= first_counted)
    prio = (sampling.priorities(batch.docs, batch.length, lengths_np, first_counted).to(device, non_blocking=True)
            if sampling else None)
    inputs = Batch(doc_ids, lengths, valid, prio, config.context_before, config.context_after)
    flags: dict[int | str, Flags] = {}
    kept: dict[int, tuple[torch.Tensor, ...]] = {}
    longest: dict[int, torch.Tensor] = {}  # per MoE layer: the most tokens of one expert in one document

    def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor, act: torch.Tensor) -> None:
        hooks = (gate, in_, post, act)
        pending = paths.add(layer, states[layer], hooks, inputs)
        if pending is not None:
            flags[layer] = pending
            if keep:
                kept[layer] = hooks

    def add(key: str, hooks: tuple[torch.Tensor, ...], part: Batch, n_routed: torch.Tensor, exact: bool,
            packing: Packing | None = None, fits: torch.Tensor | None = None) -> None:
        if exact:
            paths.redo(states[key], hooks, part, packing=packing)
        elif (pending := paths.add(key, states[key], hooks, part, packing=packing, fits=fits)) is not None:
            flags[key] = pending
            n_routed = torch.where(pending.applied, n_routed, 0)  # counted once added (a redo counts then)
        routed[key] += n_routed

    def on_moe(layer: int, rows: Any, shared: Any, *, exact: bool = False,
               only: set[int | str] | None = None) -> None:
        # The shared expert sees every token, as a dense layer; the routed experts run as one wide
        # layer over their packed tokens (collect.moe.pack_experts), values as the experts computed them.
        moe, chosen = loaded.moe[layer], experts.get(layer, [])
        key = expert_key(layer, SHARED)
        if SHARED in chosen and shared is not None and (only is None or key in only):
            gate, in_, post = shared
            add(key, (gate, in_, post, moe.shared.act_fn(gate)), inputs, valid.sum(), exact)
        key = experts_key(layer)
        if key not in states or (only is not None and key not in only):
            return
        recorded = [e for e in chosen if e != SHARED]
        groups = torch.full((moe.n_experts,), -1, dtype=torch.long)
        groups[recorded] = torch.arange(len(recorded))
        learnt = packed_length[layer].current(batch.length) if paths.deferred and not exact else None
        packed = pack_experts(rows, valid, lengths, groups.to(device), len(recorded), learnt, pack_buffers)
        if learnt is not None:
            longest[layer] = packed.longest
        add(key, (packed.gate, packed.in_, packed.post, packed.swish),
            dataclasses.replace(inputs, valid=packed.packing.neuron_valid()), packed.routed, exact,
            packed.packing, None if learnt is None else packed.fits)

    earlier = {key: len(stats.writes or ()) for key, stats in states.items()}  # window writes of earlier batches
    with final_scale_hook(final_norm, routed, corpus.doc_offsets[batch.docs], lengths):
        run_with_mlp_hooks(loaded, input_ids, layers, on_layer, on_moe, stop_after_last=final_norm is None,
                           with_act=True)
    # The GPU's path: while the device works through this batch, the earlier batches' window writes
    # (copied already: their syncs have passed) go into the tables in host memory, in the order made.
    for key, stats in states.items():
        stats.flush_windows(earlier[key])
    # The batch's one host sync: every flag, and the most tokens one expert had in one document.
    redo, most = paths.settle(flags, len(batch.docs), list(longest.values()))
    for layer, tokens_per_doc in zip(longest, most):
        packed_length[layer].observe(int(tokens_per_doc), batch.length)
    dense_redo = [key for key in redo if isinstance(key, int)]
    expert_redo = {key for key in redo if not isinstance(key, int)}
    if keep:
        for layer in dense_redo:
            paths.redo(states[layer], kept[layer], inputs)
        dense_redo = []
    if dense_redo or expert_redo:
        def exactly(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor, act: torch.Tensor) -> None:
            if layer in dense_redo:
                paths.redo(states[layer], (gate, in_, post, act), inputs)

        redo_layers = sorted(set(dense_redo) | {int(str(key).split(".")[0]) for key in expert_redo})
        run_with_mlp_hooks(loaded, input_ids, redo_layers, exactly,
                           functools.partial(on_moe, exact=True, only=expert_redo), with_act=True)


@contextlib.contextmanager
def _gc_spares_the_model() -> Iterator[None]:
    """Python's garbage collector, during the loop, leaves the objects that exist before it alone
    (``gc.freeze``): the model, torch and transformers are a million of them, and every batch's
    tensors set off collections that walked them all (8% of a CPU run's time, perf)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class _Sampling:
    """What a run's distributions need beyond the statistics: each document's identity for the
    sampling order (its source row and which piece of it)."""

    seed: int
    sources: np.ndarray
    pieces: np.ndarray

    @classmethod
    def of(cls, corpus: Corpus, config: CollectConfig) -> "_Sampling":
        return cls(config.seed, corpus.source_index, document_pieces(corpus.source_index))

    def priorities(self, docs: np.ndarray, length: int, lengths: np.ndarray, first_counted: int) -> torch.Tensor:
        """``[B, T]`` sampling priorities of a batch's positions (EMPTY_PRIORITY where not counted)."""
        t = np.arange(length, dtype=np.int64)[None, :]
        prio = position_priority(self.seed, self.sources[docs][:, None], self.pieces[docs][:, None], t)
        return torch.from_numpy(np.where((t < lengths[:, None]) & (t >= first_counted), prio, EMPTY_PRIORITY))
