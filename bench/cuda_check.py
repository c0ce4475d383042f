"""On a CUDA machine: the GPU's statistics equal the eager CPU reference, through the path that reads
its checks at once and through the collection's path without host syncs (``nonzero_static`` under
capacities, made too small on purpose so that some layer-batches are flagged and redone exactly),
distributions included; the host syncs of that path counted per batch; then the throughput of the
fused reduction and of the histograms at a 7B model's width.

    python bench/cuda_check.py                 # on a GPU
    python bench/cuda_check.py --device cpu    # the same code on a CPU (a smoke test; slow at the end)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from collect import fused
from collect.batch import Batch, LayerPaths
from collect.memory import CandidateCapacity, ListCapacity
from collect.stats import LayerStats, compiled_histogram_batch, compiled_reduce_batch
from collect.syncs import SyncCounter
from mkdocs_gluscope.distributions import DENSITY_HALF, EMPTY_PRIORITY, N_BINS, position_priority

FIELDS = ("count", "nonfinite", "min", "max", "top_key", "top_pos", "hist", "density", "sample_key", "sample_doc",
          "sample_pos", "band_key", "band_doc", "band_pos")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    device = torch.device(p.parse_args().device)
    assert device.type != "cuda" or torch.cuda.is_available(), "needs a CUDA device (or --device cpu)"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    B, T, N, k, before, after = 6, 96, 512, 16, 16, 2
    window = before + 1 + after

    def empty(on: torch.device) -> LayerStats:
        return LayerStats.empty(N, k, window, on, samples=8, band_samples=2)

    reference, checked = empty(torch.device("cpu")), empty(device)
    deferred = empty(device).windows_on_host()  # as a run on the GPU's path: the top-k windows in host memory
    kernel, fused._fused = fused._fused, None  # the reference: the eager torch code
    eager = LayerPaths(torch.device("cpu"), N, False, on_gpu_path=False)
    fused._fused = kernel
    at_once = LayerPaths(device, N, True, on_gpu_path=False)
    gpu_path = LayerPaths(device, N, True, on_gpu_path=True)
    ListCapacity.ON_CPU = device.type == "cpu"  # on a CPU too: the GPU's path, with its capacities
    ListCapacity.MARGIN, ListCapacity.FLOOR = 0.5, 64  # too small on purpose: some batches are redone
    CandidateCapacity.MARGIN, CandidateCapacity.FLOOR = 0.5, 64
    syncs, redone = [], 0
    for batch in range(8):
        gate = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8  # exact ties
        in_ = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8
        if batch == 3:
            gate[1, 5, 7] = float("nan")  # a non-finite value: flagged by the fast path, redone
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        valid = (torch.arange(T)[None] < lengths[:, None]) & (torch.arange(T)[None] >= 1)
        swish = torch.nn.functional.silu(gate)
        ids = torch.arange(batch * B, (batch + 1) * B)
        prio = torch.from_numpy(position_priority(0, ids.numpy()[:, None], np.zeros((B, 1), dtype=np.int64),
                                                  np.arange(T)[None, :]))
        prio = torch.where(valid, prio, EMPTY_PRIORITY)
        hooks = (gate, in_, swish * in_, swish)
        eager.add(0, reference, hooks, Batch(ids, lengths, valid, prio, before, after))
        on = [x.to(device) for x in (ids, lengths, valid, prio)]
        inputs = Batch(*on, before, after)
        moved = tuple(h.to(device) for h in hooks)
        at_once.add(0, checked, moved, inputs)
        with SyncCounter() as counter:
            flags = gpu_path.add(0, deferred, moved, inputs)
            redo, _ = gpu_path.settle({0: flags}, B)
        syncs.append(counter.total)
        for _ in redo:
            redone += 1
            gpu_path.redo(deferred, moved, inputs)
        deferred.flush_windows()  # after the batch's sync, as collect.run does
    sync()
    for name, stats in (("the path without host syncs", deferred), ("the path that reads its checks at once", checked)):
        for field in FIELDS:
            a, b = getattr(reference, field), getattr(stats, field).cpu()
            assert torch.equal(a.nan_to_num(7.0) if a.is_floating_point() else a,
                               b.nan_to_num(7.0) if b.is_floating_point() else b), (name, field)
        torch.testing.assert_close(stats.sum.cpu(), reference.sum, rtol=1e-5, atol=1e-4)
        for a, b in zip(reference.ordered_windows(), stats.ordered_windows()):
            assert torch.equal(a.nan_to_num(7.0), b.cpu().nan_to_num(7.0)), name
        for prefix in ("sample", "band"):
            for part in ("value", "gate", "in"):
                a, b = getattr(reference, f"{prefix}_{part}"), getattr(stats, f"{prefix}_{part}").cpu()
                assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (name, prefix, part)
        print(f"{device.type}: {name} equals the eager CPU reference (counts, extremes, top-k lists, windows, "
              "histograms, density, random and band examples; sums to 1e-5)")
    print(f"host syncs of the path without them, per batch (its one read of the flags included): {syncs}; "
          f"{redone} of 8 layer-batches flagged and redone exactly")

    # Throughput of the fused reduction and of the histograms at a 7B model's width.
    B, T, N = (16, 1024, 11008) if device.type == "cuda" else (2, 256, 2048)
    x = [torch.randn(B, T, N, device=device, dtype=torch.bfloat16) for _ in range(4)]
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    one = torch.ones((), dtype=torch.int32, device=device)
    hist = torch.zeros(N, 4, 4, N_BINS, dtype=torch.int32, device=device)
    density = torch.zeros(N, 4, DENSITY_HALF, DENSITY_HALF, dtype=torch.int32, device=device)
    reduce = compiled_reduce_batch(True, exact_on_suspect=False)
    histogram = compiled_histogram_batch(True)
    for name, run in (("fused reduction", lambda: reduce(*x, valid)),
                      ("histograms", lambda: histogram(x[0], x[1], x[2], x[3], valid, one, hist, density))):
        run()
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            run()
        sync()
        ms = (time.perf_counter() - t0) / 10 * 1000
        print(f"{name}, {B}x{T} tokens x {N} neurons (bf16): {ms:.2f} ms per layer-batch "
              f"({B * T / ms * 1000 / 1e6:.1f} M tokens/s per layer)")


if __name__ == "__main__":
    main()
