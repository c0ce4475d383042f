"""The collection run: one pass of the model over the corpus, statistics on the device, one file.

Robustness: the state is checkpointed atomically every ``checkpoint_every`` seconds and on Ctrl-C
or SIGTERM (at the end of the batch in flight, so a checkpoint always holds whole batches);
``resume`` continues from it and gives the same file as an uninterrupted run. A checkpoint
remembers the options and a fingerprint of the tokenized corpus, so it is never resumed over
other documents. The file itself is written to ``OUT.tmp`` and renamed, so a file at ``OUT`` is
always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from collect.corpus import (BOS_MODES, Corpus, dataset_source, plan_batches, read_texts, token_strings,
                            tokenize_corpus)
from collect.model import (DTYPE_CHOICES, ENGINES, LoadedModel, dtype_name, load_model, max_positions,
                           resolve_device, run_with_mlp_hooks)
from collect import distributed
from collect.distributed import World, any_rank, broadcast_object, merge_into_rank0
from collect.stats import (N_CASES, N_HOOKS, BatchReduction, LayerStats, compiled_histogram_batch,
                           compiled_reduce_batch, hist_and_density, histogram_batch, reduce_batch,
                           state_bytes_per_neuron, state_window_dtype, update_stats)
from collect.moe import expert_batches
from collect.vocab import file_vocab
from mkdocs_gluscope.distributions import (BAND_SAMPLES, EMPTY_PRIORITY, SAMPLES, document_pieces,
                                           position_priority)
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import SHARED, ActivationsWriter, expert_label, first_counted_position


@dataclass
class CollectConfig:
    """Every option of ``gluscope collect`` (see ``gluscope collect --help``)."""

    model: str
    dataset: list[str]
    out: Path
    text_column: str = "text"
    split: str = "train"
    seed: int = 0
    max_tokens: int = 20_000_000
    max_doc_tokens: int = 1024
    long_docs: str = "truncate"
    bos: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    layers: list[int] | None = None
    experts: list[int | str] | None = None  # routed experts (and "s", the shared expert) to record; None: all
    engine: str = "hf"
    k: int = 16
    context_before: int = 16
    context_after: int = 2
    include_bos: bool = False
    skip_positions: int = 0
    refactor_glu: bool = True
    batch_tokens: int = 8192
    compile: bool = True
    window_dtype: str = "float16"
    samples: int = SAMPLES  # random examples per case; 0: no distributions (histograms, density, samples, bands)
    band_samples: int = BAND_SAMPLES  # random examples per case and band of |post|
    shard: str | None = None
    resume: bool = False
    checkpoint_every: float = 600.0
    progress: bool = True
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        return self.out.with_name(self.out.name + ".ckpt")

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        skip = {"out", "resume", "checkpoint_every", "progress", "compile", "device", "engine"}
        return {k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self).items() if k not in skip}

    def counted_from(self, has_bos: bool) -> int:
        """First counted position of every document: the store's one definition."""
        return first_counted_position({"has_bos": has_bos, "include_bos": self.include_bos,
                                       "skip_positions": self.skip_positions})


@dataclass
class RunFacts:
    """What a run resolved that its options alone do not fix; a checkpoint must match these too
    (``dtype`` ``auto`` may resolve otherwise on another machine; the corpus files may change)."""

    dtype: str
    corpus_sha256: str


class Interrupted(GluscopeError):
    """Ctrl-C or SIGTERM: the run stopped at a batch boundary and left a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports a process killed by it: 130 for Ctrl-C, 143 for
        SIGTERM (what batch schedulers send before they kill a preempted job)."""
        return 128 + int(self.signum)


