"""What the distributions add to one layer's statistics, batch by batch, as the lists fill.

The collection's statistics of one SmolLM2-shaped layer (d_mlp 1,536; batches of 8 documents of
512 tokens, random values; the path collection takes on this device: the CPU kernel where it was
built, else the compiled torch code) with and without the distributions (``--samples 0``), the same
batches for both: the per-batch time of each, and their difference, over many batches. On a CPU the
clock is the CPU time of the one torch thread (the cores may be shared). The lists change less as
they fill, so the cost falls; what stays is the pass over the values. Prints the medians of each
stretch of batches, with the CPU's name and the machine's load.

    python bench/distributions_overhead.py --batches 40
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collect.batch import Batch, LayerPaths  # noqa: E402
from collect.stats import LayerStats  # noqa: E402
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
    clock = time.thread_time if args.threads == 1 else time.perf_counter
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
        return (gate, in_, swish * in_, swish), Batch(docs, lengths, valid, torch.where(valid, prio, EMPTY_PRIORITY),
                                                      16, 2)

    gc.freeze()  # as the collection loop does (collect.run)
    paths = {s: LayerPaths(torch.device("cpu"), N, True) for s in (0, 8)}
    states = {s: LayerStats.empty(N, 16, 19, window_dtype=torch.float16, samples=s, band_samples=2) for s in (0, 8)}
    times: dict[int, list[float]] = {0: [], 8: []}
    for i in range(args.batches + 1):
        hooks, inputs = batch(i)
        for samples, stats in states.items():
            start = clock()
            paths[samples].add(0, stats, hooks, inputs)
            if i:  # batch 0 compiles and checks
                times[samples].append(clock() - start)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU")
    print(f"one layer, d_mlp {N}, batches of {B} x {T} tokens, {cpu}, {args.threads} thread(s), "
          f"{paths[8].fast if paths[8].trusted else 'eager torch code'}; ms per batch, medians "
          f"({'CPU time of the thread' if clock is time.thread_time else 'wall time'}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
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
