"""Four-case statistics of gated-MLP neurons, as pure functions of tensors.

One layer's running statistics live in a :class:`LayerStats` on the model's device. A batch of
documents updates it in two steps: :func:`reduce_batch` (counts, sums, extremes and each
document's most extreme position per case and hook; the part worth ``torch.compile``) and
:func:`merge_top` (keep the k best documents per list, with their windows). :func:`merge_stats`
combines the statistics of two disjoint document sets exactly as one run over both would.

The definitions (the contract in ``ARCHITECTURE.md``):

* a counted position is in case ``c`` by the strict signs of gate and in; a zero in either puts it
  in no case;
* a position where any hook is NaN or infinite (float16 overflow, ``silu(-inf)``) is counted in
  ``nonfinite`` (by case, or "no case" where gate or in has no sign) and left out of everything
  else, so it can never win a document's maximum and push the document's real values out;
* within a case every hook has a fixed sign, so a list's "most extreme" value is its largest
  ``|value|``; each document enters a list at most once, with its most extreme position (the
  earliest on ties); lists order by ``|value|`` descending, then document index ascending.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable

import torch

from mkdocs_gluscope.store import CASES, HOOKS

N_CASES = len(CASES)
N_HOOKS = len(HOOKS)
POS_BITS = 16  # positions within a document below 2**16
EMPTY = -1.0  # |value| of a document with no position in a case: below every real one


MAX_DOC = 2**31 - 1


def sort_key(abs_value: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """One int64 per entry that orders lists exactly: larger ``|value|`` first, then lower
    document index. The bits of a non-negative float32 order like the float, so the key is
    ``bits << 31 | (MAX_DOC - doc)``; an empty entry (``abs_value < 0``) gets -1. Documents are
    unique within a list, so keys never tie and ``topk`` needs no tie rule of its own."""
    bits = abs_value.clamp(min=0).view(torch.int32).to(torch.int64)
    key = (bits << 31) | (MAX_DOC - doc.to(torch.int64))
    return torch.where(abs_value >= 0, key, -1)


@dataclass
class LayerStats:
    """Running statistics of one layer; leading axes ``[neuron, case, hook]``.

    Lists are ordered best first. Their windows stay where they were written (``win_gate``,
    ``win_in``, indexed by ``top_slot``), so a batch writes only the windows of documents that
    enter a list; :meth:`ordered_windows` puts them in list order.
    """

    count: torch.Tensor  # [N, C] int64
    nonfinite: torch.Tensor  # [N, C + 1] int64: non-finite positions by case, then "no case"
    sum: torch.Tensor  # [N, C, H] float64
    min: torch.Tensor  # [N, C, H] float32, +inf while a case is empty
    max: torch.Tensor  # [N, C, H] float32, -inf while a case is empty
    top_key: torch.Tensor  # [N, C, H, k] int64 sort_key, -1 for an unfilled slot
    top_value: torch.Tensor  # [N, C, H, k] float32, NaN for an unfilled slot
    top_doc: torch.Tensor  # [N, C, H, k] int64, -1 for an unfilled slot
    top_pos: torch.Tensor  # [N, C, H, k] int64, -1 for an unfilled slot
    top_slot: torch.Tensor  # [N, C, H, k] int64, where each entry's window is stored
    win_gate: torch.Tensor  # [N, C, H, k, W] float32 by slot, NaN outside the document
    win_in: torch.Tensor  # [N, C, H, k, W] float32 by slot

    @classmethod
    def empty(cls, d_mlp: int, k: int, window: int, device: torch.device | str = "cpu",
              window_dtype: torch.dtype = torch.float32) -> "LayerStats":
        """Statistics of no documents. ``window_dtype`` float16 halves the window memory and
        loses nothing when the file stores float16 windows anyway."""
        shape = (d_mlp, N_CASES, N_HOOKS)
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return cls(
            count=torch.zeros(d_mlp, N_CASES, **i64),
            nonfinite=torch.zeros(d_mlp, N_CASES + 1, **i64),
            sum=torch.zeros(shape, dtype=torch.float64, device=device),
            min=torch.full(shape, float("inf"), **f32),
            max=torch.full(shape, float("-inf"), **f32),
            top_key=torch.full(shape + (k,), -1, **i64),
            top_value=torch.full(shape + (k,), float("nan"), **f32),
            top_doc=torch.full(shape + (k,), -1, **i64),
            top_pos=torch.full(shape + (k,), -1, **i64),
            top_slot=torch.arange(k, **i64).expand(shape + (k,)).contiguous(),
            win_gate=torch.full(shape + (k, window), float("nan"), dtype=window_dtype, device=device),
            win_in=torch.full(shape + (k, window), float("nan"), dtype=window_dtype, device=device),
        )

    @property
    def k(self) -> int:
        return self.top_key.shape[-1]

    def ordered_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, in)`` windows in list order, ``[N, C, H, k, W]``."""
        return _gather_k(self.win_gate, self.top_slot), _gather_k(self.win_in, self.top_slot)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> "LayerStats":
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})


