"""The CPU's statistics in one pass: the C++ kernel ``collect/_fused.cpp``, called on the hooks' memory.

``torch.compile`` fuses :func:`collect.stats.reduce_batch` into one loop, but on a CPU the
histograms and the random examples then need passes of their own, and the compiled loop computes
every case's reductions for every value. The kernel reads each value once and does all of it: the
per-document counts, sums and extremes of :func:`~collect.stats.reduce_batch` (non-finite values
counted apart, as its exact path does), the histograms (narrow counters per block of neurons,
flushed into the tables), and for each random-example list the batch's positions that may enter it
(:class:`Candidates`). Neurons are split among ``torch.get_num_threads()`` threads. The top-k
merge (:func:`merge_top`) and the random examples' merge (:func:`add_candidates`) run in it too,
reading values and cutting windows only for the entries that enter a list. A mixture-of-experts
layer's packed experts (:class:`~collect.stats.Packing`) take the same code: each expert's valid
slots and their sampling priorities are read per expert, its empty slots skipped, and windows cut
at document positions through the packing.

The kernel is an optional part of the install (``setup.py``); :func:`available` says whether it was
built. Without it collection runs the torch code, which gives the same values (the tests compare
both, value by value, and collection checks the kernel against it at run time:
:mod:`collect.compiled`).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import torch

from collect.stats import (N_CASES, N_HOOKS, BatchDistributions, BatchReduction, Candidates, LayerStats, Packing,
                           from_documents, list_limits)
from collect.stats import add_candidates as stats_add_candidates
from collect.stats import windows_at as stats_windows_at
from mkdocs_gluscope.distributions import N_BANDS

try:
    from collect import _fused
except ImportError:  # not built: no C++ compiler at install time, or a source checkout
    _fused = None

#: Neurons a thread reads position by position: their accumulators stay in L1, their narrow
#: histogram counters in L2 (bench/fused_kernel.py measured 32 to 128 alike on a 2-core EPYC).
BLOCK = 64


def available() -> bool:
    """Whether the C++ kernel was built with this install."""
    return _fused is not None


def location() -> str:
    """Where the kernel was loaded from (for messages)."""
    return getattr(_fused, "__file__", None) or "collect._fused"


def supports(*hooks: torch.Tensor) -> bool:
    """Whether the kernel can read these hooks: CPU tensors of one float dtype it knows, neurons
    contiguous (float16 is converted by the caller)."""
    return all(h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16, torch.float16) and h.dim() == 3
               for h in hooks)


def reduce_and_bin(stats: LayerStats, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor,
                   swish: torch.Tensor, valid: torch.Tensor, *, prio: torch.Tensor | None = None,
                   doc_ids: torch.Tensor | None = None,
                   tables: tuple[torch.Tensor, torch.Tensor] | None = None,
                   packing: Packing | None = None,
                   threads: int | None = None) -> tuple[BatchReduction, BatchDistributions | None]:
    """One layer-batch through the kernel, for :func:`collect.stats.update_stats`: its reduction
    (exact: non-finite values counted apart, ``suspect`` never set) and, where ``stats`` has
    distributions, its :class:`~collect.stats.BatchDistributions`, whose histograms the kernel has
    added to ``stats`` already (so the batch must then be added as it is), or to ``tables`` (zeroed
    ``hist`` and ``density`` of the batch alone, for a check before they count). ``gate``, ``in_``,
    ``post``, ``swish``: ``[B, T, N]``; ``valid``: ``[B, T]`` or ``[B, T, N]`` bool; ``prio``: ``[B, T]``
    sampling priorities and ``doc_ids`` ``[B]`` the rows' documents (with distributions).
    ``packing``: the hooks are packed experts (:class:`~collect.stats.Packing`): ``valid`` is then
    ignored for the packing's own (per group and slot), ``prio`` the documents' ``[B, T]``, each slot
    read at its position; the reduction's ``doc_pos`` and the candidates' ``t`` are slots."""
    group, slots = 0, None
    if packing is not None:
        valid, group, slots = packing.valid, packing.group_size, packing.filled.sum(dim=1)
        prio = packing.priorities(prio) if prio is not None else None
    if not stats.has_distributions:
        return layer_batch(gate, in_, post, swish, valid, group=group, slots=slots, threads=threads)[0], None
    limit_s, limit_b = list_limits(stats)
    hist, density = tables if tables is not None else (stats.hist, stats.density)
    reduced, candidates = layer_batch(gate, in_, post, swish, valid, hist=hist, density=density,
                                      prio=prio, doc_ids=doc_ids, sample_limit=limit_s, band_limit=limit_b,
                                      list_sizes=(stats.sample_key.shape[-1], stats.band_key.shape[-1]),
                                      group=group, slots=slots, threads=threads)
    if tables is not None:
        return reduced, BatchDistributions(candidates, hist, density)
    return reduced, BatchDistributions(candidates)


def layer_batch(gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor, swish: torch.Tensor, valid: torch.Tensor,
                *, hist: torch.Tensor | None = None, density: torch.Tensor | None = None,
                prio: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                sample_limit: torch.Tensor | None = None, band_limit: torch.Tensor | None = None,
                list_sizes: tuple[int, int] = (0, 0), group: int = 0, slots: torch.Tensor | None = None,
                threads: int | None = None) -> tuple[BatchReduction, Candidates | None]:
    """One layer-batch through the kernel. ``gate``, ``in_``, ``post``, ``swish``: ``[B, T, N]``;
    ``valid``: ``[B, T]`` or ``[B, T, N]`` bool. Returns the batch's reduction (exact: ``suspect`` is
    never set) and, with ``prio``, the random examples' candidates.

    ``hist`` ``[N, C, H, B]`` and ``density`` ``[N, C, G/2, G/2]`` (int32, the quadrant of each case):
    the histogram tables, added to in place. ``prio`` ``[B, T]`` int64, ``doc_ids`` ``[B]``: the
    positions' sampling priorities and the rows' documents; ``sample_limit`` ``[N, C]`` and
    ``band_limit`` ``[N, C, R]``: each list's last priority (a position enters only below it);
    ``list_sizes``: the lists' lengths (S, S2). ``group`` > 0: packed experts, ``group`` neurons per
    expert, ``valid`` and ``prio`` ``[B, T, G]`` (one per expert and slot); ``slots`` ``[B, G]``: each
    expert's filled slots in each document (a prefix; the kernel reads nothing past it)."""
    if _fused is None:
        raise RuntimeError("collect._fused was not built")
    hooks = [h if h.dtype != torch.float16 else h.float() for h in (post, in_, gate, swish)]
    dtype = hooks[0].dtype
    hooks = [h.to(dtype) if h.dtype != dtype else h for h in hooks]
    hooks = [h if h.stride(-1) == 1 else h.contiguous() for h in hooks]
    b, t, n = hooks[0].shape
    if group and (valid.dim() != 3 or valid.shape[-1] * group != n or (prio is not None and prio.shape != valid.shape)):
        raise ValueError(f"packed hooks of {n} neurons in groups of {group}: valid {list(valid.shape)} and prio "
                         f"{None if prio is None else list(prio.shape)} must be [B, T, {n // max(group, 1)}]")
    if slots is not None and (not group or slots.shape != (b, n // group)):
        raise ValueError(f"slots {list(slots.shape)}: expected [B, G] = [{b}, {n // max(group, 1)}] with a group size")
    valid = valid.to(torch.uint8)
    valid_strides = valid.stride() if valid.dim() == 3 else valid.stride() + (0,)
    doc_count = torch.empty(b, n, N_CASES, dtype=torch.int32)
    doc_sum, doc_max, doc_min = (torch.empty(b, n, N_CASES, N_HOOKS) for _ in range(3))
    doc_pos = torch.empty(b, n, N_CASES, N_HOOKS, dtype=torch.int64)
    nonfinite = torch.zeros(n, N_CASES + 1, dtype=torch.int64)
    candidates = None
    null = 0
    extra = [null] * 12
    S = S2 = 0
    if hist is not None:
        extra[0], extra[1] = hist.data_ptr(), density.data_ptr()
    if prio is not None:
        assert hist is not None and sample_limit is not None and band_limit is not None and doc_ids is not None
        S, S2 = list_sizes
        prio = prio.contiguous()
        doc_ids = doc_ids.to(torch.int64).contiguous()
        sample_limit, band_limit = sample_limit.contiguous(), band_limit.contiguous()
        candidates = Candidates.empty(n, S, S2)
        extra[2:] = [prio.data_ptr(), doc_ids.data_ptr(), sample_limit.data_ptr(), band_limit.data_ptr(),
                     candidates.sample_key.data_ptr(), candidates.sample_b.data_ptr(), candidates.sample_t.data_ptr(),
                     candidates.band_key.data_ptr(), candidates.band_b.data_ptr(), candidates.band_t.data_ptr()]
    pointers = [h.data_ptr() for h in hooks] + [valid.data_ptr(), doc_count.data_ptr(), doc_sum.data_ptr(),
                                                doc_max.data_ptr(), doc_min.data_ptr(), doc_pos.data_ptr(),
                                                nonfinite.data_ptr()] + extra
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
        pointers.append(slots.data_ptr())
    strides = [s for h in hooks for s in h.stride()[:2]]

    def run(n0: int, n1: int) -> None:
        _fused.layer_batch(pointers, [b, t, n, n0, n1, BLOCK, int(dtype == torch.bfloat16), *strides,
                                      *valid_strides, S, S2] + ([group] if group else []))

    threads = threads or torch.get_num_threads()
    blocks = -(-n // BLOCK)
    if threads <= 1 or blocks <= 1:
        run(0, n)
    else:
        per = -(-blocks // min(threads, blocks)) * BLOCK
        with concurrent.futures.ThreadPoolExecutor(min(threads, blocks)) as pool:
            list(pool.map(lambda n0: run(n0, min(n, n0 + per)), range(0, n, per)))
    reduced = from_documents(doc_count.long(), doc_sum, doc_max, doc_min, doc_pos, nonfinite,
                             torch.zeros((), dtype=torch.bool))
    return reduced, candidates



def windows_at(values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, neurons: torch.Tensor,
               lengths: torch.Tensor, context_before: int, context_after: int) -> torch.Tensor:
    """:func:`collect.stats.windows_at` in the kernel (one loop over the windows in the order of
    their positions, instead of tensors of indices): the same values, for CPU tensors it can read;
    otherwise the torch code."""
    if _fused is None or not supports(values) or values.stride(-1) != 1:
        return stats_windows_at(values, rows, pos, neurons, lengths, context_before, context_after)
    if values.dtype == torch.float16:
        values = values.float()
    rows, pos, neurons = (x.to(torch.int64).contiguous() for x in (rows, pos, neurons))
    lengths = lengths.to(torch.int64).contiguous()
    window = context_before + 1 + context_after
    out = torch.empty(rows.numel(), window)
    if rows.numel():
        order = torch.argsort(rows * values.shape[1] + pos)
        _fused.windows([values.data_ptr(), rows.data_ptr(), pos.data_ptr(), neurons.data_ptr(), lengths.data_ptr(),
                        order.data_ptr(), out.data_ptr()],
                       [int(values.dtype == torch.bfloat16), values.stride(0), values.stride(1), values.shape[1],
                        rows.numel(), context_before, context_after])
    return out.to(values.dtype)


#: The kernel's codes of the windows' dtypes.
_WINDOW_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def add_candidates(stats: LayerStats, candidates: Candidates, doc_ids: torch.Tensor, hooks: tuple[torch.Tensor, ...],
                   lengths: torch.Tensor, context_before: int, context_after: int, *, packing: Packing | None = None,
                   threads: int | None = None) -> None:
    """:func:`collect.stats.add_candidates` in the kernel: the same lists, values and windows, one
    loop per list with a candidate instead of tensors over them all. For a batch added as it is, of
    ``hooks`` ``(post, in, gate, swish)`` the kernel reads (:func:`supports`), the windows cut from
    their gate and in. ``packing``: the hooks are packed experts (:class:`~collect.stats.Packing`),
    the candidates' ``t`` slots; each entry keeps its document position and its windows hold the
    expert's values where it saw each position (NaN elsewhere). A build of the kernel from before
    this function (a stale ``_fused`` of an older checkout) gets the torch code."""
    if not hasattr(_fused, "examples"):
        post, in_, gate, _ = hooks
        return stats_add_candidates(stats, candidates, doc_ids, hooks, lengths, context_before, context_after,
                                    packing=packing, windows=(gate, in_), cut=windows_at)
    hooks = [h if h.dtype != torch.float16 else h.float() for h in hooks]
    if len({h.dtype for h in hooks}) > 1:
        hooks = [h.float() for h in hooks]
    hooks = [h if h.stride(-1) == 1 else h.contiguous() for h in hooks]
    doc_ids = doc_ids.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    sizes = [int(hooks[0].dtype == torch.bfloat16)] + [s for h in hooks for s in h.stride()[:2]] + [hooks[0].shape[1]]
    packed_pointers, packed_sizes = [], []
    if packing is not None:  # each slot's document position and each position's slot, per group
        positions = packing.positions.to(torch.int64).contiguous()
        inverse = packing.inverse.to(torch.int64).contiguous()
        packed_pointers = [positions, inverse]
        packed_sizes = [packing.group_size, inverse.shape[2], inverse.shape[1]]
    for prefix, per_neuron in (("sample", N_CASES), ("band", N_CASES * N_BANDS)):
        lists = [getattr(stats, f"{prefix}_{name}") for name in ("key", "doc", "pos", "value", "gate", "in")]
        found = [getattr(candidates, f"{prefix}_{name}").contiguous() for name in ("key", "b", "t")]
        assert all(x.is_contiguous() for x in lists), prefix
        size = lists[0].shape[-1]
        n_lists = lists[0].numel() // size
        pointers = [x.data_ptr() for x in lists + found + [doc_ids, lengths] + hooks + packed_pointers]
        head = [_WINDOW_KINDS[lists[4].dtype]] + sizes + [size, per_neuron, context_before, context_after]

        def run(l0: int, l1: int) -> None:
            _fused.examples(pointers, head + [l0, l1] + packed_sizes)

        _split(run, n_lists, threads)


def _split(run: Callable[[int, int], Any], n_lists: int, threads: int | None) -> list[Any]:
    """``run(l0, l1)`` over ``[0, n_lists)``, the lists split among ``threads`` threads (default:
    torch's) where there are enough of them; returns each part's result."""
    threads = threads or torch.get_num_threads()
    if threads <= 1 or n_lists < 1024:
        return [run(0, n_lists)]
    per = -(-n_lists // threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda l0: run(l0, min(n_lists, l0 + per)), range(0, n_lists, per)))


def merge_top(stats: LayerStats, batch: BatchReduction, doc_ids: torch.Tensor, gate: torch.Tensor, in_: torch.Tensor,
              lengths: torch.Tensor, context_before: int, context_after: int, *, capacity: int | None = None,
              accept: torch.Tensor | None = None, cut: object = None, packing: Packing | None = None,
              threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`collect.stats.merge_top` in the kernel: the same lists and windows (their slots may
    differ: :meth:`LayerStats.ordered_windows` reads them in list order), one loop per list instead
    of tensors over every list. For a batch added as it is, from CPU tensors the kernel reads.
    ``packing``: ``gate``/``in_`` are packed experts, ``batch.doc_pos`` document positions (as the
    torch merge takes them); each window holds the expert's values where it saw the position."""
    if capacity is not None or accept is not None:
        raise ValueError("the kernel's merge adds a batch as it is (no capacity, no accept)")
    hooks = [h if h.dtype != torch.float16 else h.float() for h in (gate, in_)]
    if hooks[0].dtype != hooks[1].dtype:
        hooks = [h.float() for h in hooks]
    hooks = [h if h.stride(-1) == 1 else h.contiguous() for h in hooks]
    doc_abs = batch.doc_abs.float().contiguous()
    doc_pos = batch.doc_pos.to(torch.int64).contiguous()
    doc_ids = doc_ids.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    n_lists, k = stats.top_key[..., 0].numel(), stats.k
    for name in ("top_key", "top_pos", "top_slot", "win_gate", "win_in"):
        assert getattr(stats, name).is_contiguous(), name
    pointers = [stats.top_key.data_ptr(), stats.top_pos.data_ptr(), stats.top_slot.data_ptr(),
                stats.win_gate.data_ptr(), stats.win_in.data_ptr(), doc_abs.data_ptr(), doc_pos.data_ptr(),
                doc_ids.data_ptr(), hooks[0].data_ptr(), hooks[1].data_ptr(), lengths.data_ptr()]
    t_doc, packed = hooks[0].shape[1], []
    if packing is not None:  # each position's slot and each slot's position, per group
        inverse = packing.inverse.to(torch.int64).contiguous()
        positions = packing.positions.to(torch.int64).contiguous()
        t_doc = inverse.shape[1]
        pointers += [inverse.data_ptr(), positions.data_ptr()]
        packed = [packing.group_size, inverse.shape[2], positions.shape[1]]
    sizes = [_WINDOW_KINDS[stats.win_gate.dtype], int(hooks[0].dtype == torch.bfloat16), *hooks[0].stride()[:2],
             *hooks[1].stride()[:2], doc_abs.shape[0], t_doc, n_lists, k, context_before, context_after,
             N_CASES * N_HOOKS]

    def run(l0: int, l1: int) -> int:
        return _fused.merge(pointers, sizes + [l0, l1] + packed)

    changed = sum(_split(run, n_lists, threads))
    return torch.ones((), dtype=torch.bool), torch.tensor(changed)
