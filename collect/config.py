"""The options of a collection run and their checks, made before any model or corpus is loaded:
``CollectConfig`` (every option of ``gluscope collect``), what a run resolves beyond them
(``RunFacts``), and the parsing of ``--shard``, ``--layers`` and ``--experts``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collect.corpus import BOS_MODES, Corpus, dataset_source, plan_batches
from collect.model import DTYPE_CHOICES, ENGINES, LoadedModel, resolve_device
from mkdocs_gluscope.distributions import BAND_SAMPLES, SAMPLES
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.neurons import parse_shard
from mkdocs_gluscope.store import SHARED, expert_label, first_counted_position


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
    effects: bool = True  # run on to the final norm and record each example's direct effect on the output
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


def shard_batches(corpus: Corpus, batch_tokens: int, shard: str | None) -> list:
    """This shard's batches: every N-th batch of the whole corpus's plan, so shards of similar
    work share the documents, and every shard numbers documents alike."""
    index, count = parse_shard(shard)
    batches = plan_batches(corpus.lengths, batch_tokens)
    if index >= len(batches):
        raise GluscopeError(f"--shard {shard}: the corpus makes only {len(batches)} batches; use fewer shards")
    return batches[index::count]


def check_positions(corpus: Corpus, limit: int | None, max_doc_tokens: int) -> None:
    """Refuse, before any batch runs, documents longer than the model's positions: past them a
    model computes activations it never produced in training (or fails mid-run)."""
    longest = int(corpus.lengths.max())
    if limit is not None and longest > limit:
        raise GluscopeError(
            f"--max-doc-tokens {max_doc_tokens} lets documents reach {longest} tokens, but the model has "
            f"{limit} positions (max_position_embeddings); use --max-doc-tokens {limit} or less")


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


def experts_key(layer: int) -> str:
    """The key of a mixture-of-experts layer's routed experts among the run's statistics (and in
    checkpoints): they are reduced together, as one wide layer of experts x neurons per expert."""
    return f"{layer}.experts"


def state_sizes(loaded: LoadedModel, layers: list[int], experts: dict[int, list[int | str]]) -> dict[int | str, int]:
    """Neurons of each set of statistics a run keeps: each dense layer by number, each MoE layer's
    recorded routed experts together (:func:`experts_key`), its shared expert (:func:`expert_key`)."""
    sizes: dict[int | str, int] = {layer: loaded.d_mlp for layer in layers if layer not in loaded.moe}
    for layer, chosen in experts.items():
        moe = loaded.moe[layer]
        n_routed = sum(1 for e in chosen if e != SHARED)
        if n_routed:
            sizes[experts_key(layer)] = n_routed * moe.d_expert
        if SHARED in chosen:
            sizes[expert_key(layer, SHARED)] = moe.shared.d_mlp
    return sizes


def expert_key(layer: int, expert: int | str) -> str:
    """An expert's key among the run's statistics (and in checkpoints): its neuron id prefix."""
    return f"{layer}.{expert_label(expert)}"
