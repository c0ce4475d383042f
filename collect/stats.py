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
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from mkdocs_gluscope.distributions import (BAND_EDGES, DENSITY_HALF, EMPTY_PRIORITY,
                                           HIST_LOW_EXPONENT, N_BANDS, N_BINS, N_DENSITY)
from mkdocs_gluscope.store import CASES, HOOKS
from mkdocs_gluscope.store import HOOK_SIGNS as STORE_HOOK_SIGNS

N_CASES = len(CASES)
N_HOOKS = len(HOOKS)
POS_BITS = 16  # positions within a document below 2**16
EMPTY = -1.0  # |value| of a document with no position in a case: below every real one


MAX_DOC = 2**31 - 1
#: Entries whose windows are cut at a time from packed experts' values (bounds the index tensors).
WINDOW_CHUNK = 1 << 18
#: Window slots (0..k-1) are stored small; ``gather`` wants int64, so they widen where used.
SLOT_DTYPE = torch.int16
MAX_K = 2**15 - 1


#: The tables that the GPU's path keeps in host memory (:class:`WindowWrites`): the top-k windows,
#: written only for the entries that enter a list and read only at checkpoints, merges and the end.
HOST_TABLES = ("win_gate", "win_in")
#: What :func:`state_bytes_per_neuron` counts: everything, or the GPU path's device or host part.
STATE_PARTS = ("all", "device", "host")


def state_bytes_per_neuron(k: int, window: int, window_dtype: torch.dtype = torch.float16, samples: int = 0,
                           band_samples: int = 0, part: str = "all") -> int:
    """Bytes of :class:`LayerStats` per neuron: what a collection keeps resident per neuron of
    every recorded layer (the figure per shape is this times layers x d_mlp). ``part``: ``all``
    (a CPU run, where the host is the device), or on the GPU's path the ``device`` part and the
    ``host`` part (:data:`HOST_TABLES`)."""
    return LayerStats.empty(1, k, window, "meta", window_dtype, samples, band_samples).nbytes(part)


