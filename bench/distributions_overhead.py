"""What the distributions add to one layer's statistics, batch by batch, as the lists fill.

The collection's statistics of one SmolLM2-shaped layer (d_mlp 1,536; batches of 8 documents of
512 tokens, random values; compiled, one thread) with and without the distributions (``--samples
0``), the same batches for both: the per-batch time of each, and their difference, over many
batches. The random examples cost most in the first batches, while their lists fill; what stays is
the histograms' pass. Prints the medians of each stretch of batches, with the CPU's name.

    python bench/distributions_overhead.py --batches 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collect.stats import LayerStats, compiled_histogram_batch, compiled_reduce_batch, update_stats  # noqa: E402
from mkdocs_gluscope.distributions import EMPTY_PRIORITY, position_priority  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--docs", type=int, default=8, help="documents per batch")
    p.add_argument("--length", type=int, default=512, help="tokens per document")
    p.add_argument("--d-mlp", type=int, default=1536)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, T, N = args.docs, args.length, args.d_mlp
    reduce = compiled_reduce_batch(True, exact_on_suspect=False)
    histogram = compiled_histogram_batch(True)
    lengths = torch.full((B,), T)

    def batch(i: int):
        g = torch.Generator().manual_seed(i)
        gate, in_ = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
        swish = torch.nn.functional.silu(gate)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, 0] = False  # the BOS
        docs = torch.arange(i * B, (i + 1) * B)
        prio = torch.from_numpy(position_priority(0, docs.numpy()[:, None], np.zeros((B, 1), dtype=np.int64),
                                                  np.arange(T)[None, :]))
        return gate, in_, swish * in_, swish, valid, docs, torch.where(valid, prio, EMPTY_PRIORITY)

    states = {s: LayerStats.empty(N, 16, 19, window_dtype=torch.float16, samples=s, band_samples=2) for s in (0, 8)}
    times: dict[int, list[float]] = {0: [], 8: []}
    for i in range(args.batches + 1):
        gate, in_, post, swish, valid, docs, prio = batch(i)
        for samples, stats in states.items():
            extra = dict(hooks=(post, in_, gate, swish), valid=valid, prio=prio, histogram=histogram) if samples else {}
            start = time.perf_counter()
            reduced = reduce(gate, in_, post, swish, valid)
            update_stats(stats, reduced, docs, gate, in_, lengths, 16, 2, accept=~reduced.suspect, **extra)
            if i:  # batch 0 compiles
                times[samples].append(time.perf_counter() - start)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU")
    print(f"one layer, d_mlp {N}, batches of {B} x {T} tokens, {cpu}, {args.threads} thread(s); ms per batch, medians")
    print(f"{'batches':>10} {'without':>9} {'with':>9} {'added':>8}")
    edges = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for lo, hi in zip(edges, edges[1:]):
        if lo > args.batches:
            break
        part = slice(lo - 1, min(hi - 1, args.batches))
        a, b = statistics.median(times[0][part]) * 1e3, statistics.median(times[8][part]) * 1e3
        print(f"{f'{lo}-{min(hi - 1, args.batches)}':>10} {a:9.1f} {b:9.1f} {b - a:8.1f}")


if __name__ == "__main__":
    main()
