"""On a CUDA machine: the compiled statistics on the GPU agree with the eager CPU reference, both
through the path with a host sync per layer-batch and through the collection's path without
(``nonzero_static`` with a capacity, every other batch too small on purpose, so that it is added again).

    python bench/cuda_check.py
"""

from __future__ import annotations

import time

import torch

from collect.stats import LayerStats, add_batch, compiled_reduce_batch, reduce_batch, update_stats


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    g = torch.Generator().manual_seed(0)
    B, T, N, k, before, after = 6, 96, 512, 16, 16, 2
    cpu_stats = LayerStats.empty(N, k, before + 1 + after)
    gpu_stats = LayerStats.empty(N, k, before + 1 + after, device="cuda")
    static_stats = LayerStats.empty(N, k, before + 1 + after, device="cuda")
    fused = compiled_reduce_batch(True)
    fast = compiled_reduce_batch(True, exact_on_suspect=False)
    redone = 0
    for batch in range(5):
        gate = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8  # exact ties
        in_ = torch.round(torch.randn(B, T, N, generator=g) * 8) / 8
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        valid = (torch.arange(T)[None] < lengths[:, None]) & (torch.arange(T)[None] >= 1)
        swish = torch.nn.functional.silu(gate)
        post = swish * in_
        ids = torch.arange(batch * B, (batch + 1) * B)
        r = reduce_batch(gate, in_, post, swish, valid)
        cpu_stats = add_batch(cpu_stats, r, ids, gate, in_, lengths, before, after)
        cuda = [x.cuda() for x in (gate, in_, post, swish, valid)]
        rg = fused(*cuda)
        gpu_stats = add_batch(gpu_stats, rg, ids.cuda(), cuda[0], cuda[1], lengths.cuda(), before, after)
        rf = fast(*cuda)
        applied, _ = update_stats(static_stats, rf, ids.cuda(), cuda[0], cuda[1], lengths.cuda(), before, after,
                                  capacity=N * 16 // (1 + batch % 2), accept=~rf.suspect)
        if not bool(applied):
            redone += 1
            update_stats(static_stats, reduce_batch(*cuda), ids.cuda(), cuda[0], cuda[1], lengths.cuda(), before, after)
    torch.cuda.synchronize()
    for name in ("count", "min", "max", "top_key", "top_doc", "top_pos"):
        assert torch.equal(getattr(static_stats, name), getattr(gpu_stats, name)), name
    for a, b in zip(static_stats.ordered_windows(), gpu_stats.ordered_windows()):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    print(f"the path without host syncs equals the synced one ({redone} of 5 batches over capacity, added again)")
    for name in ("count", "min", "max", "top_key", "top_doc", "top_pos"):
        a, b = getattr(cpu_stats, name), getattr(gpu_stats, name).cpu()
        assert torch.equal(a, b), name
    torch.testing.assert_close(gpu_stats.sum.cpu(), cpu_stats.sum, rtol=1e-5, atol=1e-4)
    for a, b in zip(cpu_stats.ordered_windows(), gpu_stats.ordered_windows()):
        assert torch.equal(a.isnan(), b.cpu().isnan()) and torch.equal(a.nan_to_num(), b.cpu().nan_to_num())
    print("CUDA statistics equal the CPU reference (counts, extremes, top-k lists, windows; sums to 1e-5)")

    # Throughput of the fused reduction at a 7B model's width.
    B, T, N = 16, 1024, 11008
    x = [torch.randn(B, T, N, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
    fused(*x, valid)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        fused(*x, valid)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1000
    print(f"fused reduction, {B}x{T} tokens x {N} neurons (bf16): {ms:.2f} ms per layer-batch "
          f"({B * T / ms * 1000 / 1e6:.1f} M tokens/s per layer)")


if __name__ == "__main__":
    main()
