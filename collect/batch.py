"""One layer-batch into its statistics, by the fastest path that is exact on the device.

Three paths give the same statistics (the tests compare them with brute-force references, value by
value):

* **the CPU kernel** (:mod:`collect.fused`), on a CPU where it was built: one pass over the hooks,
  exact as it is (non-finite values counted apart); nothing is ever redone;
* **the torch code without host syncs**, on a GPU (``torch.compile`` makes it Triton kernels): the
  lists a batch may change and the random-example candidates it may hold are found with
  ``nonzero_static`` under capacities learnt from earlier batches; a layer-batch that needs more,
  or holds a NaN or inf where the compiled code assumes none, is left out (decided on the device)
  and redone exactly after the batch's one host sync (:meth:`LayerPaths.settle`);
* **the compiled torch code, checked at once**, on a CPU without the kernel: a sync costs nothing
  there, so a flagged layer-batch is redone right away from the tensors in hand.

The fast code (compiled, or the kernel) is checked against the eager code on a sample of every
layer's neurons, in the first batch of each padded length (:func:`collect.compiled.check_outputs`:
every output, the histograms and the example candidates included); a difference turns the rest of
the run to the eager code, with one warning line, and the layer-batch is redone.

The API takes any ``[B, T, N]`` hooks with a ``valid`` mask of ``[B, T]`` or ``[B, T, N]`` (per
neuron), so that several sets of neurons run as one wide layer: a mixture-of-experts layer's routed
experts, each over its own tokens packed to the front of each document (a :class:`Packing` says
where each slot is; the kernel reads each expert's valid slots and their priorities per expert).
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from collect import fused
from collect.compiled import (CompiledWithFallback, check_outputs, compiled_with_fallback, describe_problem,
                              fast_reduce, sample_neurons)
from collect.memory import CandidateCapacity, ListCapacity
from collect.stats import (N_CASES, N_HOOKS, BatchDistributions, BatchReduction, LayerStats, Packing,
                           compiled_histogram_batch, find_candidates, histogram_batch, reduce_batch, update_stats)
from mkdocs_gluscope.errors import GluscopeError


@dataclass
class Flags:
    """What a deferred layer-batch left on the device for the batch's one host sync."""

    applied: torch.Tensor  # bool: added; if not, it is redone exactly
    active: torch.Tensor  # int64: top-k lists it changed (sizes the next capacity)
    candidates: torch.Tensor  # int64: (position, neuron) pairs below an example list's limit
    problem: torch.Tensor  # int64: 0, or 1 + the index in compiled.CHECKED of what differed from the eager code


@dataclass
class Batch:
    """One batch's inputs shared by its layers: document rows, lengths, counted positions, priorities."""

    doc_ids: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    valid: torch.Tensor  # [B, T] (or [B, T, N] per neuron)
    prio: torch.Tensor | None  # [B, T] sampling priorities, with distributions
    context_before: int
    context_after: int


