"""The device memory a collection needs, and how it avoids host syncs within it: the statistics'
size per layer, the check that they fit next to the model (naming ``--layers`` groups that do),
the capacity of list changes a batch may make without a sync, and the out-of-memory message."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from collect.config import CollectConfig
from collect.model import LoadedModel
from collect.stats import state_bytes_per_neuron, state_window_dtype
from mkdocs_gluscope.errors import GluscopeError


def state_bytes(d_mlp: int, n_layers: int, config: CollectConfig, model_dtype: torch.dtype) -> int:
    """Bytes of the statistics a collection keeps on its device (:class:`LayerStats` of every
    recorded layer)."""
    window = config.context_before + 1 + config.context_after
    return state_bytes_per_neuron(config.k, window, state_window_dtype(config.window_dtype, model_dtype),
                                  config.samples, config.band_samples) * d_mlp * n_layers


def layer_groups(layers: list[int], per_layer: int, budget: int) -> list[list[int]]:
    """``layers`` cut into consecutive groups of equal size whose statistics fit in ``budget``
    bytes each: one collection per group (``--layers``), merged into one file by ``gluscope merge``."""
    per_group = max(1, budget // max(per_layer, 1))
    n_groups = -(-len(layers) // per_group)
    size = -(-len(layers) // n_groups)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def check_state_fits(loaded: LoadedModel, layers: list[int], config: CollectConfig) -> None:
    """On a GPU, refuse before the first batch a collection whose statistics cannot fit next to
    the model (a 7B model in bfloat16 and all its layers' statistics need about 24 GiB), naming
    the layer groups that do fit: running out of memory mid-run would waste the run."""
    if loaded.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(loaded.device)
    per_layer = state_bytes(loaded.d_mlp, 1, config, loaded.dtype)
    # The batch's hooks and the statistics' float32 temporaries: a rough bound, measured generous.
    working = config.batch_tokens * loaded.d_mlp * 4 * 12
    budget = int(free * 0.9) - working
    if per_layer * len(layers) <= budget:
        return
    if budget < per_layer:
        raise GluscopeError(
            f"out of memory at --batch-tokens {config.batch_tokens}: {free / 2**30:.1f} GiB free on {loaded.device} "
            f"after loading the model; rerun with a smaller --batch-tokens")
    groups = layer_groups(layers, per_layer, budget)
    spans = " then ".join("--layers " + (str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}"
                                         if g == list(range(g[0], g[-1] + 1)) else ",".join(map(str, g)))
                          for g in groups)
    raise GluscopeError(
        f"the statistics of {len(layers)} layers need {per_layer * len(layers) / 2**30:.1f} GiB on {loaded.device}, "
        f"{max(budget, 0) / 2**30:.1f} GiB is free next to the model; collect the layers in {len(groups)} groups "
        f"({spans}, each with the same other options; each may run under torchrun) and join the files with "
        "gluscope merge")


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
    return needed <= (free - state_bytes(loaded.d_mlp, len(layers), config, loaded.dtype)) // 4


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