def check_config(config: CollectConfig) -> None:
    """Cheap checks before any model or corpus is loaded."""
    if config.max_tokens <= 0:
        raise GluscopeError(f"--max-tokens {config.max_tokens}; expected a positive count such as 200k")
    if config.k < 1:
        raise GluscopeError(f"--k {config.k}; expected at least 1")
    if config.context_before < 0 or config.context_after < 0:
        raise GluscopeError("--context-before and --context-after must be 0 or more")
    if not 1 <= config.max_doc_tokens <= 2**16:
        raise GluscopeError(f"--max-doc-tokens {config.max_doc_tokens}; expected 1 to 65536")
    if config.batch_tokens < 1:
        raise GluscopeError(f"--batch-tokens {config.batch_tokens}; expected a positive number")
    if config.dtype not in DTYPE_CHOICES:
        raise GluscopeError(f"--dtype {config.dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    if config.bos not in BOS_MODES:
        raise GluscopeError(f"--bos {config.bos!r}; expected one of {', '.join(BOS_MODES)}")
    if config.long_docs not in ("truncate", "split"):
        raise GluscopeError(f"--long-docs {config.long_docs!r}; expected truncate or split")
    if config.engine not in ENGINES:
        raise GluscopeError(f"--engine {config.engine!r}; expected one of {', '.join(ENGINES)}")
    if config.samples < 0 or config.band_samples < 1:
        raise GluscopeError(f"--samples {config.samples} --band-samples {config.band_samples}; expected --samples 0 "
                            "or more (0: no distributions) and --band-samples 1 or more")
    if config.samples > 0 and config.max_tokens > 2**31 - 1:
        raise GluscopeError(f"--max-tokens {config.max_tokens}: histograms count up to 2**31 - 1 positions per run; "
                            "collect fewer tokens per run (--shard) and join the files with gluscope merge")
    if config.window_dtype not in ("float16", "float32"):
        raise GluscopeError(f"--window-dtype {config.window_dtype!r}; expected float16 or float32")
    if config.layers is not None and not config.layers:
        raise GluscopeError("--layers names no layer; expected layers such as 3, 0,5,7 or 2-4")
    if config.experts is not None and not config.experts:
        raise GluscopeError("--experts names no expert; expected experts such as 3, 0-7 or 0-7,s")
    if not 0 <= config.skip_positions < config.max_doc_tokens - 1:
        raise GluscopeError(f"--skip-positions {config.skip_positions}; expected 0 to "
                            f"{config.max_doc_tokens - 2} (below --max-doc-tokens {config.max_doc_tokens} - 1)")
    if config.include_bos and config.skip_positions > 0:
        # first_counted_position would skip the BOS again: --include-bos would quietly do nothing.
        raise GluscopeError(f"--include-bos counts the BOS position, --skip-positions {config.skip_positions} "
                            "leaves out the first positions after it; use one of them")
    resolve_device(config.device)  # a bad --device fails before the model loads
    dataset_source(config.dataset)  # a mistyped path fails now, not after the model has loaded
    out_dir = config.out.parent if str(config.out.parent) else Path(".")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".gluscope-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GluscopeError(f"cannot write --out {str(config.out)!r}: {e.strerror or e}") from None
    parse_shard(config.shard)
    if config.out.is_dir():
        raise GluscopeError(f"--out {str(config.out)!r} is a folder; expected a file path such as run.h5")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` as (I, N); no shard is (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise GluscopeError(f"--shard {shard!r}; expected I/N such as 0/4") from None
    if not 0 <= index < count:
        raise GluscopeError(f"--shard {shard!r}; expected 0 <= I < N")
    return index, count


def shard_batches(corpus: Corpus, batch_tokens: int, shard: str | None) -> list:
    """This shard's batches: every N-th batch of the whole corpus's plan, so shards of similar
    work share the documents, and every shard numbers documents alike."""
    index, count = parse_shard(shard)
    batches = plan_batches(corpus.lengths, batch_tokens)
    if index >= len(batches):
        raise GluscopeError(f"--shard {shard}: the corpus makes only {len(batches)} batches; use fewer shards")
    return batches[index::count]


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise GluscopeError(f"--layers {bad}: this model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


def resolve_experts(experts: list[int | str] | None, loaded: LoadedModel) -> dict[int, list[int | str]]:
    """The experts to record at each requested mixture-of-experts layer: ``--experts`` (routed ones by
    index, ``s`` for the shared expert), by default every expert."""
    plan: dict[int, list[int | str]] = {}
    for layer, moe in loaded.moe.items():
        available: list[int | str] = list(range(moe.n_experts)) + ([SHARED] if moe.shared is not None else [])
        if experts is None:
            plan[layer] = available
            continue
        bad = [e for e in experts if e not in available]
        if bad:
            has = f"0..{moe.n_experts - 1}" + (" and s (shared)" if moe.shared is not None else "")
            raise GluscopeError(f"--experts {','.join(map(str, bad))}: layer {layer} has experts {has}")
        plan[layer] = [e for e in available if e in experts]
    return plan


def expert_key(layer: int, expert: int | str) -> str:
    """An expert's key among the run's statistics (and in checkpoints): its neuron id prefix."""
    return f"{layer}.{expert_label(expert)}"


class _CtrlC:
    """The first Ctrl-C or SIGTERM asks the loop to stop after the batch in flight; a second one
    aborts. SIGTERM is how clusters preempt a job (Slurm, Kubernetes): it gets the same
    checkpoint, and the grace period before SIGKILL must cover one batch."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_CtrlC":
        if threading_is_main():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ngluscope: {name}: stopping after this batch to write a checkpoint (again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def checkpoint_fingerprint(config: CollectConfig, facts: RunFacts) -> dict[str, Any]:
    return {**config.fingerprint(), **{f"resolved_{k}": v for k, v in dataclasses.asdict(facts).items()}}


def save_checkpoint(path: Path, config: CollectConfig, batches_done: int,
                    states: dict[int | str, LayerStats] | dict[int | str, dict[str, torch.Tensor]],
                    facts: RunFacts, routed: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically: ``batches_done`` batches of the plan, whatever the number of
    processes that did them (so a run resumes with another torchrun size, or none); ``routed``: the
    tokens routed so far to each recorded expert (by :func:`expert_key`)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "fingerprint": checkpoint_fingerprint(config, facts),
        "batches_done": batches_done,
        "states": {layer: {k: v.cpu() for k, v in (s.to_dict() if isinstance(s, LayerStats) else s).items()}
                   for layer, s in states.items()},
        "routed": {key: v.cpu() for key, v in (routed or {}).items()},  # expert keys: tokens routed so far
    }, tmp)
    os.replace(tmp, path)


def load_checkpoint(config: CollectConfig, device: torch.device, facts: RunFacts
                    ) -> tuple[int, dict[int | str, LayerStats], dict[str, torch.Tensor]] | None:
    path = config.checkpoint_path
    if not path.exists():
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    expected = checkpoint_fingerprint(config, facts)
    if saved["fingerprint"] != expected:
        differ = sorted(k for k in expected if saved["fingerprint"].get(k) != expected[k])
        what = ", ".join("the corpus (its tokens differ: the dataset files changed)" if k == "resolved_corpus_sha256"
                         else "dtype (auto resolved otherwise here)" if k == "resolved_dtype" else k
                         for k in differ)
        raise GluscopeError(
            f"checkpoint {str(path)!r} was made with other options or input ({what}); rerun with "
            "the same options and dataset, or delete it to start over")
    # Dense layers by number; experts by their key (expert_key), a string.
    states = {(int(key) if str(key).isdigit() else key): LayerStats.from_dict(t) for key, t in saved["states"].items()}
    return int(saved["batches_done"]), states, dict(saved.get("routed", {}))


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


def check_positions(corpus: Corpus, limit: int | None, max_doc_tokens: int) -> None:
    """Refuse, before any batch runs, documents longer than the model's positions: past them a
    model computes activations it never produced in training (or fails mid-run)."""
    longest = int(corpus.lengths.max())
    if limit is not None and longest > limit:
        raise GluscopeError(
            f"--max-doc-tokens {max_doc_tokens} lets documents reach {longest} tokens, but the model has "
            f"{limit} positions (max_position_embeddings); use --max-doc-tokens {limit} or less")


#: Neurons of the first batch of each padded length recomputed eagerly to check the compiled code.
SELF_CHECK_NEURONS = 32


def reduce_with_fallback(compile_: bool) -> Callable[..., BatchReduction]:
    """The compiled statistics, or the eager ones with a warning line where ``torch.compile``
    fails (no C++ compiler, an unsupported Python, a backend bug): slower, the same numbers.

    The compiled code is also checked against the eager computation on a few neurons of the first
    batch of every padded length: a compile cache written on another kind of CPU once gave wrong
    counts for two thirds of the neurons without any error. A mismatch falls back to eager.

    The result may be ``suspect`` (a NaN or inf where the fast path assumes none): the caller
    leaves such a batch out and reduces it again with :func:`reduce_batch` (no sync here)."""
    try:
        compiled = compiled_reduce_batch(compile_, exact_on_suspect=False)
    except Exception as e:  # torch.compile raises many types, on creation or on first call
        _warn_compile(e)
        return reduce_batch
    if not compile_:
        return compiled
    call = CompiledWithFallback(reduce_batch, compiled)
    checked: set[int] = set()

    def reduce(*args: Any) -> BatchReduction:
        reduced = call(*args)
        length = args[0].shape[1]
        if call.fn is not reduce_batch and length not in checked and not bool(reduced.suspect):
            checked.add(length)
            problem = compare_reductions(reduced, args, SELF_CHECK_NEURONS)
            if problem:
                print(f"gluscope: warning: the compiled statistics differ from the eager computation ({problem}); "
                      "computing them eagerly (slower). A compile cache from another kind of CPU can do this: "
                      "set TORCHINDUCTOR_CACHE_DIR to an empty folder", file=sys.stderr, flush=True)
                call.fn = reduce_batch
                return reduce_batch(*args)
        return reduced

    return reduce


def compare_reductions(reduced: BatchReduction, args: tuple, neurons: int) -> str | None:
    """What differs between ``reduced`` and the eager :func:`reduce_batch` on the first
    ``neurons`` neurons of the same batch, or None."""
    gate, in_, post, swish, valid = args
    n = slice(0, min(neurons, gate.shape[-1]))
    eager = reduce_batch(gate[..., n], in_[..., n], post[..., n], swish[..., n], valid)
    per_neuron = {"count": 0, "nonfinite": 0, "min": 0, "max": 0, "doc_abs": 1, "doc_pos": 1, "doc_value": 1}
    for name, axis in per_neuron.items():
        got = getattr(reduced, name).narrow(axis, 0, n.stop)
        want = getattr(eager, name)
        if got.is_floating_point():  # NaN marks an empty slot; compare it as a value
            got, want = got.nan_to_num(0.0), want.nan_to_num(0.0)
        if not torch.equal(got, want):
            return f"{name} of neurons 0..{n.stop - 1}"
    if not torch.allclose(reduced.sum[n], eager.sum, rtol=1e-4, atol=1e-4):
        return f"sum of neurons 0..{n.stop - 1}"
    return None


def _warn_compile(error: Exception) -> None:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    print(f"gluscope: warning: torch.compile failed ({type(error).__name__}: {first}); computing the "
          "statistics eagerly (slower; --no-compile skips the attempt)", file=sys.stderr, flush=True)


def state_bytes(d_mlp: int, n_layers: int, config: CollectConfig, model_dtype: torch.dtype) -> int:
    """Bytes of the statistics a collection keeps on its device (:class:`LayerStats` of every
    recorded layer)."""
    window_bytes = torch.empty((), dtype=state_window_dtype(config.window_dtype, model_dtype)).element_size()
    window = config.context_before + 1 + config.context_after
    return state_bytes_per_neuron(config.k, window, window_bytes, config.samples, config.band_samples) * d_mlp * n_layers


def layer_groups(layers: list[int], per_layer: int, budget: int) -> list[list[int]]:
    """``layers`` cut into consecutive groups of equal size whose statistics fit in ``budget``
    bytes each: one collection per group (``--layers``), merged into one file by ``gluscope merge``."""
    per_group = max(1, budget // max(per_layer, 1))
    n_groups = -(-len(layers) // per_group)
    size = -(-len(layers) // n_groups)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def check_state_fits(loaded: LoadedModel, layers: list[int], config: CollectConfig) -> None:
    """On a GPU, refuse before the first batch a collection whose statistics cannot fit next to
    the model (a 7B model in bfloat16 and all its layers' statistics need about 21 GiB), naming
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


def _has_nonzero_static(device: torch.device) -> bool:
    """Whether this torch has ``nonzero_static`` on ``device`` (else: ``nonzero``, with a sync)."""
    try:
        torch.nonzero_static(torch.ones(2, dtype=torch.bool, device=device), size=1)
        return True
    except (NotImplementedError, RuntimeError, AttributeError):
        return False


class _Capacity:
    """How many lists per layer a batch may change without a host sync (``nonzero_static``): on
    a GPU, sized from the last batch's changed lists per document (the number falls as the lists
    fill, and batches of shorter documents hold more documents), so that overflowing it, which
    costs a second forward pass of the batch, stays rare. ``None`` on a CPU, where a sync costs
    nothing and ``nonzero`` finds exactly the lists that change."""

    MARGIN, FLOOR = 2.0, 4096
    ON_CPU = False  # tests run the GPU's path on a CPU

    def __init__(self, device: torch.device, n_lists: int) -> None:
        self.exact = (device.type == "cpu" and not self.ON_CPU) or not _has_nonzero_static(device)
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
) -> dict[int | str, LayerStats]:
    """Run the model over every batch of the corpus and return each layer's statistics (on rank 0
    of a torchrun collection: the merge of every rank's; on other ranks: empty): dense layers by
    number, and for the mixture-of-experts layers, each expert in ``experts`` (see
    :func:`resolve_experts`) by :func:`expert_key`, with the tokens routed to it added to ``routed``.

    Inside the layer loop nothing waits for the device: a dense layer-batch whose fast statistics
    are unusable (a NaN or inf where the fast path assumes finite values, or more changed lists than
    the capacity) leaves that layer's statistics unchanged, decided on the device, and after the
    batch's forward pass one host sync reads every layer's flag; the rare flagged layers are then
    computed again, exactly, by a second forward pass of the batch. Experts' statistics are always
    computed exactly (their packed token batches change size with the routing).
    """
    world = world or World()
    experts = resolve_experts(None, loaded) if experts is None else experts  # default: every expert
    routed = routed if routed is not None else {}
    if world.size > 1 and any(experts.values()):
        raise GluscopeError("torchrun does not merge expert neurons yet; run MoE layers in one process, or "
                            "--shard and gluscope merge")
    facts = facts or RunFacts(dtype=dtype_name(loaded.dtype), corpus_sha256=corpus.sha256())
    device = loaded.device
    window = config.context_before + 1 + config.context_after
    window_dtype = state_window_dtype(config.window_dtype, loaded.dtype)
    batches = shard_batches(corpus, config.batch_tokens, config.shard)

    def empty(layer: int) -> LayerStats:
        return LayerStats.empty(loaded.d_mlp, config.k, window, device, window_dtype, config.samples,
                                config.band_samples)

    start = 0
    dense = [layer for layer in layers if layer not in loaded.moe]
    states: dict[int | str, LayerStats] = {layer: empty(layer) for layer in dense}
    for layer, chosen in experts.items():
        moe = loaded.moe[layer]
        for expert in chosen:
            d = moe.shared.d_mlp if expert == SHARED else moe.d_expert
            states[expert_key(layer, expert)] = LayerStats.empty(d, config.k, window, device, window_dtype,
                                                                 config.samples, config.band_samples)
            routed[expert_key(layer, expert)] = torch.zeros((), dtype=torch.int64, device=device)
    if config.resume:
        restored = load_checkpoint(config, device, facts) if world.is_main else None
        start = broadcast_object(world, restored[0] if restored is not None else 0)
        if restored is not None:
            states = restored[1]
            routed.update({key: value.to(device) for key, value in restored[2].items()})
            print(f"gluscope: resuming from {config.checkpoint_path} after {start}/{len(batches)} batches",
                  file=sys.stderr)
    reduce = reduce_with_fallback(config.compile)
    sampling = _Sampling.of(corpus, config) if config.samples > 0 else None
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    first_counted = config.counted_from(corpus.has_bos)
    lengths_all = corpus.lengths
    capacity = {layer: _Capacity(device, loaded.d_mlp * N_CASES * N_HOOKS) for layer in dense}
    checkpoints = _CheckpointWriter()

    from tqdm.auto import tqdm

    def tokens(batch_indices: range) -> int:
        return int(sum(lengths_all[batches[i].docs].sum() for i in batch_indices))

    total = tokens(range(len(batches)))
    last_checkpoint = time.monotonic()
    # Rounds: in round r, rank i takes batch start + r * N + i; the batches before a round's start
    # are done by every rank, so a checkpoint holds whole rounds and resumes with any number of ranks.
    n_rounds = -(-(len(batches) - start) // world.size)
    # The signal handlers are in place before the bar shows: once progress shows, SIGTERM checkpoints.
    with _CtrlC() as ctrl_c, _out_of_memory_hint(config):
        bar = tqdm(total=total, initial=tokens(range(start)), unit="tok", unit_scale=True,
                   disable=not (config.progress and world.is_main), desc="collect", dynamic_ncols=True)
        for round_ in range(n_rounds):
            first_of_round = start + round_ * world.size
            index = first_of_round + world.rank
            if index < len(batches):
                _run_batch(loaded, corpus, batches[index], layers, states, config, reduce, capacity, pad_id,
                           first_counted, device, experts, routed, sampling)
            finished = min(first_of_round + world.size, len(batches))
            bar.update(tokens(range(first_of_round, finished)))
            stop, due = any_rank(world, [
                ctrl_c.requested or (stop_after_batches is not None and finished >= stop_after_batches),
                world.is_main and time.monotonic() - last_checkpoint > config.checkpoint_every], device)
            if finished < len(batches) and (stop or due):
                states = merge_into_rank0(world, states, empty)
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
    return merge_into_rank0(world, states, empty)


@dataclass
class _Sampling:
    """What a run's distributions need beyond the statistics: each document's identity for the
    sampling order (its source row and which piece of it), and the histogram function (compiled)."""

    seed: int
    sources: np.ndarray
    pieces: np.ndarray
    histogram: Callable[..., None]

    @classmethod
    def of(cls, corpus: Corpus, config: CollectConfig) -> "_Sampling":
        return cls(config.seed, corpus.source_index, document_pieces(corpus.source_index),
                   compiled_with_fallback(histogram_batch, compiled_histogram_batch, config.compile))

    def priorities(self, docs: np.ndarray, length: int, lengths: np.ndarray, first_counted: int) -> torch.Tensor:
        """``[B, T]`` sampling priorities of a batch's positions (EMPTY_PRIORITY where not counted)."""
        t = np.arange(length, dtype=np.int64)[None, :]
        prio = position_priority(self.seed, self.sources[docs][:, None], self.pieces[docs][:, None], t)
        return torch.from_numpy(np.where((t < lengths[:, None]) & (t >= first_counted), prio, EMPTY_PRIORITY))


class CompiledWithFallback:
    """A compiled function that turns into ``eager`` (with one warning line) the first time
    ``torch.compile`` fails on a call: no C++ compiler, an unsupported Python, a backend bug.
    ``fn`` is what runs now."""

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        self.eager, self.fn = eager, compiled

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        except torch.OutOfMemoryError:
            raise  # not the compiler's fault: eager needs more memory still
        except Exception as e:
            if self.fn is self.eager:
                raise
            _warn_compile(e)
            self.fn = self.eager
            return self.eager(*args)


def compiled_with_fallback(eager: Callable[..., Any], compiled: Callable[[bool], Callable[..., Any]],
                           compile_: bool) -> Callable[..., Any]:
    """``compiled(True)`` that falls back to ``eager`` (:class:`CompiledWithFallback`), or ``eager``."""
    return CompiledWithFallback(eager, compiled(True)) if compile_ else eager


def _run_batch(loaded: LoadedModel, corpus: Corpus, batch: Any, layers: list[int],
               states: dict[int | str, LayerStats], config: CollectConfig, reduce: Callable[..., BatchReduction],
               capacity: dict[int, "_Capacity"], pad_id: int, first_counted: int, device: torch.device,
               experts: dict[int, list[int | str]] | None = None,
               routed: dict[str, torch.Tensor] | None = None,
               sampling: "_Sampling | None" = None) -> None:
    """One batch through the model, every layer's statistics updated (see collect_statistics):
    dense layers by the fast path (redone exactly where flagged), the experts of mixture-of-experts
    layers exactly, with the tokens routed to each added to ``routed``; with ``sampling``, the
    distributions too."""
    experts = experts or {}
    routed = routed if routed is not None else {}
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
    histogram = sampling.histogram if sampling else histogram_batch
    applied: dict[int, torch.Tensor] = {}
    active: dict[int, torch.Tensor] = {}

    def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
        swish = loaded.mlps[layer].act_fn(gate)
        reduced = reduce(gate, in_, post, swish, valid)
        applied[layer], active[layer] = update_stats(
            states[layer], reduced, doc_ids, gate, in_, lengths, config.context_before, config.context_after,
            capacity=capacity[layer].current(len(batch.docs)), accept=~reduced.suspect,
            hooks=(post, in_, gate, swish), valid=valid, prio=prio, histogram=histogram)

    def on_moe(layer: int, hidden: torch.Tensor, routing: torch.Tensor, shared: Any) -> None:
        # Each expert's neurons through the dense statistics, over the tokens routed to it; exactly
        # (no capacity, every value checked): never redone, since a second pass would count twice.
        moe = loaded.moe[layer]
        for part in expert_batches(moe, hidden, routing, shared, valid, experts.get(layer, [])):
            key = expert_key(layer, part.expert)
            routed[key] += part.valid.sum()
            act_fn = moe.shared.act_fn if part.expert == SHARED else moe.act_fn
            swish = act_fn(part.gate)
            part_prio = None if prio is None else prio if part.positions is None else prio.gather(1, part.positions)
            reduced = reduce_batch(part.gate, part.in_, part.post, swish, part.valid)
            if part.positions is not None:  # packed positions (a routed expert's tokens) back to the document's
                b = part.positions.shape[0]
                reduced.doc_pos = part.positions.gather(1, reduced.doc_pos.reshape(b, -1)).view_as(reduced.doc_pos)
            update_stats(states[key], reduced, doc_ids, part.window_gate, part.window_in, lengths,
                         config.context_before, config.context_after, hooks=(part.post, part.in_, part.gate, swish),
                         valid=part.valid, prio=part_prio, positions=part.positions, check_finite=True,
                         histogram=histogram)

    run_with_mlp_hooks(loaded, input_ids, layers, on_layer, on_moe)
    dense = [layer for layer in layers if layer in applied]
    if not dense:
        return
    # The batch's one host sync: which layers were applied, and how many lists each changed.
    flags = torch.stack([torch.stack([applied[layer].long(), active[layer].long()]) for layer in dense]).tolist()
    redo = [layer for layer, (ok, _) in zip(dense, flags) if not ok]
    for layer, (_, n_active) in zip(dense, flags):
        capacity[layer].observe(n_active, len(batch.docs))
    if not redo:
        return

    def exactly(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
        swish = loaded.mlps[layer].act_fn(gate)
        reduced = reduce_batch(gate, in_, post, swish, valid)  # checks every value; rare, so eager
        update_stats(states[layer], reduced, doc_ids, gate, in_, lengths, config.context_before,
                     config.context_after, hooks=(post, in_, gate, swish), valid=valid, prio=prio, check_finite=True,
                     histogram=histogram)

    run_with_mlp_hooks(loaded, input_ids, redo, exactly)


class _CheckpointWriter:
    """Writes checkpoints in a background thread: the state is first copied to the host (into
    pinned memory, behind the work already queued on the device, so the GPU does not wait), and
    the thread waits for that copy, then writes. One checkpoint at a time."""

    def __init__(self) -> None:
        self._thread: Any = None
        self._error: BaseException | None = None
        self._pinned: dict[tuple[int | str, str], torch.Tensor] = {}  # reused: pinning GBs takes seconds

    def _to_host(self, key: tuple[int | str, str], t: torch.Tensor) -> torch.Tensor:
        """A host copy that later in-place updates of ``t`` do not change; from a GPU asynchronous,
        into pinned memory (complete once an event recorded after it has passed)."""
        if not t.is_cuda:
            return t.clone()
        host = self._pinned.get(key)
        if host is None or host.shape != t.shape or host.dtype != t.dtype:
            host = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def save(self, path: Path, config: CollectConfig, batches_done: int, states: dict[int | str, LayerStats],
             facts: RunFacts, routed: dict[str, torch.Tensor] | None = None, *, wait: bool = False) -> None:
        import threading

        self.wait()  # the previous checkpoint is written: its host buffers can take this one
        host = {layer: {name: self._to_host((layer, name), t) for name, t in s.to_dict().items()}
                for layer, s in states.items()}
        host_routed = {key: self._to_host((key, "routed"), t) for key, t in (routed or {}).items()}
        copied = torch.cuda.Event() if any(t.is_cuda for s in states.values() for t in s.to_dict().values()) else None
        if copied is not None:
            copied.record()

        def write() -> None:
            try:
                if copied is not None:
                    copied.synchronize()
                save_checkpoint(path, config, batches_done, host, facts, host_routed)
            except BaseException as e:  # reported by wait(), on the main thread
                self._error = e

        self._thread = threading.Thread(target=write, name="gluscope-checkpoint", daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error




@contextlib.contextmanager
def _out_of_memory_hint(config: CollectConfig) -> Iterator[None]:
    """Out of device memory becomes one line naming the option that sizes the batches."""
    try:
        yield
    except torch.OutOfMemoryError:
        smaller = max(config.batch_tokens // 2, 1)
        raise GluscopeError(
            f"out of memory at --batch-tokens {config.batch_tokens}; rerun with a smaller value such as "
            f"--batch-tokens {smaller} (checkpoints hold whole batches of one size, so start over: "
            "--resume needs the same --batch-tokens)") from None


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
    attrs.update(config.extra_attrs)
    return attrs


def write_experts(writer: ActivationsWriter, loaded: LoadedModel, experts: dict[int, list[int | str]],
                  states: dict[int | str, LayerStats], routed: dict[str, torch.Tensor], window_dtype: str) -> None:
    """The ``experts`` and ``shared_experts`` groups: one row per recorded (layer, expert)."""
    for group, shared in (("experts", False), ("shared_experts", True)):
        rows = [(layer, e) for layer, chosen in experts.items() for e in chosen if (e == SHARED) == shared]
        if not rows:
            continue
        moe = loaded.moe[rows[0][0]]
        d = moe.shared.d_mlp if shared else moe.d_expert
        sizes = {loaded.moe[layer].shared.d_mlp if shared else loaded.moe[layer].d_expert for layer, _ in rows}
        if len(sizes) > 1:
            raise GluscopeError(f"the recorded layers' experts differ in size ({sorted(sizes)}); record them in "
                                "separate runs with --layers")
        writer.add_experts(group, [layer for layer, _ in rows], [-1 if shared else e for _, e in rows],
                           [int(routed[expert_key(layer, e)]) for layer, e in rows], d)
        for row, (layer, e) in enumerate(rows):
            writer.write_neurons(row, 0, finalize(states[expert_key(layer, e)], window_dtype), group=group)
        writer.write_weights({name: torch.stack([loaded.expert_facts[layer, e][name] for layer, e in rows]).numpy()
                              for name in ("flipped", "cos_gate_in", "cos_gate_out", "cos_in_out")}, group=group)


def collect(config: CollectConfig, *, stop_after_batches: int | None = None) -> Path:
    """Run a whole collection and write ``config.out``. Returns its path.

    Under torchrun every process runs this; they share the batches and rank 0 writes the file
    (:mod:`collect.distributed`)."""
    check_config(config)
    world, device = distributed.init(config.device)
    try:
        return _collect(config, world, device, stop_after_batches=stop_after_batches)
    finally:
        distributed.finish(world)


def _collect(config: CollectConfig, world: World, device: str, *, stop_after_batches: int | None) -> Path:
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
    check_state_fits(loaded, layers, config)
    run_facts = RunFacts(dtype=dtype_name(loaded.dtype), corpus_sha256=corpus.sha256())
    if not distributed.all_equal(world, dataclasses.asdict(run_facts)):
        raise GluscopeError("the torchrun processes disagree on the tokenized corpus or the dtype; give every "
                            "node the same dataset files, model and torch version")
    routed: dict[str, torch.Tensor] = {}
    states = collect_statistics(loaded, corpus, config, layers, stop_after_batches=stop_after_batches,
                                facts=run_facts, world=world, experts=experts, routed=routed)
    if not world.is_main:
        return config.out  # rank 0 writes the file
    vocab_size = max(len(loaded.tokenizer), int(corpus.tokens.max()) + 1)
    attrs = provenance(config, loaded, corpus, dense_layers)
    attrs["world_size"] = world.size
    if experts:
        attrs["expert_layers"] = list(experts)
        attrs["n_experts"] = sorted({loaded.moe[layer].n_experts for layer in experts})
        attrs["n_experts_per_layer"] = [loaded.moe[layer].n_experts for layer in experts]  # as expert_layers
    # Vocabulary projections of the (refactored) weights: no corpus needed (collect.vocab).
    vocab, vocab_attrs = file_vocab(loaded, dense_layers, experts)
    attrs.update(vocab_attrs)
    attrs["elapsed_s"] = round(time.monotonic() - started, 1)
    with ActivationsWriter(config.out, n_layers=len(dense_layers), d_mlp=loaded.d_mlp, k=config.k,
                           context_before=config.context_before, context_after=config.context_after,
                           window_dtype=config.window_dtype, attrs=attrs, samples=config.samples,
                           band_samples=config.band_samples) as writer:
        writer.write_corpus(corpus.tokens, corpus.doc_offsets, token_strings(loaded.tokenizer, vocab_size),
                            source_index=corpus.source_index, doc_title=corpus.titles)
        for row, layer in enumerate(dense_layers):
            writer.write_layer(row, finalize(states[layer], config.window_dtype))
        writer.write_weights({name: values.numpy() for name, values in facts.items()})  # in `layers` order
        write_experts(writer, loaded, experts, states, routed, config.window_dtype)
        for group, (token, score) in vocab.items():  # rows in the order of the datasets above
            writer.write_vocab(token, score, group=group)
        path = writer.close(n_tokens=counted_tokens(corpus, config))
    config.checkpoint_path.unlink(missing_ok=True)
    return path
