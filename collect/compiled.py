"""The statistics' compiled functions, guarded: ``torch.compile`` where it works, the eager code
with one warning line where it fails, and a run-time check of the compiled code against the eager
computation (a compile cache from another kind of CPU once gave wrong counts without any error)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from collect.stats import BatchReduction, compiled_reduce_batch, reduce_batch


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
        warn_compile(e)
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
    eager = reduce_batch(gate[..., n], in_[..., n], post[..., n], swish[..., n], valid[..., n] if valid.dim() == 3 else valid)
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