@dataclass
class BatchReduction:
    """What one batch contributes, before the top-k merge."""

    count: torch.Tensor  # [N, C] int64
    nonfinite: torch.Tensor  # [N, C + 1] int64
    sum: torch.Tensor  # [N, C, H] float32
    min: torch.Tensor  # [N, C, H]
    max: torch.Tensor  # [N, C, H]
    doc_abs: torch.Tensor  # [B, N, C, H] largest |value| of the document in the case, EMPTY if none
    doc_value: torch.Tensor  # [B, N, C, H] the signed value there
    doc_pos: torch.Tensor  # [B, N, C, H] int64 its position (the earliest on ties)
    suspect: torch.Tensor  # bool scalar: assume_finite was wrong for this batch (see reduce_batch)


def case_masks(gate: torch.Tensor, in_: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Boolean masks ``[B, T, N]`` of the four cases, in :data:`CASES` order, among the positions
    where ``valid`` (``[B, T]``, or ``[B, T, N]`` per neuron) is True."""
    v = valid if valid.dim() == 3 else valid[:, :, None]
    g_pos, g_neg = gate > 0, gate < 0
    i_pos, i_neg = in_ > 0, in_ < 0
    return [v & g_pos & i_pos, v & g_pos & i_neg, v & g_neg & i_pos, v & g_neg & i_neg]


#: Sign of each hook within each case, ``[C, H]``: post = act(gate)·in has the product of the
#: signs, in the sign of in, gate and act(gate) the sign of gate (act keeps the sign, or gives 0).
HOOK_SIGNS = torch.tensor([[1, 1, 1, 1], [-1, -1, 1, 1], [-1, 1, -1, -1], [1, -1, -1, -1]], dtype=torch.float32)


def reduce_batch(
    gate: torch.Tensor,
    in_: torch.Tensor,
    post: torch.Tensor,
    swish: torch.Tensor,
    valid: torch.Tensor,
    assume_finite: bool = False,
) -> BatchReduction:
    """Per-case statistics of one batch of one layer.

    ``gate``, ``in_``, ``post``, ``swish``: ``[B, T, N]`` in any float dtype (computed in float32);
    ``valid``: ``[B, T]`` bool, True at counted positions (not padding, not an excluded BOS).
    Positions where a hook is NaN or infinite are counted apart (``nonfinite``) and left out.
    With ``assume_finite`` that check is skipped (it triples the compiled CPU cost, since every
    reduction then reads all four hooks) and ``suspect`` says whether the batch needs it: then
    the result is not to be used, and the batch is reduced again without ``assume_finite``.

    Every reduction runs along positions (one fused pass under ``torch.compile``); the batch-wide
    sums and extremes then come from the per-document ones. Within a case each hook's values all
    have the case's sign (or are 0), so its min and max follow from the smallest and largest
    ``|value|``.
    """
    hooks = [h.float() for h in (post, in_, gate, swish)]  # HOOKS order
    magnitudes = [h.abs() for h in hooks]
    if assume_finite:
        masks = case_masks(hooks[2], hooks[1], valid)
        nonfinite = torch.zeros(hooks[0].shape[-1], N_CASES + 1, dtype=torch.int64, device=valid.device)
    else:
        # torch.maximum propagates NaN, so one comparison covers NaN and inf in every hook.
        finite = torch.maximum(torch.maximum(magnitudes[0], magnitudes[1]),
                               torch.maximum(magnitudes[2], magnitudes[3])) < float("inf")
        bad = valid[:, :, None] & ~finite
        bad_by_case = [m.sum(dim=(0, 1)) for m in case_masks(hooks[2], hooks[1], bad)]
        nonfinite = torch.stack(bad_by_case + [bad.sum(dim=(0, 1)) - sum(bad_by_case)], dim=-1)
        masks = case_masks(hooks[2], hooks[1], valid[:, :, None] & finite)
    t_max = hooks[0].shape[1]
    # An argmax reduction is 5x slower than amax here, so pack |value| (its float32 bits order
    # like the value) and the reversed position into one int64: amax gives the largest |value|
    # and, among equal ones, the earliest position.
    reversed_pos = (t_max - 1 - torch.arange(t_max, device=valid.device))[None, :, None]
    keys = [(m.view(torch.int32).to(torch.int64) << POS_BITS) | reversed_pos for m in magnitudes]
    count, sums, best_keys, min_abs = [], [], [], []
    for mask in masks:
        count.append(mask.sum(dim=1))
        for h, magnitude, key in zip(hooks, magnitudes, keys):
            sums.append(torch.where(mask, h, 0.0).sum(dim=1))
            best_keys.append(torch.where(mask, key, -1).amax(dim=1))
            min_abs.append(torch.where(mask, magnitude, float("inf")).amin(dim=1))
    best_key = torch.stack(best_keys, dim=-1)  # [B, N, C*H]
    present_flat = best_key >= 0
    doc_pos_flat = torch.where(present_flat, t_max - 1 - (best_key & (2**POS_BITS - 1)), 0)
    max_abs = torch.where(present_flat, (best_key >> POS_BITS).to(torch.int32).view(torch.float32), EMPTY)
    b, _, n = hooks[0].shape
    shape = (b, n, N_CASES, N_HOOKS)
    doc_abs = max_abs.view(shape)
    doc_min_abs = torch.stack(min_abs, dim=-1).view(shape)
    signs = HOOK_SIGNS.to(doc_abs.device)
    present = doc_abs >= 0
    # Signed extremes per document, +-inf where the document has no position in the case.
    hi = torch.where(present, torch.where(signs > 0, doc_abs, -doc_min_abs), float("-inf"))
    lo = torch.where(present, torch.where(signs > 0, doc_min_abs, -doc_abs), float("inf"))
    sum_by_doc = torch.stack(sums, dim=-1)
    if assume_finite:
        # A NaN or inf at a position in a case makes that case's sum non-finite; one at a position
        # in no case has a NaN gate or in (or an inf in with a zero gate), caught by gate + in.
        suspect = ~(torch.isfinite(sum_by_doc).all()
                    & torch.isfinite(torch.where(valid[:, :, None], hooks[1] + hooks[2], 0.0).sum()))
    else:
        suspect = torch.zeros((), dtype=torch.bool, device=valid.device)
    return BatchReduction(
        count=torch.stack(count, dim=-1).sum(dim=0),
        nonfinite=nonfinite,
        sum=sum_by_doc.view(shape).sum(dim=0),
        min=lo.amin(dim=0),
        max=hi.amax(dim=0),
        doc_abs=doc_abs,
        # The value itself: within a case its sign is the hook's (a zero may come out as -0.0).
        doc_value=torch.where(present, signs * doc_abs, float("nan")),
        doc_pos=doc_pos_flat.view(shape),
        suspect=suspect,
    )


def windows_at(
    values: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    neurons: torch.Tensor,
    lengths: torch.Tensor,
    context_before: int,
    context_after: int,
) -> torch.Tensor:
    """``values[row, pos-before .. pos+after, neuron]`` for each selected slot: ``[S, W]``,
    NaN outside the row's document (``lengths[row]`` tokens)."""
    offsets = torch.arange(-context_before, context_after + 1, device=values.device)
    _, t_max, d_mlp = values.shape
    t = pos[:, None] + offsets
    inside = (t >= 0) & (t < lengths[rows][:, None])
    flat = (rows[:, None] * t_max + t.clamp(0, t_max - 1)) * d_mlp + neurons[:, None]
    picked = values.reshape(-1).take(flat).float()
    return torch.where(inside, picked, float("nan"))


def _gather_k(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along the k axis (3) of ``[N, C, H, k(, W)]`` tensors."""
    if x.dim() == idx.dim():
        return x.gather(3, idx)
    return x.gather(3, idx[..., None].expand(*idx.shape, x.shape[-1]))


def merge_top(
    stats: LayerStats,
    batch: BatchReduction,
    doc_ids: torch.Tensor,
    gate: torch.Tensor,
    in_: torch.Tensor,
    lengths: torch.Tensor,
    context_before: int,
    context_after: int,
) -> LayerStats:
    """The top-k lists after adding one batch's documents (rows ``doc_ids``, each with
    ``lengths`` tokens), with the gate/in windows of newly entered examples cut from the batch.

    The window storage of ``stats`` is updated in place and shared with the result.
    """
    k = stats.k
    b = doc_ids.shape[0]
    cand_key = sort_key(batch.doc_abs, doc_ids.view(b, 1, 1, 1)).permute(1, 2, 3, 0)
    top_key, idx = torch.cat([stats.top_key, cand_key], dim=-1).topk(k, dim=-1)
    from_old = idx < k
    old_idx = idx.clamp(max=k - 1)
    new_row = (idx - k).clamp(min=0, max=b - 1)
    filled = top_key >= 0

    def pick(old: torch.Tensor, new: torch.Tensor, empty: float | int) -> torch.Tensor:
        chosen = torch.where(from_old, old.gather(-1, old_idx), new.permute(1, 2, 3, 0).gather(-1, new_row))
        return torch.where(filled, chosen, empty)

    top_value = pick(stats.top_value, batch.doc_value, float("nan"))
    top_pos = pick(stats.top_pos, batch.doc_pos, -1)
    top_doc = pick(stats.top_doc, doc_ids.view(b, 1, 1, 1).expand_as(batch.doc_pos), -1)

    # Every entry that enters evicts one old entry: reuse the evicted entries' window slots.
    kept = torch.zeros_like(stats.top_slot).scatter_add_(-1, old_idx, from_old.long()) > 0
    evicted_first = torch.sort(kept.to(torch.uint8), dim=-1, stable=True).indices
    free_slots = stats.top_slot.gather(-1, evicted_first)
    entry_rank = (torch.cumsum((~from_old).long(), dim=-1) - 1).clamp(min=0)
    top_slot = torch.where(from_old, stats.top_slot.gather(-1, old_idx), free_slots.gather(-1, entry_rank))

    n, c, h, j = (~from_old & filled).nonzero(as_tuple=True)
    if n.numel():
        rows, pos, slot = new_row[n, c, h, j], top_pos[n, c, h, j], top_slot[n, c, h, j]
        # One flat index per window row: much faster than four index tensors.
        row = ((n * N_CASES + c) * N_HOOKS + h) * k + slot
        window = stats.win_gate.shape[-1]
        for store, values in ((stats.win_gate, gate), (stats.win_in, in_)):
            cut = windows_at(values, rows, pos, n, lengths, context_before, context_after)
            store.view(-1, window)[row] = cut.to(store.dtype)
    return LayerStats(
        count=stats.count,
        nonfinite=stats.nonfinite,
        sum=stats.sum,
        min=stats.min,
        max=stats.max,
        top_key=top_key,
        top_value=top_value,
        top_doc=top_doc,
        top_pos=top_pos,
        top_slot=top_slot,
        win_gate=stats.win_gate,
        win_in=stats.win_in,
    )


def add_batch(
    stats: LayerStats,
    batch: BatchReduction,
    doc_ids: torch.Tensor,
    gate: torch.Tensor,
    in_: torch.Tensor,
    lengths: torch.Tensor,
    context_before: int,
    context_after: int,
) -> LayerStats:
    """``stats`` updated with one batch: counts, sums (accumulated in float64), extremes, top-k.
    Consumes ``stats`` (its window storage is reused)."""
    merged = merge_top(stats, batch, doc_ids, gate, in_, lengths, context_before, context_after)
    merged.count = stats.count + batch.count
    merged.nonfinite = stats.nonfinite + batch.nonfinite
    merged.sum = stats.sum + batch.sum.double()
    merged.min = torch.minimum(stats.min, batch.min)
    merged.max = torch.maximum(stats.max, batch.max)
    return merged


def merge_stats(a: LayerStats, b: LayerStats) -> LayerStats:
    """Statistics of the union of two disjoint document sets (documents indexed alike)."""
    k = a.k
    top_key, idx = torch.cat([a.top_key, b.top_key], dim=-1).topk(k, dim=-1)
    a_gate, a_in = a.ordered_windows()
    b_gate, b_in = b.ordered_windows()

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _gather_k(torch.cat([x, y], dim=3), idx)

    return LayerStats(
        count=a.count + b.count,
        nonfinite=a.nonfinite + b.nonfinite,
        sum=a.sum + b.sum,
        min=torch.minimum(a.min, b.min),
        max=torch.maximum(a.max, b.max),
        top_key=top_key,
        top_value=pick(a.top_value, b.top_value),
        top_doc=pick(a.top_doc, b.top_doc),
        top_pos=pick(a.top_pos, b.top_pos),
        top_slot=torch.arange(k, device=idx.device).expand_as(idx).contiguous(),
        win_gate=pick(a_gate, b_gate),
        win_in=pick(a_in, b_in),
    )


def compiled_reduce_batch(enabled: bool) -> Callable[..., BatchReduction]:
    """:func:`reduce_batch`, fused by ``torch.compile`` when ``enabled`` (about 28x faster on a
    CPU; the same code becomes Triton kernels on CUDA). Batches run the fast path that assumes
    finite values; the rare batch with a NaN or inf is reduced again with the check (compiled on
    first need), so results are exact either way."""
    compile = (lambda f: torch.compile(f, dynamic=True)) if enabled else (lambda f: f)
    fast = compile(functools.partial(reduce_batch, assume_finite=True))
    exact: list[Callable[..., BatchReduction]] = []

    def reduce(gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor, swish: torch.Tensor,
               valid: torch.Tensor) -> BatchReduction:
        reduced = fast(gate, in_, post, swish, valid)
        if not bool(reduced.suspect):
            return reduced
        if not exact:
            exact.append(compile(reduce_batch))
        return exact[0](gate, in_, post, swish, valid)

    return reduce
