"""The device memory a collection needs, and how it avoids host syncs within it: the statistics'
size per layer, the check that they fit next to the model (naming ``--layers`` groups that do),
the capacity of list changes a batch may make without a sync, and the out-of-memory message."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from collect.config import CollectConfig
from collect.model import LoadedModel
from collect.stats import state_bytes_per_neuron, state_window_dtype
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import SHARED


def state_bytes(d_mlp: int, n_layers: int, config: CollectConfig, model_dtype: torch.dtype,
                part: str = "all") -> int:
    """Bytes of the statistics a collection keeps (:class:`LayerStats` of every recorded layer):
    ``all`` of them (a CPU run), or on a GPU the ``device`` part and the ``host`` part (the top-k
    windows, kept in host memory: :data:`collect.stats.HOST_TABLES`)."""
    window = config.context_before + 1 + config.context_after
    return state_bytes_per_neuron(config.k, window, state_window_dtype(config.window_dtype, model_dtype),
                                  config.samples, config.band_samples, part) * d_mlp * n_layers


def on_device(device: torch.device) -> str:
    """The part of the statistics (:func:`state_bytes`) that a run on ``device`` keeps there."""
    return "all" if device.type == "cpu" else "device"


def layer_groups(layers: list[int], per_layer: int, budget: int) -> list[list[int]]:
    """``layers`` cut into consecutive groups of equal size whose statistics fit in ``budget``
    bytes each: one collection per group (``--layers``), merged into one file by ``gluscope merge``."""
    per_group = max(1, budget // max(per_layer, 1))
    n_groups = -(-len(layers) // per_group)
    size = -(-len(layers) // n_groups)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def _even_chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``size``, as even as possible."""
    n = -(-len(items) // max(size, 1))
    step = -(-len(items) // n)
    return [items[i:i + step] for i in range(0, len(items), step)]


def _span(values: list[int | str]) -> str:
    """``0-15`` for a run of integers, else a comma list (``s`` for the shared expert)."""
    numbers = [v for v in values if v != SHARED]
    text = ",".join(map(str, numbers))
    if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        text = f"{numbers[0]}-{numbers[-1]}"
    return ",".join(t for t in (text, SHARED if SHARED in values else "") if t)


@dataclass
class Group:
    """One collection of a plan: ``--layers`` and, for mixture-of-experts layers, ``--experts``
    (None: every expert)."""

    layers: list[int]
    experts: list[int | str] | None = None
    neurons: int = 0

    def options(self) -> str:
        text = f"--layers {_span(self.layers)}"
        return text + (f" --experts {_span(self.experts)}" if self.experts is not None else "")


@dataclass
class StatePlan:
    """The statistics a run keeps on its device, and the groups of layers and experts to collect
    separately (then join with ``gluscope merge``) where they do not fit: every neuron is in
    exactly one group."""

    per_neuron: int  # bytes
    neurons: int
    groups: list[Group]

    @property
    def total(self) -> int:
        return self.per_neuron * self.neurons


def plan_groups(loaded: LoadedModel, layers: list[int], experts: dict[int, list[int | str]], per_neuron: int,
                budget: int, requested: list[int | str] | None = None, where: str = "on the device") -> StatePlan:
    """Groups of layers and experts whose statistics fit ``budget`` bytes each (``per_neuron`` bytes a
    neuron; ``experts``: the experts recorded at each MoE layer, ``requested`` the run's ``--experts``).
    Whole layers where the largest fits (fewest runs: consecutive layers packed together); else the
    dense layers and the shared experts in groups of their own (``--experts s``), and the routed
    experts of every MoE layer in ranges of experts (``--layers <MoE layers> --experts a-b``), cut by
    layers too where not even one expert of every MoE layer fits. Every neuron is in one group."""
    from collect.config import experts_key, state_sizes

    sizes = state_sizes(loaded, layers, experts)
    per_layer = {layer: sizes.get(layer, 0) + sizes.get(experts_key(layer), 0) + sizes.get(f"{layer}.{SHARED}", 0)
                 for layer in layers}
    total = sum(per_layer.values())
    capacity = budget // per_neuron

    def packed(units: dict[int, int], options: list[int | str] | None) -> list[Group]:
        """Consecutive layers in as few groups as fit, as even as they can be."""
        if not units:
            return []
        greedy: list[list[int]] = []
        size = 0
        for layer, n in units.items():
            if not greedy or size + n > capacity:
                greedy.append([])
                size = 0
            greedy[-1].append(layer)
            size += n
        even = _even_chunks(list(units), -(-len(units) // len(greedy)))
        chunks = even if len(even) == len(greedy) and all(sum(units[x] for x in c) <= capacity for c in even) \
            else greedy
        return [Group(c, options, sum(units[x] for x in c)) for c in chunks]

    if max(per_layer.values()) <= capacity:  # whole layers (all at once if they fit)
        return StatePlan(per_neuron, total, packed(per_layer, requested))
    moe_layers = [layer for layer in layers if experts_key(layer) in sizes]
    if not moe_layers:  # dense layers only: no smaller unit than a layer
        widest = max(per_layer.values())
        raise GluscopeError(f"not even one layer's statistics fit: {widest * per_neuron / 2**30:.2f} GiB for its "
                            f"{widest:,} neurons, {budget / 2**30:.2f} GiB free {where} next to the model; a smaller "
                            "--batch-tokens leaves more room")
    routed = [e for e in experts[moe_layers[0]] if e != SHARED]
    d_expert = loaded.moe[moe_layers[0]].d_expert
    if d_expert > capacity:
        raise GluscopeError(f"not even one expert's statistics fit: {d_expert * per_neuron / 2**30:.2f} GiB for its "
                            f"{d_expert:,} neurons, {budget / 2**30:.2f} GiB free {where} next to the model")
    # The dense layers and the shared experts (which see every token) first, by whole layers.
    dense = {layer: n for layer in layers if (n := sizes.get(layer, 0) + sizes.get(f"{layer}.{SHARED}", 0))}
    groups = [g for g in packed({layer: n for layer, n in dense.items() if layer not in loaded.moe}, None)]
    shared = {layer: n for layer, n in dense.items() if layer in loaded.moe}
    if shared:  # (dense layers then ride along with the shared experts where they fit)
        groups = packed(dense, [SHARED])
    # The routed experts: ranges of experts over as many MoE layers as fit.
    per_range = capacity // (d_expert * len(moe_layers))
    layer_chunks = [moe_layers] if per_range >= 1 else _even_chunks(moe_layers, max(1, capacity // d_expert))
    for chunk_layers in layer_chunks:
        per = max(1, capacity // (d_expert * len(chunk_layers)))
        for chunk in _even_chunks(routed, per):
            groups.append(Group(list(chunk_layers), chunk, len(chunk) * d_expert * len(chunk_layers)))
    return StatePlan(per_neuron, total, groups)


def working_bytes(loaded: LoadedModel, config: CollectConfig) -> int:
    """The batch's hooks and the statistics' float32 temporaries of the widest recorded layer: a
    rough bound, measured generous (for experts: their packed rows, padded, at top_k / n_experts of
    the tokens)."""
    widest = loaded.d_mlp
    for moe in loaded.moe.values():
        top_k = moe.top_k or moe.n_experts
        widest = max(widest, 2 * top_k * moe.d_expert + (moe.shared.d_mlp if moe.shared else 0))
    return config.batch_tokens * widest * 4 * 12


def plan_line(loaded: LoadedModel, layers: list[int], config: CollectConfig, experts: dict[int, list[int | str]],
              free: int | None = None) -> str:
    """The run's plan in one line, printed before the first batch: what its statistics hold and
    need on the device, and (on a GPU) what is free next to the model."""
    from collect.config import state_sizes

    sizes = state_sizes(loaded, layers, experts)
    per_neuron = state_bytes(1, 1, config, loaded.dtype, on_device(loaded.device))
    neurons = sum(sizes.values())
    dense = [layer for layer in layers if layer not in loaded.moe]
    parts = [f"{len(dense)} dense layer{'s' * (len(dense) != 1)}"] if dense else []
    if experts:
        n_routed = {len([e for e in chosen if e != SHARED]) for chosen in experts.values()}
        shared = any(SHARED in chosen for chosen in experts.values())
        parts.append(f"{len(experts)} MoE layer{'s' * (len(experts) != 1)} ({'/'.join(map(str, sorted(n_routed)))} "
                     f"routed experts each{' + shared' if shared else ''})")
    text = (f"statistics of {neurons:,} neurons ({', '.join(parts)}): {neurons * per_neuron / 2**30:.2f} GiB on "
            f"{loaded.device} at {per_neuron:,} bytes a neuron")
    if loaded.device.type != "cpu":
        host = state_bytes(1, 1, config, loaded.dtype, "host")
        text += f" (and their top-k windows in host memory: {neurons * host / 2**30:.2f} GiB at {host:,} bytes a neuron)"
    if free is not None:
        text += f"; {free / 2**30:.1f} GiB free next to the model"
    return text


def available_host_memory() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable`` of ``/proc/meminfo``: free
    memory and the page cache the kernel can drop), or None where the system does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Budget:
    """Room for statistics in one kind of memory: ``per_neuron`` bytes a neuron within ``budget`` bytes."""

    where: str  # "on cuda:0", "in host memory"
    per_neuron: int
    budget: int
    free: int

    @property
    def capacity(self) -> int:
        return self.budget // self.per_neuron if self.per_neuron else 2**62


def _budgets(loaded: LoadedModel, config: CollectConfig) -> list[Budget]:
    """What the statistics need where they live: on a GPU its device part on the card and the top-k
    windows in host memory; on a CPU all of it in host memory (beside the model, already loaded)."""
    working = working_bytes(loaded, config)
    out = []
    if loaded.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(loaded.device)
        out.append(Budget(f"on {loaded.device}", state_bytes(1, 1, config, loaded.dtype, "device"),
                          int(free * 0.9) - working, free))
    host = available_host_memory()
    if host is not None:
        part = "all" if loaded.device.type == "cpu" else "host"
        spare = working if loaded.device.type == "cpu" else 0
        out.append(Budget("in host memory", state_bytes(1, 1, config, loaded.dtype, part), int(host * 0.9) - spare, host))
    return out


def check_state_fits(loaded: LoadedModel, layers: list[int], config: CollectConfig,
                     experts: dict[int, list[int | str]] | None = None) -> str:
    """Before the first batch: the run's plan (:func:`plan_line`, which the run prints), and the
    refusal of a collection whose statistics cannot fit next to the model: on a GPU, their device part
    on the card (a 7B model in bfloat16 and all its layers' statistics need about 5.1 GiB there;
    OLMoE-1B-7B's million expert neurons about 15 GiB) and their top-k windows in host memory (6.4 and
    19 GiB); on a CPU, all of it in host memory. The refusal names the groups of layers and experts
    that fit both (the one with less room decides): running out of memory mid-run would waste the run."""
    experts = experts or {}
    budgets = _budgets(loaded, config)
    free = next((b.free for b in budgets if b.where != "in host memory"), None)
    for budget in budgets:
        if budget.budget < budget.per_neuron:
            raise GluscopeError(
                f"out of memory at --batch-tokens {config.batch_tokens}: {budget.free / 2**30:.1f} GiB free "
                f"{budget.where} after loading the model; rerun with a smaller --batch-tokens")
    if not budgets:
        return plan_line(loaded, layers, config, experts, free)
    tightest = min(budgets, key=lambda b: b.capacity)
    plan = plan_groups(loaded, layers, experts, tightest.per_neuron, tightest.budget, config.experts, tightest.where)
    if len(plan.groups) == 1:
        return plan_line(loaded, layers, config, experts, free) + (": one run" if free is not None else "")
    spans = " then ".join(g.options() for g in plan.groups)
    what = f"{len(layers)} layers" if not loaded.moe else f"{len(layers)} layers ({plan.neurons:,} neurons with experts)"
    kind = "statistics" if tightest.where != "in host memory" or loaded.device.type == "cpu" else "statistics' top-k windows"
    raise GluscopeError(
        f"the {kind} of {what} need {plan.total / 2**30:.1f} GiB {tightest.where}, "
        f"{max(tightest.budget, 0) / 2**30:.1f} GiB is free next to the model; collect them in {len(plan.groups)} groups "
        f"({spans}, each with the same other options; each may run under torchrun) and join the files with "
        "gluscope merge (a smaller --batch-tokens leaves more room)")


def has_nonzero_static(device: torch.device) -> bool:
    """Whether this torch has ``nonzero_static`` on ``device`` (else: ``nonzero``, with a sync)."""
    try:
        torch.nonzero_static(torch.ones(2, dtype=torch.bool, device=device), size=1)
        return True
    except (NotImplementedError, RuntimeError, AttributeError):
        return False


class ListCapacity:
    """How many lists per layer a batch may change without a host sync (``nonzero_static``): on
    a GPU, sized from the last batch's changed lists per document (the number falls as the lists
    fill, and batches of shorter documents hold more documents), so that overflowing it, which
    costs a second forward pass of the batch, stays rare. ``None`` on a CPU, where a sync costs
    nothing and ``nonzero`` finds exactly the lists that change."""

    MARGIN, FLOOR = 2.0, 4096
    ON_CPU = False  # tests run the GPU's path on a CPU

    def __init__(self, device: torch.device, n_lists: int) -> None:
        self.exact = (device.type == "cpu" and not self.ON_CPU) or not has_nonzero_static(device)
        self.n_lists = n_lists
        self.per_doc: float | None = None  # unknown before the first batch: it changes every list

    def current(self, n_docs: int) -> int | None:
        if self.exact:
            return None
        if self.per_doc is None:
            return self.n_lists
        return min(self.n_lists, max(self.FLOOR, int(self.per_doc * n_docs * self.MARGIN)))

    def observe(self, active: int, n_docs: int) -> None:
        self.per_doc = active / n_docs


class PackedLength:
    """The packed length of a mixture-of-experts layer's experts (slots per document and expert,
    :func:`collect.moe.pack_experts`) without a host sync: on a GPU, a bucket above the last
    batch's most tokens of one expert in one document (per token of the batch's length), with a
    margin, so that a batch that overflows it (flagged on the device, redone exactly) stays rare;
    the first batch uses the batch's length, which always fits. ``None`` on a CPU: the exact length
    (a sync that costs nothing there)."""

    MARGIN = 1.5
    ON_CPU = False  # tests run the GPU's path on a CPU

    def __init__(self, device: torch.device) -> None:
        self.exact = device.type == "cpu" and not self.ON_CPU
        self.share: float | None = None  # the last batch's most tokens of one expert per position

    def current(self, length: int) -> int | None:
        if self.exact:
            return None
        if self.share is None:
            return length
        from collect.moe import bucket

        return min(length, bucket(int(self.share * length * self.MARGIN) + 1))

    def observe(self, most: int, length: int) -> None:
        self.share = most / length
class CandidateCapacity:
    """How many (position, neuron) pairs of a layer-batch may be random-example candidates on the
    GPU's path (``nonzero_static``): sized from earlier batches' candidates per document, which fall
    as the lists fill. In a layer's first batch (``filling``) every position is below its empty
    list's limit: the limits are lowered to the batch's own first S per list, so that at most every
    list's length of pairs remain (``n_slots``: the lists' slots of a layer)."""

    MARGIN, FLOOR = 2.0, 4096

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.per_doc: float | None = None

    @property
    def filling(self) -> bool:
        return self.per_doc is None

    def current(self, n_docs: int) -> int:
        if self.per_doc is None:
            return self.n_slots
        return max(self.FLOOR, int(self.per_doc * n_docs * self.MARGIN))

    def observe(self, found: int, n_docs: int) -> None:
        self.per_doc = found / n_docs


def keep_hooks(loaded: LoadedModel, layers: list[int], config: CollectConfig, on_gpu_path: bool) -> bool:
    """Whether the GPU's path keeps each batch's hooks until its one host sync, so that a flagged
    layer-batch is redone from them instead of by a second forward pass: on a CPU always (the hooks
    are host memory like any other), on a GPU where all layers' (gate, in, post) fit in a quarter of
    the memory left free next to the model and the statistics."""
    if not on_gpu_path or loaded.device.type == "cpu":
        return True
    free, _ = torch.cuda.mem_get_info(loaded.device)
    itemsize = torch.empty((), dtype=loaded.dtype).element_size()
    needed = 3 * config.batch_tokens * loaded.d_mlp * itemsize * len(layers)
    return needed <= (free - state_bytes(loaded.d_mlp, len(layers), config, loaded.dtype, "device")) // 4


@contextlib.contextmanager
def out_of_memory_hint(config: CollectConfig) -> Iterator[None]:
    """Out of device memory becomes one line naming the option that sizes the batches."""
    try:
        yield
    except torch.OutOfMemoryError:
        smaller = max(config.batch_tokens // 2, 1)
        raise GluscopeError(
            f"out of memory at --batch-tokens {config.batch_tokens}; rerun with a smaller value such as "
            f"--batch-tokens {smaller} (checkpoints hold whole batches of one size, so start over: "
            "--resume needs the same --batch-tokens)") from None
