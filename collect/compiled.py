"""The statistics' fast code, guarded: ``torch.compile`` where it works (the eager code with one
warning line where it fails), a compile cache of the project's own, and a run-time check of every
output of the fast code (compiled, or the CPU kernel) against the eager computation.

A compile cache written on another kind of CPU once gave wrong counts for two thirds of the
neurons without any error: :func:`use_own_compile_cache` keys the cache by torch version and CPU
capability, so no run reads another machine's kernels, and :func:`check_outputs` compares what the
fast code computed on a sample of every layer's neurons with the eager code.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from collect.stats import (BatchDistributions, BatchReduction, LayerStats, compiled_reduce_batch, find_candidates,
                           finite_positions, histogram_batch, reduce_batch)

#: Neurons of each layer compared with the eager code (the first batch of each padded length),
#: spread over the whole layer.
SELF_CHECK_NEURONS = 32

#: What :func:`check_outputs` compares, in order; its result is 1 + the index of the first that differs.
CHECKED = ("count", "nonfinite", "min", "max", "doc_abs", "doc_pos", "doc_value", "doc_count", "doc_min_abs", "sum",
           "suspect", "hist", "density", "sample candidates", "band candidates")

#: Sums are added in another order by the fast code: they agree to rounding.
SUM_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def compile_cache_dir() -> Path:
    """The project's compile cache: ``inductor/<torch version>-<cpu capability>`` in the gluscope
    cache folder (``$GLUSCOPE_CACHE``, else ``~/.cache/gluscope``), so that kernels compiled by
    another torch or for another instruction set are never read."""
    from mkdocs_gluscope.npm import cache_dir

    version = torch.__version__.replace("+", "_")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return cache_dir() / "inductor" / f"{version}-{capability}"


def use_own_compile_cache() -> None:
    """Point ``torch.compile``'s cache at :func:`compile_cache_dir` unless the user chose one
    (``TORCHINDUCTOR_CACHE_DIR``; torch sets it to its shared default on its first compile, which
    is not a choice). Called before a collection compiles anything."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())


def fast_reduce(compile_: bool) -> Callable[..., BatchReduction]:
    """:func:`reduce_batch` assuming finite values, compiled (with a fallback to the eager code
    where ``torch.compile`` fails: slower, the same numbers). Its result may be ``suspect``: the
    caller reduces such a batch again with :func:`reduce_batch`."""
    eager = functools.partial(reduce_batch, assume_finite=True)
    if not compile_:
        return eager
    try:
        compiled = compiled_reduce_batch(True, exact_on_suspect=False)
    except Exception as e:  # torch.compile raises many types, on creation or on first call
        warn_compile(e)
        return eager
    return CompiledWithFallback(eager, compiled)