def sort_key(abs_value: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """One int64 per entry that orders lists exactly: larger ``|value|`` first, then lower
    document index. The bits of a non-negative float32 order like the float, so the key is
    ``bits << 31 | (MAX_DOC - doc)``; an empty entry (``abs_value < 0``) gets -1. Documents are
    unique within a list, so keys never tie and ``topk`` needs no tie rule of its own."""
    bits = abs_value.clamp(min=0).view(torch.int32).to(torch.int64)
    key = (bits << 31) | (MAX_DOC - doc.to(torch.int64))
    return torch.where(abs_value >= 0, key, -1)


def key_doc(key: torch.Tensor) -> torch.Tensor:
    """The document of each :func:`sort_key`, int32; -1 for an empty entry."""
    return torch.where(key >= 0, MAX_DOC - (key & MAX_DOC), -1).to(torch.int32)


def key_value(key: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The value of each :func:`sort_key` (float32): its ``|value|`` with the sign its hook has in
    its case (``signs`` broadcast against ``key``; a zero comes out as -0.0 where the sign is
    negative, as the batch's ``doc_value``); NaN for an empty entry."""
    magnitude = (key.clamp(min=0) >> 31).to(torch.int32).view(torch.float32)
    return torch.where(key >= 0, signs * magnitude, float("nan"))


@dataclass
class Packing:
    """Where each neuron's positions are packed: the experts of a mixture-of-experts layer run as one
    wide layer of ``G`` groups (experts) of ``group_size`` neurons, each group over its own tokens.

    A routed expert sees about top_k / n_experts of the tokens, so its values are packed: slot ``s``
    of document row ``b`` holds, for group ``g``, the document position ``positions[b, s, g]`` (its
    ``s``-th routed position, in position order, so the earliest stays first on ties); ``valid``
    marks the filled slots. ``inverse[b, t, g]`` is the slot of position ``t``, or -1 where group
    ``g`` did not see it. Hook tensors are ``[B, T', G * group_size]``, neuron ``n`` in group
    ``n // group_size``; a dense layer is one group of every neuron, unpacked (``Packing`` None)."""

    positions: torch.Tensor  # [B, T', G] int64, 0 in empty slots
    valid: torch.Tensor  # [B, T', G] bool: the slot holds a counted position
    inverse: torch.Tensor  # [B, T, G] int64, -1 where the group did not see the position
    group_size: int
    filled: torch.Tensor | None = None  # [B, T', G] bool: the slot holds a position, counted or not (valid if None)

    def __post_init__(self) -> None:
        if self.filled is None:
            self.filled = self.valid

    def neuron_valid(self) -> torch.Tensor:
        """``[B, T', N]`` (a broadcast view): the valid mask of every neuron."""
        b, t, g = self.valid.shape
        return self.valid[..., None].expand(b, t, g, self.group_size).reshape(b, t, g * self.group_size)

    def to_document(self, slot: torch.Tensor) -> torch.Tensor:
        """Document positions of packed slots ``[B, N, ...]`` (an int tensor, neuron on axis 1)."""
        b, n = slot.shape[:2]
        t, g = self.positions.shape[1:]
        # One flat take (a single index tensor): several times faster than indexing by three.
        rows = torch.arange(b, device=slot.device).view((b,) + (1,) * (slot.dim() - 1)) * (t * g)
        group = (torch.arange(n, device=slot.device) // self.group_size).view((1, n) + (1,) * (slot.dim() - 2))
        # The index added to in place: one temporary the slots' size, not three (an OLMoE layer's are 34 MB).
        return self.positions.reshape(-1).take((slot.long() * g).add_(rows + group))

    def priorities(self, prio: torch.Tensor) -> torch.Tensor:
        """``[B, T', G]`` sampling priorities of the packed slots from the document's ``[B, T]``
        (``EMPTY_PRIORITY`` in empty slots)."""
        b, t, g = self.positions.shape
        packed = prio.gather(1, self.positions.reshape(b, t * g)).view(b, t, g)
        return torch.where(self.valid, packed, EMPTY_PRIORITY)

    def neuron_priorities(self, prio: torch.Tensor, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T', N]``: :meth:`priorities` for every neuron (its group's), as the GPU's candidate
        search reads them; ``[B, T', len(neurons)]`` for ``neurons`` alone (a check's sample: an
        OLMoE layer's whole tensor is 0.3 GiB)."""
        per_group = self.priorities(prio)
        if neurons is not None:
            return per_group[..., neurons // self.group_size]
        b, t, g = per_group.shape
        return per_group[..., None].expand(b, t, g, self.group_size).reshape(b, t, g * self.group_size)

    def unpacked(self, values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Neurons ``lo..hi-1`` of packed ``values`` back at their documents' positions, ``[B, T, hi - lo]``,
        NaN where the neuron's group did not see the position."""
        b, t_doc, _ = self.inverse.shape
        size = self.group_size
        out = values.new_full((b, t_doc + 1, hi - lo), float("nan"))  # row t_doc: where empty slots go
        rows = torch.arange(b, device=values.device)[:, None]
        for g in range(lo // size, (hi - 1) // size + 1):
            first, last = max(lo, g * size), min(hi, (g + 1) * size)
            at = torch.where(self.filled[:, :, g], self.positions[:, :, g], t_doc)
            out[rows, at, first - lo:last - lo] = values[:, :, first:last]
        return out[:, :t_doc]

    def windows_at(self, values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, neurons: torch.Tensor,
                   lengths: torch.Tensor, context_before: int, context_after: int, *,
                   syncs_free: bool = False) -> torch.Tensor:
        """As :func:`windows_at`, with ``values`` packed ``[B, T', N]`` and ``pos`` document positions:
        each window holds the group's value at every position it saw, NaN elsewhere. Few windows are
        cut by index, with no document-shaped copy of the values; many (the first batches fill every
        list) where ``syncs_free`` (a CPU) from the neurons they concern put back at their positions,
        as :func:`windows_at` cuts a dense layer's (contiguous runs: several times faster)."""
        window = context_before + 1 + context_after
        if syncs_free and rows.numel() and rows.numel() * window * 4 >= values.shape[0] * values.shape[1] * (
                int(neurons.max()) + 1 - int(neurons.min())):
            lo, hi = int(neurons.min()), int(neurons.max()) + 1
            return windows_at(self.unpacked(values, lo, hi), rows, pos, neurons - lo, lengths, context_before,
                              context_after)
        b, t_doc, n_groups = self.inverse.shape
        t_packed, n = values.shape[1], values.shape[2]
        offsets = torch.arange(-context_before, context_after + 1, device=values.device)
        rows, neurons = rows.long(), neurons.long()
        t = pos[:, None].long() + offsets
        inside = (t >= 0) & (t < lengths[rows][:, None])
        # Two flat takes (one index tensor each): the slot of every window position, then its value.
        at = (rows * t_doc)[:, None] + t.clamp(0, t_doc - 1)
        slot = self.inverse.reshape(-1).take(at * n_groups + (neurons // self.group_size)[:, None])
        seen = inside & (slot >= 0)
        found = values.reshape(-1).take(((rows * t_packed)[:, None] + slot.clamp(min=0)) * n + neurons[:, None])
        return torch.where(seen, found, float("nan"))


def _write_windows(tables: Sequence[torch.Tensor], rows: torch.Tensor, cuts: Sequence[torch.Tensor],
                   keep: torch.Tensor | None) -> None:
    """Write window rows of the ``[..., W]`` window tables: ``table[rows] = cut`` (flat rows, list *
    k + slot), where ``keep`` (``[M, 1]`` bool, or None: everywhere); elsewhere the row keeps what
    it holds (a fixed shape: the capacity path writes every selected list's k slots)."""
    for table, cut in zip(tables, cuts):
        flat = table.view(-1, table.shape[-1])
        if keep is not None:
            cut = torch.where(keep, cut, flat[rows])
        flat[rows] = cut


class WindowWrites:
    """The top-k window writes of the GPU's path on their way to host memory, where its window
    tables live (:data:`HOST_TABLES`: 19.5 of the 34.9 KB of a neuron's state at the defaults).

    A batch writes the windows of the entries that enter a list; each layer-batch's writes leave
    the device as one fixed-shape update (rows, cut windows, the ``keep`` mask), copied
    asynchronously into pinned host memory behind the work queued on the device: no host sync.
    :meth:`apply` writes them into the tables in the order they were made, once the batch's one
    host sync has passed (then the device has done the copies; a CUDA event recorded after each
    says so without waiting): the collection applies a batch's writes during the next batch, while
    the device computes it, and reading the tables applies what is left. On a CPU the updates are
    kept as they are and applied at the same points, so that the tests run the GPU's order of events."""

    def __init__(self) -> None:
        self._pending: list[tuple[list[torch.Tensor], Any]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, rows: torch.Tensor, gate: torch.Tensor, in_: torch.Tensor, keep: torch.Tensor | None) -> None:
        tensors = [rows, gate, in_] if keep is None else [rows, gate, in_, keep]
        done = None
        if rows.is_cuda:
            tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                       for t in tensors]
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(rows.device))
        self._pending.append((tensors, done))

    def apply(self, win_gate: torch.Tensor, win_in: torch.Tensor, first: int | None = None) -> None:
        """Write the pending updates (the ``first`` of them), in the order they were made."""
        first = len(self._pending) if first is None else first
        for tensors, done in self._pending[:first]:
            if done is not None:
                done.synchronize()  # passed already after the sync of the batch that made it
            rows, gate, in_ = tensors[:3]
            _host_write((win_gate, win_in), rows, (gate, in_), tensors[3] if len(tensors) > 3 else None)
        del self._pending[:first]


def _host_write(tables: Sequence[torch.Tensor], rows: torch.Tensor, cuts: Sequence[torch.Tensor],
                keep: torch.Tensor | None) -> None:
    """:func:`_write_windows` into tables in host memory, of updates in host memory: only the kept
    rows (about one in ten of a capacity's slots, whose old windows the device's fixed shape would
    read and write back), copied as bytes by numpy (which has no bfloat16). Selecting them is host
    work that never waits for a device; numpy keeps it apart from the torch operations whose host
    syncs :class:`collect.syncs.SyncCounter` counts, which on a CPU cannot tell host from device."""
    at = rows.numpy()
    kept = slice(None) if keep is None else keep.numpy().reshape(-1)
    at = at[kept]
    for table, cut in zip(tables, cuts):
        width = table.shape[-1] * table.element_size()
        table.view(-1, table.shape[-1]).view(torch.uint8).numpy()[at] = (
            cut.contiguous().view(torch.uint8).numpy().reshape(-1, width)[kept])


@dataclass
class LayerStats:
    """Running statistics of one layer; leading axes ``[neuron, case, hook]``.

    Lists are ordered best first. An entry is its :func:`sort_key` (which holds its ``|value|`` and
    its document: :attr:`top_value` and :attr:`top_doc` are read off it) and its position. Its
    windows stay where they were written (``win_gate``, ``win_in``, indexed by ``top_slot``), so a
    batch writes only the windows of documents that enter a list; :meth:`ordered_windows` puts
    them in list order. On the GPU's path the windows live in host memory (``writes``, a
    :class:`WindowWrites`, takes the writes there; :meth:`flush_windows` applies them).
    """

    count: torch.Tensor  # [N, C] int64
    nonfinite: torch.Tensor  # [N, C + 1] int64: non-finite positions by case, then "no case"
    sum: torch.Tensor  # [N, C, H] float64
    min: torch.Tensor  # [N, C, H] float32, +inf while a case is empty
    max: torch.Tensor  # [N, C, H] float32, -inf while a case is empty
    top_key: torch.Tensor  # [N, C, H, k] int64 sort_key, -1 for an unfilled slot
    top_pos: torch.Tensor  # [N, C, H, k] int32, -1 for an unfilled slot
    top_slot: torch.Tensor  # [N, C, H, k] int16, where each entry's window is stored
    win_gate: torch.Tensor  # [N, C, H, k, W] window dtype, by slot, NaN outside the document
    win_in: torch.Tensor  # [N, C, H, k, W] window dtype, by slot
    # Distributions (None where a run records none): the tables the file stores, as int32 on the
    # device (runs are limited to 2**31 - 1 counted positions). A batch's positions are counted in
    # narrow per-batch tables first (histogram_batch, collect/_fused.cpp) and added to these.
    hist: torch.Tensor | None = None  # [N, C, H, B] int32: each hook's |value| bins per case
    density: torch.Tensor | None = None  # [N, C, G/2, G/2] int32: (gate, in) cells of each case's quadrant
    # Random examples: the S positions of lowest priority per case ("sample") and per (case, band)
    # of |post| ("band"), ascending; key EMPTY_PRIORITY, doc/pos -1 and NaN values in empty slots.
    sample_key: torch.Tensor | None = None  # [N, C, S] int64
    sample_doc: torch.Tensor | None = None  # [N, C, S] int32
    sample_pos: torch.Tensor | None = None  # [N, C, S] int32
    sample_value: torch.Tensor | None = None  # [N, C, S, H] float32
    sample_gate: torch.Tensor | None = None  # [N, C, S, W] window dtype
    sample_in: torch.Tensor | None = None  # [N, C, S, W] window dtype
    band_key: torch.Tensor | None = None  # [N, C, R, S2] int64
    band_doc: torch.Tensor | None = None  # [N, C, R, S2] int32
    band_pos: torch.Tensor | None = None  # [N, C, R, S2] int32
    band_value: torch.Tensor | None = None  # [N, C, R, S2, H] float32
    band_gate: torch.Tensor | None = None  # [N, C, R, S2, W] window dtype
    band_in: torch.Tensor | None = None  # [N, C, R, S2, W] window dtype
    # The GPU's path: win_gate and win_in in host memory, their writes on the way there (not a table).
    writes: WindowWrites | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, d_mlp: int, k: int, window: int, device: torch.device | str = "cpu",
              window_dtype: torch.dtype = torch.float32, samples: int = 0, band_samples: int = 0, *,
              windows_on_host: bool = False) -> "LayerStats":
        """Statistics of no documents. ``window_dtype`` float16 halves the window memory and
        loses nothing when the file stores float16 windows anyway. ``samples`` > 0 adds the
        distributions (histograms, ``samples`` random examples per case, ``band_samples`` per band).
        ``windows_on_host``: the GPU's path (:meth:`windows_on_host`)."""
        shape = (d_mlp, N_CASES, N_HOOKS)
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        # Made where they live: a 7B model's windows would not fit on a small card even for a moment.
        windows = dict(dtype=window_dtype, device="cpu" if windows_on_host and torch.device(device).type != "meta"
                       else device)
        distributions: dict[str, torch.Tensor] = {}
        if samples > 0:
            distributions = dict(
                hist=torch.zeros(d_mlp, N_CASES, N_HOOKS, N_BINS, **i32),
                density=torch.zeros(d_mlp, N_CASES, DENSITY_HALF, DENSITY_HALF, **i32),
            )
            for prefix, lists in (("sample", (samples,)), ("band", (N_BANDS, band_samples))):
                lead = (d_mlp, N_CASES) + lists
                distributions.update({
                    prefix + "_key": torch.full(lead, EMPTY_PRIORITY, **i64),
                    prefix + "_doc": torch.full(lead, -1, **i32),
                    prefix + "_pos": torch.full(lead, -1, **i32),
                    prefix + "_value": torch.full(lead + (N_HOOKS,), float("nan"), **f32),
                    prefix + "_gate": torch.full(lead + (window,), float("nan"), dtype=window_dtype, device=device),
                    prefix + "_in": torch.full(lead + (window,), float("nan"), dtype=window_dtype, device=device),
                })
        return cls(
            count=torch.zeros(d_mlp, N_CASES, **i64),
            nonfinite=torch.zeros(d_mlp, N_CASES + 1, **i64),
            sum=torch.zeros(shape, dtype=torch.float64, device=device),
            min=torch.full(shape, float("inf"), **f32),
            max=torch.full(shape, float("-inf"), **f32),
            top_key=torch.full(shape + (k,), -1, **i64),
            top_pos=torch.full(shape + (k,), -1, **i32),
            top_slot=torch.arange(k, dtype=SLOT_DTYPE, device=device).expand(shape + (k,)).contiguous(),
            win_gate=torch.full(shape + (k, window), float("nan"), **windows),
            win_in=torch.full(shape + (k, window), float("nan"), **windows),
            **distributions,
            writes=WindowWrites() if windows_on_host else None,
        )

    def windows_on_host(self, on_host: bool = True) -> "LayerStats":
        """These statistics (in place; returned) with the top-k windows in host memory, where the
        batches' writes reach them through a :class:`WindowWrites` (the GPU's path: they are most of
        a neuron's state and rarely written; e.g. a resumed checkpoint's). On a CPU they stay where
        they are, and the writes still wait for :meth:`flush_windows`, as on a GPU."""
        if on_host and self.writes is None:
            self.win_gate, self.win_in = self.win_gate.cpu(), self.win_in.cpu()
            self.writes = WindowWrites()
        return self

    def write_windows(self, rows: torch.Tensor, gate: torch.Tensor, in_: torch.Tensor,
                      keep: torch.Tensor | None = None) -> None:
        """Write the windows of flat rows ``rows`` (list * k + slot), where ``keep`` (``[M, 1]``);
        on the GPU's path on their way to host memory, written there by :meth:`flush_windows`."""
        if self.writes is not None:
            self.writes.push(rows, gate, in_, keep)
        else:
            _write_windows((self.win_gate, self.win_in), rows, (gate, in_), keep)

    def flush_windows(self, first: int | None = None) -> None:
        """Apply the window writes on their way to host memory (the ``first`` of them), which the
        device has done once the sync of the batch that made them has passed (then without waiting);
        reading the windows applies them all first."""
        if self.writes is not None and len(self.writes):
            self.writes.apply(self.win_gate, self.win_in, first)

    @property
    def has_distributions(self) -> bool:
        return self.hist is not None

    @property
    def k(self) -> int:
        return self.top_key.shape[-1]

    @property
    def top_doc(self) -> torch.Tensor:
        """``[N, C, H, k]`` int32: each entry's document, -1 for an unfilled slot."""
        return key_doc(self.top_key)

    @property
    def top_value(self) -> torch.Tensor:
        """``[N, C, H, k]`` float32: each entry's value, NaN for an unfilled slot."""
        return key_value(self.top_key, HOOK_SIGNS.to(self.top_key.device)[:, :, None])

    def ordered_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, in)`` windows in list order, ``[N, C, H, k, W]``, where the windows live (host
        memory on the GPU's path)."""
        self.flush_windows()
        slot = self.top_slot.to(self.win_gate.device)
        return _gather_k(self.win_gate, slot), _gather_k(self.win_in, slot)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every table by name (the windows where they live: host memory on the GPU's path)."""
        self.flush_windows()
        return {f.name: value for f in fields(self) if isinstance(value := getattr(self, f.name), torch.Tensor)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> "LayerStats":
        """From :meth:`to_dict`, or a checkpoint of an earlier version: int64 indices are narrowed,
        the value and document of each entry (now read off its key) dropped, and the joint
        histograms of then ((gate, in) and (post, act(gate)) per case) turned into today's tables."""
        narrow = {"top_pos": torch.int32, "top_slot": SLOT_DTYPE}
        tensors = dict(tensors)
        if "hist_joint" in tensors:
            tensors["hist"], tensors["density"] = tables_of_joint(tensors.pop("hist_joint"), tensors.pop("hist_outputs"))
        return cls(**{f.name: tensors[f.name].to(narrow[f.name]) if f.name in narrow else tensors[f.name]
                      for f in fields(cls) if f.name in tensors})

    def nbytes(self, part: str = "all") -> int:
        """Bytes of every table (``all``), or on the GPU's path of those on the ``device`` or in ``host``
        memory (:data:`HOST_TABLES`)."""
        if part not in STATE_PARTS:
            raise ValueError(f"part {part!r}: expected one of {', '.join(STATE_PARTS)}")
        return sum(t.numel() * t.element_size() for name, t in self.to_dict().items()
                   if part == "all" or (name in HOST_TABLES) == (part == "host"))


@dataclass
class BatchReduction:
    """What one batch contributes, before the top-k merge."""

    count: torch.Tensor  # [N, C] int64
    nonfinite: torch.Tensor  # [N, C + 1] int64
    sum: torch.Tensor  # [N, C, H] float32
    min: torch.Tensor  # [N, C, H]
    max: torch.Tensor  # [N, C, H]
    doc_abs: torch.Tensor  # [B, N, C, H] largest |value| of the document in the case, EMPTY if none
    doc_pos: torch.Tensor  # [B, N, C, H] int64 its position (the earliest on ties)
    suspect: torch.Tensor  # bool scalar: assume_finite was wrong for this batch (see reduce_batch)
    doc_count: torch.Tensor | None = None  # [B, N, C] int64 the document's positions in each case
    doc_min_abs: torch.Tensor | None = None  # [B, N, C, H] smallest |value| of the document in the case, inf if none

    @property
    def doc_value(self) -> torch.Tensor:
        """``[B, N, C, H]`` the signed value at ``doc_pos``, NaN where the document has no position in
        the case: within a case its sign is the hook's (a zero may come out as -0.0). Computed when
        read (the checks): the merges need only ``doc_abs``."""
        return torch.where(self.doc_abs >= 0, HOOK_SIGNS.to(self.doc_abs.device) * self.doc_abs, float("nan"))


def case_masks(gate: torch.Tensor, in_: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Boolean masks ``[B, T, N]`` of the four cases, in :data:`CASES` order, among the positions
    where ``valid`` (``[B, T]``, or ``[B, T, N]`` per neuron) is True."""
    v = valid if valid.dim() == 3 else valid[:, :, None]
    g_pos, g_neg = gate > 0, gate < 0
    i_pos, i_neg = in_ > 0, in_ < 0
    return [v & g_pos & i_pos, v & g_pos & i_neg, v & g_neg & i_pos, v & g_neg & i_neg]


#: Sign of each hook within each case, ``[C, H]``: post = act(gate)·in has the product of the
#: signs, in the sign of in, gate and act(gate) the sign of gate (act keeps the sign, or gives 0).
HOOK_SIGNS = torch.tensor(STORE_HOOK_SIGNS, dtype=torch.float32)


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
    ``valid``: ``[B, T]`` bool, True at counted positions (not padding, not an excluded BOS), or
    ``[B, T, N]`` per neuron (packed experts, :class:`Packing`: positions are then slots).
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
        counted = finite_positions(hooks, valid)
        bad = (valid if valid.dim() == 3 else valid[:, :, None]) & ~counted
        bad_by_case = [m.sum(dim=(0, 1)) for m in case_masks(hooks[2], hooks[1], bad)]
        nonfinite = torch.stack(bad_by_case + [bad.sum(dim=(0, 1)) - sum(bad_by_case)], dim=-1)
        masks = case_masks(hooks[2], hooks[1], counted)
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
    doc_pos = torch.where(present_flat, t_max - 1 - (best_key & (2**POS_BITS - 1)), 0)
    max_abs = torch.where(present_flat, (best_key >> POS_BITS).to(torch.int32).view(torch.float32), EMPTY)
    b, _, n = hooks[0].shape
    shape = (b, n, N_CASES, N_HOOKS)
    sum_by_doc = torch.stack(sums, dim=-1).view(shape)
    if assume_finite:
        # A NaN or inf at a position in a case makes that case's sum non-finite; one at a position
        # in no case (a zero or NaN gate or in) is caught by the sum of every hook there.
        suspect = ~(torch.isfinite(sum_by_doc).all()
                    & torch.isfinite(torch.where(valid if valid.dim() == 3 else valid[:, :, None],
                                                 hooks[0] + hooks[1] + hooks[2] + hooks[3], 0.0).sum()))
    else:
        suspect = torch.zeros((), dtype=torch.bool, device=valid.device)
    return from_documents(torch.stack(count, dim=-1), sum_by_doc, max_abs.view(shape),
                          torch.stack(min_abs, dim=-1).view(shape), doc_pos.view(shape), nonfinite, suspect)


def from_documents(doc_count: torch.Tensor, doc_sum: torch.Tensor, doc_abs: torch.Tensor, doc_min_abs: torch.Tensor,
                   doc_pos: torch.Tensor, nonfinite: torch.Tensor, suspect: torch.Tensor) -> BatchReduction:
    """A batch's :class:`BatchReduction` from its per-document reductions ``[B, N, C(, H)]`` (the
    torch code's and the CPU kernel's alike): the batch's sums and extremes come from them. Within a
    case each hook's values all have the case's sign (or are 0), so its min and max follow from the
    smallest and largest ``|value|``."""
    signs = HOOK_SIGNS.to(doc_abs.device)
    # The batch's largest and smallest |value| first (a document without a position in the case
    # holds EMPTY and inf: never the extreme of one that has one), then signed; +-inf where no
    # document has a position. Reductions of [B, N, C, H] before anything elementwise: an OLMoE
    # layer's experts make those tensors 17 MB each.
    most, least = doc_abs.amax(dim=0), doc_min_abs.amin(dim=0)
    present = most >= 0
    return BatchReduction(
        count=doc_count.sum(dim=0),
        nonfinite=nonfinite,
        sum=doc_sum.sum(dim=0),
        min=torch.where(present, torch.where(signs > 0, least, -most), float("inf")),
        max=torch.where(present, torch.where(signs > 0, most, -least), float("-inf")),
        doc_abs=doc_abs,
        doc_pos=doc_pos,
        suspect=suspect,
        doc_count=doc_count,
        doc_min_abs=doc_min_abs,
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
    """``values[row, pos-before .. pos+after, neuron]`` for each selected slot: ``[S, W]`` in the
    dtype of ``values``, NaN outside the row's document (``lengths[row]`` tokens)."""
    b, t_max, d_mlp = values.shape
    window = context_before + 1 + context_after
    nan = float("nan")
    if rows.numel() * window * 4 >= values.numel():
        # Many windows (the first batches fill every list): one copy of the batch, neuron-major and
        # NaN-padded, makes each window a contiguous run: much faster than gathering with stride d_mlp.
        span = context_before + t_max + context_after
        padded = values.new_full((d_mlp, b, span), nan)
        core = padded[:, :, context_before:context_before + t_max]
        core.copy_(values.permute(2, 0, 1))
        core.masked_fill_(torch.arange(t_max, device=values.device) >= lengths[:, None], nan)
        flat = padded.view(-1)
        runs = flat.as_strided((flat.numel() - window + 1, window), (1, 1))
        return runs[(neurons * b + rows) * span + pos]
    if t_max < window:  # a batch shorter than a window: padded (a copy of a short batch)
        values = torch.cat([values, values.new_full((b, window - t_max, d_mlp), nan)], dim=1)
    # Each window as one index into a strided view (the W positions from a start, at a neuron), in
    # the order of their positions so that neighbours share the rows they read, then shifted where
    # the window runs past the batch's start or end.
    order = torch.argsort(rows * t_max + pos)
    rows, pos, neurons = rows[order], pos[order], neurons[order]
    padded_t = values.shape[1]
    sb, st, sn = values.stride()
    view = values.as_strided((b, padded_t - window + 1, d_mlp, window), (sb, st, sn, st), values.storage_offset())
    first = pos - context_before
    start = first.clamp(0, padded_t - window)
    offsets = torch.arange(window, device=values.device)
    t = first[:, None] + offsets
    inside = (t >= 0) & (t < lengths[rows][:, None])
    cut = view[rows, start, neurons].gather(1, (t - start[:, None]).clamp(0, window - 1))
    cut = torch.where(inside, cut, nan)
    return torch.empty_like(cut).index_copy_(0, order, cut)


def _gather_k(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along the k axis (3) of ``[N, C, H, k(, W)]`` tensors."""
    idx = idx.long()
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
    *,
    capacity: int | None = None,
    accept: torch.Tensor | None = None,
    packing: Packing | None = None,
    cut: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one batch's documents (rows ``doc_ids``, each with ``lengths`` tokens) to the top-k
    lists of ``stats``, in place, with the gate/in windows of newly entered examples cut from the
    batch. Returns ``(applied, active)``: device scalars, whether the batch was added, and how many
    lists it changed.

    A candidate enters a list only if its key beats the list's k-th key, and after the first
    batches few do (about ``k / documents seen`` per list and document): so only the lists with an
    entering candidate ("active") are merged. With ``capacity=None`` they are found with
    ``nonzero`` (a host sync: free on a CPU); with a ``capacity`` with ``nonzero_static``, with no
    host sync, and a batch that activates more lists is not applied (``applied`` False) and must
    be added again with a larger capacity. ``accept`` False (a device bool) also leaves ``stats``
    unchanged: the caller found the batch's reduction unusable, without a sync of its own.
    With ``packing``, ``gate``/``in_`` are packed and ``batch.doc_pos`` holds document positions.
    ``cut``: :func:`windows_at`, or a faster function that computes the same (the CPU kernel's).
    """
    cut_windows = cut or windows_at
    k = stats.k
    b = doc_ids.shape[0]
    n_lists = stats.top_key[..., 0].numel()
    # Candidates as [B, lists]: each batch row is one document's candidate for every list.
    cand_key = sort_key(batch.doc_abs, doc_ids.view(b, 1, 1, 1)).view(b, n_lists)
    old_key = stats.top_key.view(n_lists, k)
    active = (cand_key > old_key[:, k - 1]).any(dim=0)
    n_active = active.sum()
    applied = torch.ones((), dtype=torch.bool, device=active.device) if accept is None else accept.clone()
    if capacity is None:
        if accept is not None:
            active &= applied
        rows = active.nonzero().squeeze(1)
    else:
        applied &= n_active <= capacity
        active &= applied
        rows = torch.nonzero_static(active, size=min(capacity, n_lists), fill_value=-1).squeeze(1)
        # Padding repeats the first row (list 0 where none is active): a list without an entering
        # candidate merges into itself, and repeats of one row compute and write the same values.
        rows = torch.where(rows >= 0, rows, rows[:1].clamp(min=0))
    top_key, idx = torch.cat([old_key[rows], cand_key[:, rows].T], dim=1).topk(k, dim=1)
    if accept is not None or capacity is not None:
        # Not applied: every selected list keeps its entries in place (even the empty ones, whose
        # ties topk may order either way), so the statistics stay bit for bit as they were.
        idx = torch.where(applied, idx, torch.arange(k, device=idx.device))
        top_key = torch.where(applied, top_key, old_key[rows])
    from_old = idx < k
    old_idx = idx.clamp(max=k - 1)
    new_row = (idx - k).clamp(min=0, max=b - 1)
    filled = top_key >= 0

    def pick(old: torch.Tensor, new: torch.Tensor, empty: float | int) -> torch.Tensor:
        old_rows = old.view(n_lists, k)[rows].gather(1, old_idx)
        new_rows = new.reshape(b, n_lists)[new_row, rows[:, None]].to(old.dtype)  # k of the B candidates
        return torch.where(filled, torch.where(from_old, old_rows, new_rows), empty)

    top_pos = pick(stats.top_pos, batch.doc_pos, -1)

    # Every entry that enters evicts one old entry: reuse the evicted entries' window slots.
    old_slot = stats.top_slot.view(n_lists, k)[rows].long()
    kept = torch.zeros_like(old_slot).scatter_add_(1, old_idx, from_old.long()) > 0
    evicted_first = torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices
    free_slots = old_slot.gather(1, evicted_first)
    entry_rank = (torch.cumsum((~from_old).long(), dim=1) - 1).clamp(min=0)
    top_slot = torch.where(from_old, old_slot.gather(1, old_idx), free_slots.gather(1, entry_rank))

    entered = ~from_old & filled
    if capacity is None:
        r, j = entered.nonzero(as_tuple=True)  # only the entries: after a few batches, a few per list
        keep = None
    else:
        r, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(rows.numel(), device=rows.device),
                                                      torch.arange(k, device=rows.device), indexing="ij"))
        keep = entered.reshape(-1, 1)  # a fixed shape: write the old window back where none entered
    store_row = rows[r] * k + top_slot[r, j]
    neuron = rows[r] // (N_CASES * N_HOOKS)
    if packing is not None:  # packed experts: windows from the slots each group saw
        cut_windows = functools.partial(packing.windows_at, syncs_free=capacity is None)
    # Packed experts cut their windows in chunks (entries come by list, so by neuron): a wide MoE
    # layer's first batch enters millions of entries.
    chunk = len(r) if packing is None else WINDOW_CHUNK
    for start in range(0, len(r), max(chunk, 1)):
        part = slice(start, start + chunk)
        rp, jp = r[part], j[part]
        gate_cut, in_cut = (cut_windows(values, new_row[rp, jp], top_pos[rp, jp].long(), neuron[part], lengths,
                                        context_before, context_after).to(stats.win_gate.dtype)
                            for values in (gate, in_))
        stats.write_windows(store_row[part], gate_cut, in_cut, None if keep is None else keep[part])
    for name, value in (("top_key", top_key), ("top_pos", top_pos), ("top_slot", top_slot)):
        target = getattr(stats, name)
        target.view(n_lists, k).index_copy_(0, rows, value.to(target.dtype))
    return applied, n_active


# -- distributions: histograms, density, random examples -------------------------------------------

def value_bins(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each ``|value|`` (:data:`mkdocs_gluscope.distributions.HIST_EDGES`), int32:
    the float32 exponent field, so every device bins every value alike."""
    exponent = x.float().abs().view(torch.int32) >> 23
    return (exponent - (127 + HIST_LOW_EXPONENT - 1)).clamp(0, N_BINS - 1)


def band_of(abs_post: torch.Tensor) -> torch.Tensor:
    """Band (:data:`mkdocs_gluscope.distributions.BAND_EDGES`) of each ``|post|``, int64: one
    comparison per inner edge (powers of two, so the histogram's bins agree)."""
    band = (abs_post >= _BAND_INNER_EDGES[0]).long()
    for edge in _BAND_INNER_EDGES[1:]:
        band = band + (abs_post >= edge).long()
    return band


#: The bands' inner edges as Python floats: constants to ``torch.compile`` (a numpy array breaks its graph).
_BAND_INNER_EDGES: tuple[float, ...] = tuple(float(e) for e in BAND_EDGES[1:-1])


def histogram_batch(gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor, swish: torch.Tensor,
                    counted: torch.Tensor, weight: torch.Tensor, hist: torch.Tensor, density: torch.Tensor) -> None:
    """Add one batch to the histogram tables (:attr:`LayerStats.hist`, :attr:`LayerStats.density`),
    in place. ``counted``: ``[B, T]`` or ``[B, T, N]`` bool, the positions that count (a position
    also needs a nonzero gate and in: a case); ``weight``: an int32 scalar tensor, 1, or 0 for a
    batch that is not to be added (decided on the device).

    Two scatters per position and neuron, into narrow tables of this batch: the joint (gate bin, in
    bin) and (post bin, act(gate) bin) counts of each case, whose sums are the four histograms and
    the density (:func:`tables_of_joint`), added to the stored tables at the end. Under
    ``torch.compile`` the bins and the scatters are one loop."""
    n = gate.shape[-1]
    case = (gate < 0).int() * 2 + (in_ < 0).int()
    mask = counted if counted.dim() == 3 else counted[:, :, None]
    ones = (mask & (gate != 0) & (in_ != 0)).int().reshape(-1)
    row = torch.arange(n, device=gate.device, dtype=torch.int32) * (2 * N_CASES) + case
    joint = torch.zeros(n, 2 * N_CASES, N_BINS, N_BINS, dtype=torch.int32, device=gate.device)
    flat = joint.view(-1)
    flat.index_put_((((row * N_BINS + value_bins(gate)) * N_BINS + value_bins(in_)).reshape(-1).long(),), ones,
                    accumulate=True)
    flat.index_put_(((((row + N_CASES) * N_BINS + value_bins(post)) * N_BINS + value_bins(swish)).reshape(-1).long(),),
                    ones, accumulate=True)
    batch_hist, batch_density = tables_of_joint(joint[:, :N_CASES], joint[:, N_CASES:])
    hist += batch_hist * weight
    density += batch_density * weight


def tables_of_joint(gate_in: torch.Tensor, post_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored tables from joint counts ``[N, C, B, B]`` of (gate bin, in bin) and (post bin,
    act(gate) bin): the four histograms ``[N, C, H, B]`` are their sums, the density ``[N, C, G/2,
    G/2]`` the (gate, in) counts with their bins merged in pairs of octaves (DENSITY_OF_BIN)."""
    hist = torch.stack([post_act.sum(dim=3), gate_in.sum(dim=2), gate_in.sum(dim=3), post_act.sum(dim=2)], dim=2)
    # DENSITY_OF_BIN is (bin + 1) // 2; computed here, since torch.compile mishandles a numpy constant.
    coarse = (torch.arange(N_BINS, device=gate_in.device) + 1) // 2
    n = gate_in.shape[0]
    by_gate = torch.zeros(n, N_CASES, DENSITY_HALF, N_BINS, dtype=gate_in.dtype, device=gate_in.device)
    by_gate.index_add_(2, coarse, gate_in)
    density = torch.zeros(n, N_CASES, DENSITY_HALF, DENSITY_HALF, dtype=gate_in.dtype, device=gate_in.device)
    density.index_add_(3, coarse, by_gate)
    return hist.to(gate_in.dtype), density


def compiled_histogram_batch(enabled: bool) -> Callable[..., None]:
    """:func:`histogram_batch`, fused into one loop by ``torch.compile`` when ``enabled``."""
    return torch.compile(histogram_batch, dynamic=True) if enabled else histogram_batch


def hist_and_density(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's ``hist`` ``[N, C, H, B]`` and ``density`` ``[N, G, G]`` (int64) from the stored
    tables: each case's quadrant of (gate, in) cells placed in the signed grid, mirrored by the
    case's signs (cell ``G/2 + j`` of a positive value, ``G/2 - 1 - j`` of a negative one)."""
    quadrants = stats.density.long()
    device = quadrants.device
    cells = torch.arange(DENSITY_HALF, device=device)
    density = torch.zeros(quadrants.shape[0], N_DENSITY, N_DENSITY, dtype=torch.int64, device=device)
    for c in range(N_CASES):
        gate_cells = DENSITY_HALF + cells if c < 2 else DENSITY_HALF - 1 - cells
        in_cells = DENSITY_HALF + cells if c % 2 == 0 else DENSITY_HALF - 1 - cells
        density[:, gate_cells[:, None], in_cells[None, :]] = quadrants[:, c]
    return stats.hist.long(), density


def merge_examples(lists: dict[str, torch.Tensor], cand_list: torch.Tensor, cand: dict[str, torch.Tensor]) -> None:
    """Add candidate examples to lists of random examples, in place.

    ``lists``: ``key doc pos value gate in`` viewed as ``[n_lists, S, ...]``; ``cand_list`` ``[M]``:
    each candidate's list; ``cand``: the candidates' ``key doc pos value gate in`` ``[M, ...]``. Each
    changed list keeps its S entries of lowest key (ties, as good as impossible with 62-bit
    priorities, by document then position), ascending; empty slots (key ``EMPTY_PRIORITY``) last.
    The candidates must not repeat a position already in their list."""
    if cand_list.numel() == 0:
        return
    rows = torch.unique(cand_list)
    S = lists["key"].shape[1]
    every = {name: torch.cat([lists[name][rows].reshape((-1,) + lists[name].shape[2:]),
                              cand[name].to(lists[name].dtype)]) for name in lists}
    list_of = torch.cat([rows.repeat_interleave(S), cand_list])
    order = torch.argsort(every["doc"].long() * 2**16 + every["pos"].long(), stable=True)
    order = order[torch.argsort(every["key"][order], stable=True)]
    order = order[torch.argsort(list_of[order], stable=True)]
    sorted_list = list_of[order]
    rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_list, sorted_list)
    keep = rank < S
    dest_list, dest_rank, source = sorted_list[keep], rank[keep], order[keep]
    # Every changed list had S entries and gets S back (its old ones are among the sorted ones).
    for name, target in lists.items():
        target[dest_list, dest_rank] = every[name][source]


def _example_views(stats: LayerStats, prefix: str) -> dict[str, torch.Tensor]:
    """One kind of random-example lists (``sample`` or ``band``) as flat ``[n_lists, S, ...]`` views."""
    size = getattr(stats, prefix + "_key").shape[-1]
    views = {}
    for name in ("key", "doc", "pos", "value", "gate", "in"):
        t = getattr(stats, f"{prefix}_{name}")
        views[name] = t.view(-1, size) if name in ("key", "doc", "pos") else t.view(-1, size, t.shape[-1])
    return views


#: Positions tested at a time (pairs (document, neuron) times their length, or first-stage
#: positions times the neurons): bounds the memory of the batches while the lists fill.
EXAMPLE_CHUNK = 1 << 20
#: While more than this share of a layer's sample lists is still not full (its first batch), a batch
#: first offers its lowest-priority positions, in growing chunks up to FIRST_STAGE positions: every
#: position can still enter, and each chunk tightens the lists for the next.
FILLING_SHARE, FIRST_STAGE = 0.01, 2048
#: Positions of lowest priority in a batch that are offered to every list (see update_examples).
PREFIX = 64


def _offer(stats: LayerStats, views: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
           hooks: tuple[torch.Tensor, ...], windows: tuple[torch.Tensor, torch.Tensor], counted: torch.Tensor,
           prio: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, neurons: torch.Tensor,
           doc_ids: torch.Tensor, lengths: torch.Tensor, packing: Packing | None,
           context: tuple[int, int]) -> None:
    """Offer the positions ``(rows, t)`` of ``neurons`` (index tensors broadcast to one grid) to
    the lists: those below their list's S-th priority enter. ``prio``: ``[B, T, G]``, the priority
    of each position for each group of neurons (one group for a dense layer)."""
    post, in_, gate, swish = hooks
    shape = torch.broadcast_shapes(rows.shape, t.shape, neurons.shape)
    rows, t, neurons = rows.expand(shape), t.expand(shape), neurons.expand(shape)
    g, i = gate[rows, t, neurons].float(), in_[rows, t, neurons].float()
    ok = (counted[rows, t] if counted.dim() == 2 else counted[rows, t, neurons]) & (g != 0) & (i != 0)
    group = neurons // (gate.shape[-1] // prio.shape[-1])
    p = prio[rows, t, group]
    case = (g < 0).long() * 2 + (i < 0).long()
    band = band_of(post[rows, t, neurons].float().abs())
    sample_list = neurons * N_CASES + case
    band_list = sample_list * N_BANDS + band
    for kind, lists in zip(views, (sample_list, band_list)):
        chosen = ok & (p < kind["key"][:, -1][lists])  # below the list's S-th priority
        if not bool(chosen.any()):
            continue
        r, at, n = rows[chosen], t[chosen], neurons[chosen]
        values = torch.stack([h[r, at, n].float() for h in hooks], dim=-1)
        cut_windows = windows_at
        if packing is not None:
            at = packing.positions[r, at, group[chosen]]
            cut_windows = packing.windows_at
        cand = {"key": p[chosen], "doc": doc_ids[r], "pos": at, "value": values,
                "gate": cut_windows(windows[0], r, at, n, lengths, *context),
                "in": cut_windows(windows[1], r, at, n, lengths, *context)}
        merge_examples(kind, lists[chosen], cand)


def update_examples(stats: LayerStats, batch: BatchReduction, doc_ids: torch.Tensor,
                    hooks: tuple[torch.Tensor, ...], counted: torch.Tensor, prio: torch.Tensor, lengths: torch.Tensor,
                    context_before: int, context_after: int, *, packing: Packing | None = None,
                    windows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Offer one batch's positions to the random-example lists (exactly; in place).

    ``hooks``: ``(post, in, gate, swish)`` ``[B, T, N]``; ``counted`` as in :func:`histogram_batch`;
    ``prio``: ``[B, T]`` sampling priorities; ``batch``: the batch's reduction, for its per-document
    counts and ``|post|`` ranges. A list keeps its S positions of lowest priority, so a position
    enters only below its list's S-th priority (its limit). Nothing here reads every value:

    * the batch's :data:`PREFIX` positions of lowest priority are offered to every list;
    * a later position has a priority above the prefix's, so only a list whose limit is above that
      too can take it: an *open* list, one whose positions have been rare so far (a rare case, a
      rare band). The documents that hold a position of an open list's case (count > 0) or band
      (the document's ``|post|`` range in the case reaches the band) are read, and only for the
      neurons concerned.

    While a layer's lists are still filling (its first batch), the lowest-priority positions go
    first, in growing chunks, so that the lists take S positions each instead of every position.
    ``packing``/``windows``: packed hooks, as in :func:`update_stats`; ``prio`` is then
    ``[B, T', G]`` (:meth:`Packing.priorities`): a position of one group is offered to its neurons."""
    post, in_, gate, swish = hooks
    windows = windows if windows is not None else (gate, in_)
    device = gate.device
    n_docs, t_max, n_neurons = gate.shape
    prio = prio if prio.dim() == 3 else prio[:, :, None]
    n_groups = prio.shape[-1]
    group_size = n_neurons // n_groups
    views = (_example_views(stats, "sample"), _example_views(stats, "band"))
    offer = functools.partial(_offer, stats, views, hooks, windows, counted, prio, doc_ids=doc_ids, lengths=lengths,
                              packing=packing, context=(context_before, context_after))
    flat = prio.reshape(-1)
    order = torch.argsort(flat)[:int((flat < EMPTY_PRIORITY).sum())]  # counted positions, lowest priority first
    neuron_ids = torch.arange(group_size, device=device)[None, :]
    filling = float((stats.sample_key[..., -1] == EMPTY_PRIORITY).float().mean()) > FILLING_SHARE
    prefix = min(len(order), FIRST_STAGE if filling else PREFIX)
    after = int(flat[order[prefix - 1]]) if prefix else -1  # every position up to this priority is offered
    if n_groups > 1:  # one position seen by several groups has one priority: keep its copies together
        prefix = int((flat <= after).sum())
    start, size = 0, 16 if filling else prefix
    while start < prefix:
        chunk = order[start:min(prefix, start + max(1, min(size, EXAMPLE_CHUNK // group_size)))]
        row_pos, group = chunk[:, None] // n_groups, chunk[:, None] % n_groups
        offer(row_pos // t_max, row_pos % t_max, group * group_size + neuron_ids)
        start, size = start + len(chunk), size * 2
    if prefix == len(order):
        return
    open_samples = stats.sample_key[..., -1] > after  # [N, C]
    open_bands = stats.band_key[..., -1] > after  # [N, C, R]
    edges = torch.as_tensor(BAND_EDGES, device=device)
    low, high = batch.doc_min_abs[..., 0], batch.doc_abs[..., 0]  # [B, N, C]: |post| range of the case
    reaches = (high[..., None] >= edges[:-1]) & (low[..., None] < edges[1:])  # [B, N, C, R]
    wanted = ((open_samples & (batch.doc_count > 0)).any(-1)
              | (open_bands & reaches & (high >= 0)[..., None]).flatten(2).any(-1))  # [B, N]
    pairs = wanted.nonzero()
    if pairs.numel() == 0:
        return
    rest = prio.masked_fill(prio <= after, EMPTY_PRIORITY)  # the prefix was offered already
    offer_rest = functools.partial(_offer, stats, views, hooks, windows, counted, rest, doc_ids=doc_ids,
                                   lengths=lengths, packing=packing, context=(context_before, context_after))
    # A pair whose neuron has an open case list is read whole; the others only at the positions whose
    # band of |post| is open in some case (post alone is read to find them).
    whole = open_samples.any(-1)[pairs[:, 1]]
    open_band = open_bands.any(1)  # [N, R]
    step = max(1, EXAMPLE_CHUNK // t_max)
    t = torch.arange(t_max, device=device)[None, :]
    for read_whole, part in ((True, pairs[whole]), (False, pairs[~whole])):
        for start in range(0, len(part), step):
            b, n = part[start:start + step].unbind(1)
            if read_whole:
                offer_rest(b[:, None], t, n[:, None])
                continue
            band = band_of(post[b[:, None], t, n[:, None]].float().abs())  # [M, T]
            j, at = (open_band[n[:, None], band] & (rest[b[:, None], t, (n // group_size)[:, None]] < EMPTY_PRIORITY)
                     ).nonzero(as_tuple=True)
            if j.numel():
                offer_rest(b[j], at, n[j])


def finite_positions(hooks: Sequence[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """``[B, T, N]``: the ``valid`` positions (``[B, T]`` or ``[B, T, N]``) where every hook is
    finite; the others count nowhere but in ``nonfinite``. ``torch.maximum`` propagates NaN, so one
    comparison covers NaN and inf in every hook."""
    largest = functools.reduce(torch.maximum, [h.float().abs() for h in hooks])
    return (valid if valid.dim() == 3 else valid[:, :, None]) & (largest < float("inf"))


@dataclass
class Candidates:
    """A batch's candidates for the random-example lists: per list, the batch's positions of lowest
    priority below the list's last priority, ascending (at most as many as the list holds; key
    EMPTY_PRIORITY and ``b``/``t`` -1 in unused slots). ``b`` is the batch row, ``t`` the position in
    it (the packed position where the hooks are packed). Merging them into the lists gives exactly
    what offering every position would (a position above its list's last priority cannot enter)."""

    sample_key: torch.Tensor  # [N, C, S] int64
    sample_b: torch.Tensor  # [N, C, S] int32
    sample_t: torch.Tensor  # [N, C, S] int32
    band_key: torch.Tensor  # [N, C, R, S2] int64
    band_b: torch.Tensor  # [N, C, R, S2] int32
    band_t: torch.Tensor  # [N, C, R, S2] int32

    @classmethod
    def empty(cls, d_mlp: int, samples: int, band_samples: int, device: torch.device | str = "cpu") -> "Candidates":
        lead_s, lead_b = (d_mlp, N_CASES, samples), (d_mlp, N_CASES, N_BANDS, band_samples)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.full(lead_s, EMPTY_PRIORITY, dtype=torch.int64, device=device), torch.full(lead_s, -1, **i32),
                   torch.full(lead_s, -1, **i32), torch.full(lead_b, EMPTY_PRIORITY, dtype=torch.int64, device=device),
                   torch.full(lead_b, -1, **i32), torch.full(lead_b, -1, **i32))


@dataclass
class BatchDistributions:
    """What one batch adds to the distributions, found before it is added (by the CPU kernel,
    :mod:`collect.fused`, or by :func:`find_candidates` on a GPU): its histogram tables (None where
    they are in the stored tables already) and its random-example candidates (None where
    :func:`update_examples` is to offer the batch's positions). ``candidate_positions``
    (int64 scalar) counts the (position, neuron) pairs below some list's limit, ``overflow`` (bool
    scalar) says whether they were more than a capacity allowed: then the candidates are incomplete
    and the batch must not be added."""

    candidates: Candidates | None  # None: offered by update_examples instead
    hist: torch.Tensor | None = None  # [N, C, H, B] int32
    density: torch.Tensor | None = None  # [N, C, G/2, G/2] int32
    candidate_positions: torch.Tensor | None = None
    overflow: torch.Tensor | None = None


def list_limits(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Each random-example list's last priority, ``[N, C]`` and ``[N, C, R]``: a position enters
    only below it (EMPTY_PRIORITY while the list is not full)."""
    return stats.sample_key[..., -1], stats.band_key[..., -1]


def find_candidates(stats: LayerStats, hooks: tuple[torch.Tensor, ...], counted: torch.Tensor, prio: torch.Tensor,
                    doc_ids: torch.Tensor, capacity: int, histogram: Callable[..., None] = histogram_batch, *,
                    filling: bool = False) -> BatchDistributions:
    """The batch's distributions without a host sync (the GPU's path): its histogram tables
    (``histogram``: :func:`histogram_batch` or its compiled form) and its :class:`Candidates`, the
    (position, neuron) pairs below their lists' limits, at most ``capacity`` of them
    (``nonzero_static``), ranked within their lists in fixed-size tensors. More pairs than
    ``capacity`` set ``overflow``. ``hooks``: ``(post, in, gate, swish)`` ``[B, T, N]``; ``counted``:
    ``[B, T]`` or ``[B, T, N]``; ``prio``: ``[B, T]``, or ``[B, T, N]`` per neuron (packed experts:
    each slot's position's priority, :meth:`Packing.priorities`).

    ``filling``: the lists may still be empty (a layer's first batch), so that about every position
    is below its limit: the limits are first lowered to each list's S-th lowest priority in this
    batch (``topk`` per list, :func:`batch_limits`), so that at most S pairs per list remain."""
    post, in_, gate, _ = hooks
    b_, t_, n_ = gate.shape
    samples, band_samples = stats.sample_key.shape[-1], stats.band_key.shape[-1]
    limit_s, limit_b = list_limits(stats)
    case = (gate < 0).long() * 2 + (in_ < 0).long()
    band = band_of(post.float().abs())
    sample_list = torch.arange(n_, device=gate.device) * N_CASES + case  # [B, T, N]
    band_list = sample_list * N_BANDS + band
    p = prio if prio.dim() == 3 else prio[:, :, None]
    mask = counted if counted.dim() == 3 else counted[:, :, None]
    in_case = mask & (gate != 0) & (in_ != 0)
    below_s, below_b = p < limit_s.reshape(-1)[sample_list], p < limit_b.reshape(-1)[band_list]
    if filling:
        last_s, last_b = batch_limits(p, in_case, case, band, samples, band_samples)
        below_s &= p <= last_s.reshape(-1)[sample_list]
        below_b &= p <= last_b.reshape(-1)[band_list]
    wanted = in_case & (below_s | below_b)
    found = wanted.sum()
    flat = torch.nonzero_static(wanted.reshape(-1), size=capacity, fill_value=-1).squeeze(1)
    real = flat >= 0
    flat = flat.clamp(min=0)
    b, t = flat // (t_ * n_), flat // n_ % t_
    key = prio[b, t] if prio.dim() == 2 else prio[b, t, flat % n_]
    doc = doc_ids.to(torch.int64)[b]
    buffers = []
    for lists, shaped, size in ((sample_list.reshape(-1)[flat], limit_s, samples),
                                (band_list.reshape(-1)[flat], limit_b, band_samples)):
        limits = shaped.reshape(-1)
        n_lists = limits.numel()
        lists = torch.where(real & (key < limits[lists]), lists, n_lists)  # not this kind's: after every list
        # Ascending by (list, key, document, position): stable sorts, the last key first.
        order = torch.argsort(t, stable=True)
        for k in (doc, key, lists):
            order = order[torch.argsort(k[order], stable=True)]
        sorted_lists = lists[order]
        rank = torch.arange(capacity, device=flat.device) - torch.searchsorted(sorted_lists, sorted_lists)
        slot = torch.where((rank < size) & (sorted_lists < n_lists), sorted_lists * size + rank, n_lists * size)
        out = []
        for values, fill in ((key, EMPTY_PRIORITY), (b, -1), (t, -1)):
            buffer = torch.full((n_lists * size + 1,), fill, dtype=values.dtype, device=flat.device)
            buffer.scatter_(0, slot, values[order])  # the last slot takes what is kept nowhere
            out.append(buffer[:-1].view(shaped.shape + (size,)))
        buffers.append(out)
    (sk, sb, st), (bk, bb, bt) = buffers
    candidates = Candidates(sk, sb.int(), st.int(), bk, bb.int(), bt.int())
    hist = torch.zeros_like(stats.hist)
    density = torch.zeros_like(stats.density)
    histogram(gate, in_, post, hooks[3], counted, torch.ones((), dtype=torch.int32, device=gate.device), hist, density)
    return BatchDistributions(candidates, hist, density, candidate_positions=found, overflow=found > capacity)


def batch_limits(prio: torch.Tensor, in_case: torch.Tensor, case: torch.Tensor, band: torch.Tensor, samples: int,
                 band_samples: int, chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Each list's S-th lowest priority among a batch's positions, ``[N, C]`` and ``[N, C, R]``
    (EMPTY_PRIORITY where the batch has fewer): no later position of the batch can enter the list.
    ``prio`` ``[B, T, 1]`` (or ``[B, T, N]``); ``in_case``, ``case``, ``band``: ``[B, T, N]``. Neurons in chunks of about
    ``chunk_bytes`` of priorities (a ``topk`` per case and per (case, band) over the positions)."""
    b, t, n = case.shape
    step = max(1, chunk_bytes // (8 * b * t))
    out_s = torch.full((n, N_CASES), EMPTY_PRIORITY, dtype=torch.int64, device=case.device)
    out_b = torch.full((n, N_CASES, N_BANDS), EMPTY_PRIORITY, dtype=torch.int64, device=case.device)
    for start in range(0, n, step):
        part = slice(start, min(n, start + step))
        p = (prio[..., part] if prio.shape[-1] == n > 1 else prio.expand(b, t, part.stop - part.start)).reshape(b * t, -1)
        c, r, ok = case[..., part].reshape(b * t, -1), band[..., part].reshape(b * t, -1), in_case[..., part].reshape(
            b * t, -1)
        for k in range(N_CASES):
            mine = ok & (c == k)
            if samples <= b * t:
                out_s[part, k] = torch.where(mine, p, EMPTY_PRIORITY).topk(samples, dim=0, largest=False).values[-1]
            for j in range(N_BANDS):
                if band_samples <= b * t:
                    out_b[part, k, j] = torch.where(mine & (r == j), p, EMPTY_PRIORITY).topk(
                        band_samples, dim=0, largest=False).values[-1]
    return out_s, out_b


def add_candidates(stats: LayerStats, candidates: Candidates, doc_ids: torch.Tensor, hooks: tuple[torch.Tensor, ...],
                   lengths: torch.Tensor, context_before: int, context_after: int, *,
                   packing: Packing | None = None, windows: tuple[torch.Tensor, torch.Tensor] | None = None,
                   applied: torch.Tensor | None = None, cut: Callable[..., torch.Tensor] | None = None) -> None:
    """Merge a batch's :class:`Candidates` into the random-example lists (in place): each list keeps
    its S entries of lowest priority (then document, then position), ascending. With ``applied`` (a
    device bool: the GPU's path) every list is merged, in fixed-size tensors, and kept as it was
    where ``applied`` is False; without it only the lists with a candidate (``nonzero``: a sync,
    free on a CPU). ``packing``/``windows``: packed hooks, as in :func:`update_stats` (the candidates'
    ``t`` are then slots); ``cut`` as in :func:`merge_top`."""
    cut_windows = cut or windows_at
    if packing is not None:
        cut_windows = functools.partial(packing.windows_at, syncs_free=applied is None)
    post, in_, gate, swish = hooks
    windows = windows if windows is not None else (gate, in_)
    for prefix, key, b, t in (("sample", candidates.sample_key, candidates.sample_b, candidates.sample_t),
                              ("band", candidates.band_key, candidates.band_b, candidates.band_t)):
        views = _example_views(stats, prefix)
        size = views["key"].shape[1]
        key, b, t = key.reshape(len(views["key"]), -1), b.reshape(len(views["key"]), -1).long(), t.reshape(
            len(views["key"]), -1).long()
        if applied is None:
            rows = (key[:, 0] != EMPTY_PRIORITY).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
        else:
            rows = torch.arange(len(key), device=key.device)
        key, b, t = key[rows], b[rows], t[rows]
        per_list = N_CASES if prefix == "sample" else N_CASES * N_BANDS
        filled = key != EMPTY_PRIORITY
        r, at = b.clamp(min=0), t.clamp(min=0)
        n = (rows // per_list)[:, None].expand_as(r)
        pos = packing.positions[r, at, n // packing.group_size] if packing is not None else at
        nan = float("nan")
        cand = {"key": key, "doc": torch.where(filled, doc_ids.to(torch.int64)[r], -1),
                "pos": torch.where(filled, pos, -1)}
        # Values and windows of the filled slots (all of them on the GPU's path: a fixed size).
        picked = filled.reshape(-1).nonzero().squeeze(1) if applied is None else None
        at_slots = [x.reshape(-1) if picked is None else x.reshape(-1)[picked] for x in (r, at, pos, n)]
        for name, cut in (
                ("value", torch.stack([h[at_slots[0], at_slots[1], at_slots[3]].float() for h in hooks], dim=-1)),
                ("gate", cut_windows(windows[0], at_slots[0], at_slots[2], at_slots[3], lengths, context_before,
                                    context_after)),
                ("in", cut_windows(windows[1], at_slots[0], at_slots[2], at_slots[3], lengths, context_before,
                                  context_after))):
            full = torch.full((filled.numel(), cut.shape[-1]), nan, dtype=cut.dtype, device=cut.device)
            if picked is None:
                full = torch.where(filled.reshape(-1, 1), cut, nan)
            else:
                full[picked] = cut
            cand[name] = full.view(key.shape + (-1,))
        every = {name: torch.cat([views[name][rows], cand[name].to(views[name].dtype)], dim=1) for name in views}
        # Ascending by (priority, document, position): stable sorts, the last key first.
        order = torch.argsort(every["doc"].long() * 2**16 + every["pos"].long(), dim=1, stable=True)
        order = order.gather(1, torch.argsort(every["key"].gather(1, order), dim=1, stable=True))[:, :size]
        for name, target in views.items():
            picked = every[name].gather(1, order if every[name].dim() == 2 else
                                        order[..., None].expand(-1, -1, every[name].shape[-1]))
            if applied is not None:
                picked = torch.where(applied, picked, target[rows])
            target[rows] = picked


def update_stats(
    stats: LayerStats,
    batch: BatchReduction,
    doc_ids: torch.Tensor,
    gate: torch.Tensor,
    in_: torch.Tensor,
    lengths: torch.Tensor,
    context_before: int,
    context_after: int,
    *,
    capacity: int | None = None,
    accept: torch.Tensor | None = None,
    hooks: tuple[torch.Tensor, ...] | None = None,
    valid: torch.Tensor | None = None,
    prio: torch.Tensor | None = None,
    packing: Packing | None = None,
    check_finite: bool = False,
    histogram: Callable[..., None] = histogram_batch,
    distributions: BatchDistributions | None = None,
    cut: Callable[..., torch.Tensor] | None = None,
    merge: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    examples: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one batch to ``stats`` in place: counts, sums (accumulated in float64), extremes, top-k,
    and where ``stats`` has distributions, the histograms and random examples. Those need what
    ``batch`` was reduced from: ``hooks`` ``(post, in, gate, swish)``, ``valid`` and ``prio`` (the
    positions' sampling priorities, ``[B, T]``); ``packing`` where those are packed (a
    mixture-of-experts layer's experts, :class:`Packing`: the hooks, ``gate``/``in_`` and ``valid`` are
    then packed, ``batch.doc_pos`` holds document positions); ``check_finite`` where ``batch`` came from the exact
    path, which counts non-finite values apart; ``histogram``: :func:`histogram_batch` or its
    compiled form; ``distributions``: the batch's histogram tables and example candidates where they
    were found already (:class:`BatchDistributions`), else the histograms are binned here and the
    examples offered by :func:`update_examples`; ``cut``: what cuts the windows (:func:`merge_top`);
    ``merge``: :func:`merge_top`, or a faster function that computes the same lists (the CPU kernel's);
    ``examples``: likewise for :func:`add_candidates`, for a batch added as it is (packed or not; the
    windows then come from ``hooks``' gate and in).
    ``capacity``, ``accept`` and the returned ``(applied, active)`` as in :func:`merge_top`: a batch
    not applied leaves every statistic as it was, decided on the device, without a host sync."""
    applied, active = (merge or merge_top)(stats, batch, doc_ids, gate, in_, lengths, context_before, context_after,
                                           capacity=capacity, accept=accept, cut=cut, packing=packing)
    updated = {
        "count": stats.count + batch.count,
        "nonfinite": stats.nonfinite + batch.nonfinite,
        "sum": stats.sum + batch.sum.double(),
        "min": torch.minimum(stats.min, batch.min),
        "max": torch.maximum(stats.max, batch.max),
    }
    conditional = accept is not None or capacity is not None
    for name, value in updated.items():
        setattr(stats, name, torch.where(applied, value, getattr(stats, name)) if conditional else value)
    if not stats.has_distributions:
        return applied, active
    if hooks is None or valid is None or prio is None:
        raise ValueError("statistics with distributions need hooks, valid and prio")
    post, hook_in, hook_gate, swish = hooks
    weight = applied.int()
    exact_examples = distributions is None or distributions.candidates is None
    # Only binning and update_examples read every position: the counted ones, finite where checked.
    counted = (finite_positions(hooks, valid) if check_finite else valid) if (
        distributions is None or exact_examples) else valid
    if distributions is None:
        histogram(hook_gate, hook_in, post, swish, counted, weight, stats.hist, stats.density)
    elif distributions.hist is not None and conditional:
        stats.hist += distributions.hist * weight
        stats.density += distributions.density * weight
    elif distributions.hist is not None:  # added as it is: no product the tables' size (0.2 GiB an OLMoE layer)
        stats.hist += distributions.hist
        stats.density += distributions.density
    elif conditional:  # the CPU kernel added them to the stored tables: only for a batch added as it is
        raise ValueError("a batch whose histograms are added already cannot be added conditionally")
    if exact_examples:
        if conditional:
            raise ValueError("a batch added conditionally needs its example candidates (find_candidates)")
        update_examples(stats, batch, doc_ids, hooks, counted, prio if packing is None else packing.priorities(prio),
                        lengths, context_before, context_after, packing=packing, windows=(gate, in_))
    elif examples is not None and not conditional:
        examples(stats, distributions.candidates, doc_ids, hooks, lengths, context_before, context_after,
                 packing=packing)
    else:
        add_candidates(stats, distributions.candidates, doc_ids, hooks, lengths, context_before, context_after,
                       packing=packing, windows=(gate, in_), applied=applied if conditional else None, cut=cut)
    return applied, active


def add_batch(
    stats: LayerStats,
    batch: BatchReduction,
    doc_ids: torch.Tensor,
    gate: torch.Tensor,
    in_: torch.Tensor,
    lengths: torch.Tensor,
    context_before: int,
    context_after: int,
    **distributions: Any,
) -> LayerStats:
    """``stats`` updated with one batch (in place; returned for convenience); ``distributions``:
    the keywords of :func:`update_stats` that the distributions need."""
    update_stats(stats, batch, doc_ids, gate, in_, lengths, context_before, context_after, **distributions)
    return stats


def merge_stats(a: LayerStats, b: LayerStats) -> LayerStats:
    """Statistics of the union of two disjoint document sets (documents indexed alike)."""
    k = a.k
    top_key, idx = torch.cat([a.top_key, b.top_key], dim=-1).topk(k, dim=-1)
    # The windows are merged where a's live (host memory on the GPU's path), the rest on the device.
    a_gate, a_in = a.ordered_windows()
    b_gate, b_in = (w.to(a_gate.device) for w in b.ordered_windows())

    def pick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _gather_k(torch.cat([x, y], dim=3), idx.to(x.device))

    merged = LayerStats(
        count=a.count + b.count,
        nonfinite=a.nonfinite + b.nonfinite,
        sum=a.sum + b.sum,
        min=torch.minimum(a.min, b.min),
        max=torch.maximum(a.max, b.max),
        top_key=top_key,
        top_pos=pick(a.top_pos, b.top_pos),
        top_slot=torch.arange(k, dtype=SLOT_DTYPE, device=idx.device).expand_as(idx).contiguous(),
        win_gate=pick(a_gate, b_gate),
        win_in=pick(a_in, b_in),
        writes=WindowWrites() if a.writes is not None else None,
    )
    if a.has_distributions:
        merged.hist = a.hist + b.hist
        merged.density = a.density + b.density
        for prefix in ("sample", "band"):
            for name in ("key", "doc", "pos", "value", "gate", "in"):
                setattr(merged, f"{prefix}_{name}", getattr(a, f"{prefix}_{name}").clone())
            views, other = _example_views(merged, prefix), _example_views(b, prefix)
            filled = other["key"] != EMPTY_PRIORITY
            lists = torch.arange(len(filled), device=filled.device)[:, None].expand_as(filled)[filled]
            merge_examples(views, lists, {name: t[filled] for name, t in other.items()})
    return merged


def compiled_reduce_batch(enabled: bool, *, exact_on_suspect: bool = True) -> Callable[..., BatchReduction]:
    """:func:`reduce_batch`, fused by ``torch.compile`` when ``enabled`` (about 28x faster on a
    CPU; the same code becomes Triton kernels on CUDA). Batches run the fast path that assumes
    finite values. With ``exact_on_suspect`` the rare batch with a NaN or inf is reduced again with
    the check (compiled on first need), at the cost of one host sync per call; without it the
    result comes back as it is, ``suspect`` set on the device, for the caller to redo later
    (:func:`collect.run.collect_statistics` does, once per batch for all layers)."""
    compile = (lambda f: torch.compile(f, dynamic=True)) if enabled else (lambda f: f)
    fast = compile(functools.partial(reduce_batch, assume_finite=True))
    if not exact_on_suspect:
        return fast
    exact: list[Callable[..., BatchReduction]] = []

    def reduce(*args: torch.Tensor) -> BatchReduction:
        reduced = fast(*args)
        if not bool(reduced.suspect):
            return reduced
        if not exact:
            exact.append(compile(reduce_batch))
        return exact[0](*args)

    return reduce


def state_window_dtype(window_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The smallest dtype that holds the windows exactly as the file will store them: float16
    for float16 files; for float32 files the model's own 16-bit dtype when it runs in one (its
    values are bfloat16 or float16 already), else float32."""
    if window_dtype == "float16":
        return torch.float16
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32
