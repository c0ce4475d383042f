"""On a CUDA machine: the compiled statistics on the GPU agree with the eager CPU reference, both
through the path with a host sync per layer-batch and through the collection's path without
(``nonzero_static`` with a capacity, every other batch too small on purpose, so that it is added again),
distributions included (histograms, random and band examples); then the throughput of the fused
reduction and of the histograms at a 7B model's width.

    python bench/cuda_check.py                 # on a GPU
    python bench/cuda_check.py --device cpu    # the same code on a CPU (a smoke test; slow at the end)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from collect.stats import (LayerStats, add_batch, compiled_histogram_batch, compiled_reduce_batch, reduce_batch,
                           update_stats)
from mkdocs_gluscope.distributions import EMPTY_PRIORITY, position_priority

DISTRIBUTION_FIELDS = ("hist_joint", "hist_outputs", "sample_key", "sample_doc", "sample_pos", "band_key",
                       "band_doc", "band_pos")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    device = p.parse_args().device
    assert device != "cuda" or torch.cuda.is_available(), "needs a CUDA device (or --device cpu)"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    B, T, N, k, before, after = 6, 96, 512, 16, 16, 2
    cpu_stats = LayerStats.empty(N, k, before + 1 + after, samples=8, band_samples=2)
    gpu_stats = LayerStats.empty(N, k, before + 1 + after, device=device, samples=8, band_samples=2)
    static_stats = LayerStats.empty(N, k, before + 1 + after, device=device, samples=8, band_samples=2)
    fused = compiled_reduce_batch(True)
    fast = compiled_reduce_batch(True, exact_on_suspect=False)
    histogram = compiled_histogram_batch(True)
    redone = 0
    for batch in range(5):
        gate = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8  # exact ties
        in_ = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        valid = (torch.arange(T)[None] < lengths[:, None]) & (torch.arange(T)[None] >= 1)
        swish = torch.nn.functional.silu(gate)
        post = swish * in_
        ids = torch.arange(batch * B, (batch + 1) * B)
        prio = torch.from_numpy(position_priority(0, ids.numpy()[:, None], np.zeros((B, 1), dtype=np.int64),
                                                  np.arange(T)[None, :]))
        prio = torch.where(valid, prio, EMPTY_PRIORITY)
        r = reduce_batch(gate, in_, post, swish, valid)
        cpu_stats = add_batch(cpu_stats, r, ids, gate, in_, lengths, before, after, hooks=(post, in_, gate, swish),
                              valid=valid, prio=prio)
        cuda = [x.to(device) for x in (gate, in_, post, swish, valid)]
        dist = dict(hooks=(cuda[2], cuda[1], cuda[0], cuda[3]), valid=cuda[4], prio=prio.to(device),
                    histogram=histogram)
        rg = fused(*cuda)
        gpu_stats = add_batch(gpu_stats, rg, ids.to(device), cuda[0], cuda[1], lengths.to(device), before, after, **dist)
        rf = fast(*cuda)
        applied, _ = update_stats(static_stats, rf, ids.to(device), cuda[0], cuda[1], lengths.to(device), before,
                                  after, capacity=N * 16 // (1 + batch % 2), accept=~rf.suspect, **dist)
        if not bool(applied):
            redone += 1
            update_stats(static_stats, reduce_batch(*cuda), ids.to(device), cuda[0], cuda[1], lengths.to(device),
                         before, after, check_finite=True, **dist)
    sync()
    for name in ("count", "min", "max", "top_key", "top_doc", "top_pos") + DISTRIBUTION_FIELDS:
        assert torch.equal(getattr(static_stats, name), getattr(gpu_stats, name)), name
    for a, b in zip(static_stats.ordered_windows(), gpu_stats.ordered_windows()):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    print(f"the path without host syncs equals the synced one ({redone} of 5 batches over capacity, added again)")
    for name in ("count", "min", "max", "top_key", "top_doc", "top_pos") + DISTRIBUTION_FIELDS:
        a, b = getattr(cpu_stats, name), getattr(gpu_stats, name).cpu()
        assert torch.equal(a, b), name
    torch.testing.assert_close(gpu_stats.sum.cpu(), cpu_stats.sum, rtol=1e-5, atol=1e-4)
    for a, b in zip(cpu_stats.ordered_windows(), gpu_stats.ordered_windows()):
        assert torch.equal(a.isnan(), b.cpu().isnan()) and torch.equal(a.nan_to_num(), b.cpu().nan_to_num())
    print(f"{device} statistics equal the CPU reference (counts, extremes, top-k lists, windows, histograms, "
          "random and band examples; sums to 1e-5)")

    # Throughput of the fused reduction and of the histograms at a 7B model's width.
    B, T, N = (16, 1024, 11008) if device == "cuda" else (2, 256, 2048)
    x = [torch.randn(B, T, N, device=device, dtype=torch.bfloat16) for _ in range(4)]
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    one = torch.ones((), dtype=torch.int32, device=device)
    tables = [torch.zeros(N, 4, 22, 22, dtype=torch.int32, device=device) for _ in range(2)]
    for name, run in (("fused reduction", lambda: fused(*x, valid)),
                      ("histograms", lambda: histogram(x[0], x[1], x[2], x[3], valid, one, *tables))):
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