def sample_neurons(d_mlp: int, seed: int, size: int = SELF_CHECK_NEURONS) -> torch.Tensor:
    """``size`` neurons spread evenly over ``[0, d_mlp)``, first and last included, shifted by
    ``seed`` within their gaps (each layer checks others)."""
    if d_mlp <= size:
        return torch.arange(d_mlp)
    gap = (d_mlp - 1) // (size - 1)
    # Host integers, not tensor ops: nothing here for a sync counter to mistake for a device wait.
    spread = sorted({min(i * (d_mlp - 1) // (size - 1) + seed % max(gap, 1), d_mlp - 1) for i in range(size)})
    return torch.tensor(spread, dtype=torch.int64)


def check_outputs(reduced: BatchReduction, hooks: tuple[torch.Tensor, ...], valid: torch.Tensor,
                  neurons: torch.Tensor, *, exact: bool, distributions: BatchDistributions | None = None,
                  tables_of_neurons: bool = False, before: LayerStats | None = None, prio: torch.Tensor | None = None,
                  doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Whether the fast code's outputs on a sample of neurons equal the eager code's, as a device
    int64: 0, or 1 + the index in :data:`CHECKED` of the first that differs (no host sync).

    ``reduced``: the fast reduction of ``hooks`` ``(post, in, gate, swish)`` ``[B, T, N]`` and
    ``valid``; ``exact``: whether it counted non-finite values (the kernel) or assumed none (the
    compiled code: then a suspect sample must make the whole batch suspect); ``distributions``: the
    batch's histogram tables (of this batch alone; with ``tables_of_neurons``, only the rows of
    ``neurons``) and, from the kernel, its example candidates,
    checked against :func:`histogram_batch` and :func:`find_candidates` with the limits of
    ``before``, the statistics before the batch, and ``prio``: the positions' sampling priorities
    ``[B, T]``, or packed experts' ``[B, T, len(neurons)]``, those of the checked neurons' slots."""
    post, in_, gate, swish = (_columns(h, neurons) for h in hooks)
    part_valid = valid if valid.dim() == 2 else _columns(valid, neurons)
    eager = reduce_batch(gate, in_, post, swish, part_valid, assume_finite=not exact)
    differs = []
    for name in CHECKED[:9]:
        got = getattr(reduced, name)
        got = got[neurons] if name in ("count", "nonfinite", "min", "max") else got[:, neurons]
        want = getattr(eager, name)
        if got.is_floating_point():  # NaN marks an empty slot; compare it as a value
            got, want = got.nan_to_num(0.0), want.nan_to_num(0.0)
        differs.append((got != want).any())
    differs.append(~torch.isclose(reduced.sum[neurons], eager.sum, **SUM_TOLERANCE).all())
    differs.append(eager.suspect & ~reduced.suspect)
    if distributions is not None and distributions.hist is not None:
        counted = finite_positions((post, in_, gate, swish), part_valid)
        got_hist, got_density = ((distributions.hist, distributions.density) if tables_of_neurons
                                 else (distributions.hist[neurons], distributions.density[neurons]))
        hist, density = torch.zeros_like(got_hist), torch.zeros_like(got_density)
        histogram_batch(gate, in_, post, swish, counted, torch.ones((), dtype=torch.int32, device=gate.device),
                        hist, density)
        differs += [(hist != got_hist).any(), (density != got_density).any()]
        if before is not None and prio is not None and doc_ids is not None:
            part = LayerStats(**{name: t[neurons] for name, t in before.to_dict().items()})
            b, t, n = gate.shape
            # With `filling` (each list's limit first lowered to its S-th lowest priority in the batch:
            # the same candidates) the pairs are at most the lists' slots, unless priorities tie
            # exactly (twice the slots leaves room); every position would be b * t * n to sort.
            slots = part.sample_key.numel() + part.band_key.numel()
            want = find_candidates(part, (post, in_, gate, swish), counted, prio, doc_ids, min(b * t * n, 2 * slots),
                                   filling=True).candidates
            got = distributions.candidates
            for kind in ("sample", "band"):
                differs.append(torch.stack([(getattr(want, f"{kind}_{x}") != getattr(got, f"{kind}_{x}")[neurons]).any()
                                            for x in ("key", "b", "t")]).any())
    flags = torch.stack(differs)
    return torch.where(flags.any(), flags.int().argmax() + 1, 0).long()


def _columns(x: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """``x[..., neurons]``: an ``index_select`` of rows of neurons (several times faster than the
    advanced index on a CPU)."""
    return x.reshape(-1, x.shape[-1]).index_select(1, neurons).reshape(*x.shape[:-1], len(neurons))


def describe_problem(code: int, neurons: torch.Tensor, what: str) -> str:
    """The warning line for a failed :func:`check_outputs`."""
    listed = ", ".join(str(n) for n in neurons[:4].tolist()) + (", ..." if len(neurons) > 4 else "")
    return (f"gluscope: warning: {what} differ from the eager computation ({CHECKED[code - 1]} of neurons "
            f"{listed}); computing the statistics eagerly (slower), this batch again. A compile cache from "
            "another kind of CPU can do this: set TORCHINDUCTOR_CACHE_DIR to an empty folder")


def warn_compile(error: Exception) -> None:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    print(f"gluscope: warning: torch.compile failed ({type(error).__name__}: {first}); computing the "
          "statistics eagerly (slower; --no-compile skips the attempt)", file=sys.stderr, flush=True)


class CompiledWithFallback:
    """A compiled function that turns into ``eager`` (with one warning line) the first time
    ``torch.compile`` fails on a call: no C++ compiler, an unsupported Python, a backend bug.
    ``fn`` is what runs now."""

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        self.eager, self.fn = eager, compiled

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        except torch.OutOfMemoryError:
            raise  # not the compiler's fault: eager needs more memory still
        except Exception as e:
            if self.fn is self.eager:
                raise
            warn_compile(e)
            self.fn = self.eager
            return self.eager(*args)


def compiled_with_fallback(eager: Callable[..., Any], compiled: Callable[[bool], Callable[..., Any]],
                           compile_: bool) -> Callable[..., Any]:
    """``compiled(True)`` that falls back to ``eager`` (:class:`CompiledWithFallback`), or ``eager``."""
    return CompiledWithFallback(eager, compiled(True)) if compile_ else eager

