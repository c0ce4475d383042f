"""The host's work on the GPU's path for the top-k windows kept in host memory: applying one
layer-batch's window writes (:class:`collect.stats.WindowWrites`) at a 7B layer's width, by the
host path (numpy, only the rows that changed) against the device path's fixed-shape torch writes
(every slot of every selected list, old windows written back), interleaved in one run, one thread.

    python bench/window_writes.py            # 7B layer (11,008 neurons), k 16, 19-token float16 windows
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from collect.stats import N_CASES, N_HOOKS, _host_write, _write_windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-mlp", type=int, default=11008)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--window", type=int, default=19)
    p.add_argument("--kept", type=float, default=0.1, help="share of the selected slots whose window changes")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    k, lists = args.k, args.d_mlp * N_CASES * N_HOOKS
    shape = (args.d_mlp, N_CASES, N_HOOKS, k, args.window)
    tables = {name: [torch.full(shape, float("nan"), dtype=torch.float16) for _ in range(2)]
              for name in ("torch", "host")}
    g = torch.Generator().manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{args.d_mlp:,} neurons x {N_CASES * N_HOOKS} lists, k {k}, {args.window}-token float16 windows")
    for capacity, kept in ((4096, args.kept), (32768, args.kept), (lists, 1.0)):
        # Distinct lists, each with its k slots, as merge_top selects them (kept: the entries that entered).
        rows = (torch.randperm(lists, generator=g)[:capacity, None] * k + torch.arange(k)).reshape(-1)
        cuts = [torch.randn(capacity * k, args.window, generator=g).half() for _ in range(2)]
        keep = torch.rand(capacity * k, 1, generator=g) < kept
        times: dict[str, list[float]] = {"torch": [], "host": []}
        for _ in range(args.repeats):
            for name, write in (("torch", _write_windows), ("host", _host_write)):
                start = time.perf_counter()
                write(tables[name], rows, cuts, keep)
                times[name].append(time.perf_counter() - start)
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(*tables.values()))
        t, h = (statistics.median(times[name]) * 1e3 for name in ("torch", "host"))
        print(f"{capacity:,} lists selected ({float(keep.float().mean()):.0%} of their slots changed): host path "
              f"{h:.1f} ms, fixed-shape torch writes {t:.1f} ms per layer-batch (ratio {h / t:.2f}; medians of "
              f"{args.repeats}, interleaved)")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