class LayerPaths:
    """Chooses and runs each layer-batch's path (see the module's docstring) and keeps what the
    paths learn across batches: capacities per layer, which (layer, length) was checked, whether
    the fast code is still trusted."""

    def __init__(self, device: torch.device, d_mlp: int, compile_: bool, *, on_gpu_path: bool | None = None) -> None:
        self.device = device
        gpu_path = on_gpu_path if on_gpu_path is not None else (device.type != "cpu" or ListCapacity.ON_CPU)
        self.kernel = device.type == "cpu" and not gpu_path and fused.available()
        self.deferred = gpu_path
        self.reduce: Callable[..., Any] = fast_reduce(compile_)
        self.histogram: Callable[..., None] = compiled_with_fallback(histogram_batch, compiled_histogram_batch,
                                                                     compile_)
        self.trusted = self.kernel or isinstance(self.reduce, CompiledWithFallback)
        self.n_lists = d_mlp * N_CASES * N_HOOKS
        self.lists: dict[Any, ListCapacity] = {}
        self.candidates: dict[Any, CandidateCapacity] = {}
        self.checked: set[tuple[Any, int]] = set()

    @property
    def fast(self) -> str:
        return "the CPU kernel's statistics" if self.kernel else "the compiled statistics"

    def _check_now(self, layer: Any, length: int) -> bool:
        if not self.trusted or (layer, length) in self.checked:
            return False
        self.checked.add((layer, length))
        return True

    def distrust(self, code: int, neurons: torch.Tensor) -> None:
        """The fast code differed from the eager code: one warning line, the eager code from now on."""
        print(describe_problem(code, neurons, self.fast), file=sys.stderr, flush=True)
        self.kernel = False
        self.trusted = False
        self.reduce = lambda *args: reduce_batch(*args, assume_finite=True)
        self.histogram = histogram_batch

    def add(self, layer: Any, stats: LayerStats, hooks: tuple[torch.Tensor, ...], batch: Batch, *,
            packing: Packing | None = None, fits: torch.Tensor | None = None) -> Flags | None:
        """Add one layer-batch (``hooks``: ``(gate, in, post, swish)``) to ``stats``. Returns the flags
        to read at the batch's sync on the deferred (GPU) path, else None: done. ``packing``: the
        hooks are packed (``batch.valid`` per neuron, ``batch.prio`` the documents'); ``fits``: a
        device bool, False where the packing left tokens out (the deferred path only: the batch is
        then not added, and must be redone from a new packing)."""
        gate, in_, post, swish = hooks
        ordered = (post, in_, gate, swish)
        length = gate.shape[1]
        check = self._check_now(layer, length)
        neurons = sample_neurons(gate.shape[-1], _seed(layer)).to(gate.device) if check else None
        dist = stats.has_distributions
        extra = dict(hooks=ordered, valid=batch.valid, prio=batch.prio) if dist else {}
        if self.kernel and fused.supports(*hooks):
            # The kernel adds the batch to the statistics' own histogram tables; the check compares
            # what it added to the checked neurons' rows. (A zeroed copy of the tables for the batch
            # alone is fresh memory, 0.23 GB an OLMoE layer: 0.1 to 0.8 s at each length's check.)
            held = (stats.hist[neurons], stats.density[neurons]) if check and dist else None
            reduced, distributions = fused.reduce_and_bin(
                stats, gate, in_, post, swish, batch.valid, prio=batch.prio, doc_ids=batch.doc_ids, packing=packing)
            if check:
                prio = (batch.prio if packing is None or batch.prio is None
                        else packing.neuron_priorities(batch.prio, neurons))
                checked = distributions
                if held is not None and distributions is not None:
                    checked = BatchDistributions(distributions.candidates, stats.hist[neurons] - held[0],
                                                 stats.density[neurons] - held[1])
                # `before`: the lists' limits, which only update_stats changes (the tables it does not read).
                code = int(check_outputs(reduced, ordered, batch.valid, neurons, exact=True, distributions=checked,
                                         tables_of_neurons=True, before=stats, prio=prio, doc_ids=batch.doc_ids))
                if code:
                    if held is not None:
                        _take_back_tables(stats, hooks, batch, packing, neurons, held)
                    self.distrust(code, neurons)
                    self.redo(stats, hooks, batch, packing=packing)
                    return None
            update_stats(stats, _at_documents(reduced, packing), batch.doc_ids, gate, in_, batch.lengths,
                         batch.context_before, batch.context_after, check_finite=True, distributions=distributions,
                         cut=fused.windows_at, merge=fused.merge_top, examples=fused.add_candidates, packing=packing,
                         **extra)
            return None
        reduced = self.reduce(gate, in_, post, swish, batch.valid)
        if not self.deferred:  # a CPU: every check read at once, a flagged batch redone from the tensors in hand
            tables = None
            if check and dist:  # this batch's histograms apart, to compare them before they count
                tables = BatchDistributions(None, torch.zeros_like(stats.hist), torch.zeros_like(stats.density))
                self.histogram(gate, in_, post, swish, batch.valid, torch.ones((), dtype=torch.int32),
                               tables.hist, tables.density)
            code = int(check_outputs(reduced, ordered, batch.valid, neurons, exact=False,
                                     distributions=tables)) if check else 0
            if code:
                self.distrust(code, neurons)
            if code or bool(reduced.suspect):
                self.redo(stats, hooks, batch, packing=packing)
                return None
            update_stats(stats, _at_documents(reduced, packing), batch.doc_ids, gate, in_, batch.lengths,
                         batch.context_before, batch.context_after, histogram=self.histogram, distributions=tables,
                         packing=packing, **extra)
            return None
        n_docs = len(batch.doc_ids)
        lists = self.lists.setdefault(layer, ListCapacity(gate.device, gate.shape[-1] * N_CASES * N_HOOKS))
        accept = ~reduced.suspect if fits is None else ~reduced.suspect & fits
        distributions = None
        found = torch.zeros((), dtype=torch.int64, device=gate.device)
        if dist:
            slots = stats.sample_key.numel() + stats.band_key.numel()
            learnt = self.candidates.setdefault(layer, CandidateCapacity(slots))
            prio = batch.prio if packing is None else packing.neuron_priorities(batch.prio)
            distributions = find_candidates(stats, ordered, batch.valid, prio, batch.doc_ids,
                                            learnt.current(n_docs), histogram=self.histogram, filling=learnt.filling)
            accept = accept & ~distributions.overflow
            found = distributions.candidate_positions
        problem = torch.zeros((), dtype=torch.int64, device=gate.device)
        if check:
            problem = check_outputs(reduced, ordered, batch.valid, neurons, exact=False,
                                    distributions=_tables_only(distributions))
            accept = accept & (problem == 0)
        applied, active = update_stats(stats, _at_documents(reduced, packing), batch.doc_ids, gate, in_, batch.lengths,
                                       batch.context_before, batch.context_after, capacity=lists.current(n_docs),
                                       accept=accept, distributions=distributions, packing=packing, **extra)
        return Flags(applied, active, found, problem)

    def settle(self, flags: dict[Any, Flags], n_docs: int,
               extra: list[torch.Tensor] | None = None) -> tuple[list[Any], list[int]]:
        """After the forward pass of a deferred batch: the batch's one host sync reads every layer's
        flags (and the ``extra`` integer scalars, e.g. packed lengths); the capacities learn from
        them. Returns the layers to redo exactly, and the values of ``extra``."""
        extra = extra or []
        if not flags and not extra:
            return [], []
        rows = [torch.stack([f.applied.long(), f.active.long(), f.candidates.long(), f.problem.long()])
                for f in flags.values()]
        read = torch.cat(rows + [torch.stack([x.long() for x in extra])] if extra else rows).tolist()
        values = [read[4 * i:4 * i + 4] for i in range(len(rows))]
        redo = []
        for layer, (applied, active, candidates, problem) in zip(flags, values):
            self.lists[layer].observe(active, n_docs)
            if layer in self.candidates:
                self.candidates[layer].observe(candidates, n_docs)
            if problem and self.trusted:
                self.distrust(problem, sample_neurons(self.n_lists // (N_CASES * N_HOOKS), _seed(layer)))
            if not applied:
                redo.append(layer)
        return redo, [int(x) for x in read[4 * len(rows):]]

    def redo(self, stats: LayerStats, hooks: tuple[torch.Tensor, ...], batch: Batch, *,
             packing: Packing | None = None) -> None:
        """Add one layer-batch exactly: every value checked, lists found with ``nonzero`` (host syncs:
        for the rare flagged layer-batch, or a path without faster code)."""
        gate, in_, post, swish = hooks
        extra = dict(hooks=(post, in_, gate, swish), valid=batch.valid, prio=batch.prio) if stats.has_distributions else {}
        update_stats(stats, _at_documents(reduce_batch(gate, in_, post, swish, batch.valid), packing), batch.doc_ids,
                     gate, in_, batch.lengths, batch.context_before, batch.context_after, check_finite=True,
                     packing=packing, **extra)


def _take_back_tables(stats: LayerStats, hooks: tuple[torch.Tensor, ...], batch: Batch, packing: Packing | None,
                      neurons: torch.Tensor, held: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Subtract from ``stats``' histogram tables what the kernel added for this layer-batch, so that
    it can be added again exactly: the same call into zeroed tables adds the same counts (the
    kernel is deterministic; ``held``, the checked neurons' rows before the batch, confirms it)."""
    gate, in_, post, swish = hooks
    tables = (torch.zeros_like(stats.hist), torch.zeros_like(stats.density))
    fused.reduce_and_bin(stats, gate, in_, post, swish, batch.valid, prio=batch.prio, doc_ids=batch.doc_ids,
                         tables=tables, packing=packing)
    stats.hist -= tables[0]
    stats.density -= tables[1]
    if not (torch.equal(stats.hist[neurons], held[0]) and torch.equal(stats.density[neurons], held[1])):
        raise GluscopeError(f"the CPU kernel ({fused.location()}) added other histogram counts to the same "
                            "layer-batch a second time, so this run's histograms cannot be trusted; delete that file "
                            "(the torch code then computes them, slower) and please report this with your CPU's name")


def _at_documents(reduced: BatchReduction, packing: Packing | None) -> BatchReduction:
    """``reduced`` with its examples' packed slots turned into document positions (after the check
    against the eager code, which compares slots)."""
    if packing is not None:
        reduced.doc_pos = packing.to_document(reduced.doc_pos)
    return reduced


def _seed(layer: Any) -> int:
    """A layer's (or an expert's key's) own offset for the neurons it checks."""
    return layer if isinstance(layer, int) else zlib.crc32(str(layer).encode())


def _tables_only(distributions: BatchDistributions | None) -> BatchDistributions | None:
    """The histogram tables of a batch's distributions, for the check (its candidates came from the
    torch code itself: nothing to compare them with)."""
    if distributions is None:
        return None
    return BatchDistributions(distributions.candidates, distributions.hist, distributions.density)
