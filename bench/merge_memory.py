"""Peak memory of `gluscope merge` against the number of neurons: it streams blocks of neurons,
so the peak should depend on the number of input files, not on the model's size.

    python bench/merge_memory.py [--shards 4] [--neurons 2048 8192]
    python bench/merge_memory.py --layers 1 --neurons 28672   # one layer of a 70B shape: 186 MiB, 37 s
                                                              # (4 shards, 2-core AMD EPYC)
    python bench/merge_memory.py --samples 8                  # with distributions (8 samples, 2 per band):
                                                              # 293 MiB at 2,048 and 8,192 neurons (186 without)

Writes shard-shaped files (k = 16, 16 + 1 + 2 window tokens, float16 windows, random values) into
a temporary folder and prints the peak of numpy/Python allocations (tracemalloc) during the merge.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from mkdocs_gluscope.merge import merge_files
from mkdocs_gluscope.distributions import N_BANDS, N_BINS, N_DENSITY
from mkdocs_gluscope.store import ActivationsWriter, CASES, HOOKS


def write_shard(path: Path, index: int, shards: int, layers: int, neurons: int, k: int = 16, w: int = 19,
                samples: int = 0, band_samples: int = 2) -> None:
    rng = np.random.default_rng(index)
    tokens = np.arange(4000) % 500
    offsets = np.arange(0, 4001, 100)
    attrs = {"shard": f"{index}/{shards}", "layers": list(range(layers)), "has_bos": True, "model": "bench",
             "batch_tokens": 8192, "seed": 0}
    c, h = len(CASES), len(HOOKS)
    with ActivationsWriter(path, n_layers=layers, d_mlp=neurons, k=k, context_before=16, context_after=2,
                           attrs=attrs, samples=samples, band_samples=band_samples) as writer:
        writer.write_corpus(tokens, offsets, [f"t{i}" for i in range(500)], source_index=np.arange(40))
        for layer in range(layers):
            value = -np.sort(-rng.random((neurons, c, h, k)).astype(np.float32), axis=-1)
            distributions = {}
            if samples:
                distributions = {"hist": rng.integers(0, 100, (neurons, c, h, N_BINS)),
                                 "density": rng.integers(0, 100, (neurons, N_DENSITY, N_DENSITY))}
                for group, extra in (("samples", (samples,)), ("bands", (N_BANDS, band_samples))):
                    # This shard's documents only (every shards-th), so shards are disjoint.
                    distributions.update({
                        f"{group}_doc": (rng.integers(0, 40 // shards, (neurons, c) + extra) * shards + index).astype(np.int32),
                        f"{group}_pos": rng.integers(1, 100, (neurons, c) + extra).astype(np.int32),
                        f"{group}_value": rng.random((neurons, c, h) + extra).astype(np.float32),
                        f"{group}_gate": rng.random((neurons, c) + extra + (w,)).astype(np.float16),
                        f"{group}_in": rng.random((neurons, c) + extra + (w,)).astype(np.float16)})
            writer.write_layer(layer, {**distributions,
                "count": rng.integers(0, 100, (neurons, c)), "nonfinite": np.zeros((neurons, c + 1), np.int64),
                "sum": rng.random((neurons, c, h)), "min": rng.random((neurons, c, h)).astype(np.float32),
                "max": rng.random((neurons, c, h)).astype(np.float32), "top_value": value,
                "top_doc": rng.integers(0, 40, (neurons, c, h, k)).astype(np.int32),
                "top_pos": rng.integers(1, 100, (neurons, c, h, k)).astype(np.int32),
                "top_gate": rng.random((neurons, c, h, k, w)).astype(np.float16),
                "top_in": rng.random((neurons, c, h, k, w)).astype(np.float16)})
        writer.write_weights({"flipped": np.zeros((layers, neurons), bool),
                              **{n: np.zeros((layers, neurons), np.float32)
                                 for n in ("cos_gate_in", "cos_gate_out", "cos_in_out")}})
        if samples:
            writer.write_vocab(np.zeros((layers, neurons, 3, 2, 10), np.int32), np.zeros((layers, neurons, 3, 2, 10)))
        writer.close(n_tokens=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--neurons", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--samples", type=int, default=0, help="with distributions: samples per case (0: none)")
    args = parser.parse_args()
    for neurons in args.neurons:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [Path(tmp) / f"s{i}.h5" for i in range(args.shards)]
            for i, path in enumerate(paths):
                write_shard(path, i, args.shards, args.layers, neurons, samples=args.samples)
            tracemalloc.start()
            start = time.perf_counter()
            merge_files(paths, Path(tmp) / "merged.h5")
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            kind = f", {args.samples} samples" if args.samples else ""
            print(f"{args.shards} shards x {args.layers} layers x {neurons} neurons{kind}: merge {elapsed:.1f} s, "
                  f"peak allocations {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
