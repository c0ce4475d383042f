"""A neuron in context, measured: related neurons, the effects' cost to a collection, and the probe.

    python bench/context.py --file data/demo.h5 [--model GGUF] [--parts activation,weights,forward,probe]

* ``activation``: ``gluscope related``'s part by activation over every neuron of the file (one run).
* ``weights``: the part by weights for every layer of the model (one run).
* ``forward``: what effects add to a collection's forward pass: a batch of the file's documents through
  the model with the MLP hooks (statistics left out), stopping after the last recorded layer (before
  effects) against running on to the final norm and recording its scale; all layers recorded, and the
  first half only (there the rest of the model runs too). Interleaved, one torch thread, medians.
* ``probe``: ``gluscope probe`` on a sentence, end to end as a command (medians of 3), and the model
  load and the run inside it.

Figures print with the CPU (``lscpu``) and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SENTENCE = "In 1861 the president spoke to Congress of the union, the states, and the war."


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}"


def demo_model() -> str:
    """The demo's model as ``gluscope demo`` leaves it: the float32 folder converted once from the GGUF file."""
    from collect.demo import cache_dir, converted_model, fetch_model

    return str(converted_model(fetch_model(cache_dir()), cache_dir()))


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the child) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_activation(path: Path) -> None:
    from mkdocs_gluscope.related import activation_part
    from mkdocs_gluscope.store import ActivationsFile

    with ActivationsFile(path) as f:
        start = time.perf_counter()
        arrays = activation_part(f)
        took = time.perf_counter() - start
        listed = (arrays["shared_layer"] >= 0).sum(axis=-1)
        print(f"related by activation: {f.n_layers * f.d_mlp:,} neurons in {took:.1f} s; lists with an entry: "
              f"{(listed > 0).mean():.1%}, median length {int(statistics.median(listed.ravel()))}")


def bench_weights(path: Path, model: str) -> None:
    import torch

    from collect.related import weights_part
    from mkdocs_gluscope.store import ActivationsFile

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with ActivationsFile(path) as f:
        start = time.perf_counter()
        marks: list[float] = []
        weights_part(f, model, dtype="float32", device="cpu", progress=lambda i: marks.append(time.perf_counter()))
        took = time.perf_counter() - start
        layer_times = [b - a for a, b in zip(marks, marks[1:])]
        print(f"related by weights: {len(f.layers)} layers x {f.d_mlp} neurons in {took:.1f} s with "
              f"{torch.get_num_threads()} threads, model load included (layer 1, reading the 28 later layers: "
              f"{layer_times[0]:.1f} s; the last layers: {layer_times[-1]:.2f} s)")


def bench_forward(path: Path, model: str, reps: int = 5, docs: int = 8) -> None:
    import numpy as np
    import torch

    from collect.effects import FINAL_SCALE_KEY, final_scale_hook, start_final_scales
    from collect.model import load_model, run_with_mlp_hooks
    from mkdocs_gluscope.store import ActivationsFile

    torch.set_num_threads(1)
    loaded, _ = load_model(model, dtype="float32", device="cpu")
    with ActivationsFile(path) as f:
        chosen = [f.document(d) for d in range(docs)]
        offsets = f.doc_offsets[:docs]
        n_tokens = len(f.tokens)
    length = max(len(d) for d in chosen)
    ids = torch.zeros(docs, length, dtype=torch.long)
    for row, doc in enumerate(chosen):
        ids[row, :len(doc)] = torch.from_numpy(doc.astype(np.int64))
    lengths = torch.tensor([len(d) for d in chosen])

    class Corpus:
        tokens = np.zeros(n_tokens, np.int32)

    routed: dict = {}
    norm = start_final_scales(loaded, Corpus, routed, "cpu")
    noop = lambda *a: None  # noqa: E731

    def before(layers: list[int]) -> None:
        run_with_mlp_hooks(loaded, ids, layers, noop)

    def with_effects(layers: list[int]) -> None:
        with final_scale_hook(norm, routed, offsets, lengths):
            run_with_mlp_hooks(loaded, ids, layers, noop, stop_after_last=False)

    for name, layers in (("all 30 layers", list(range(loaded.n_layers))),
                         ("layers 0-14", list(range(loaded.n_layers // 2)))):
        times: dict[str, list[float]] = {"before": [], "effects": []}
        for _ in range(reps):
            for label, run in (("before", before), ("effects", with_effects)):
                start = time.perf_counter()
                run(layers)
                times[label].append(time.perf_counter() - start)
        a, b = statistics.median(times["before"]), statistics.median(times["effects"])
        print(f"forward, {docs} documents x {length} tokens, {name}: stop after the last MLP {a * 1000:.0f} ms, on to "
              f"the final norm with its scale {b * 1000:.0f} ms: ratio {b / a:.3f} (medians of {reps}, one thread)")
    assert float(routed[FINAL_SCALE_KEY][:10].max()) > 0


def bench_probe(model: str, file: Path, runs: int = 3) -> None:
    """The command end to end, interleaved with a Python that only imports what it imports (torch,
    transformers, transformer_lens): the floor no probe command goes below on this machine."""
    command = [sys.executable, "-m", "mkdocs_gluscope.cli", "probe", "--model", model, "--file", str(file),
               "--neurons", "28.473,7.824", "--no-color", SENTENCE]
    floor = [sys.executable, "-c", "import torch, transformers, transformer_lens"]
    probe, imports = [], []
    for _ in range(runs):
        probe.append(timed(command))
        imports.append(timed(floor))
    from collect.probe import Prober, single_thread

    single_thread()  # as the command
    start = time.perf_counter()
    prober = Prober.load(model, bos="always")
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    prober.run(SENTENCE, [(28, 473), (7, 824)])
    ran = time.perf_counter() - start
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    print(f"gluscope probe, 2 neurons, {len(prober.tokens(SENTENCE))} tokens: {med(probe, 0):.2f} s end to end, "
          f"{med(probe, 1):.2f} CPU s (medians of {runs}; walls {', '.join(f'{w:.2f}' for w, _ in probe)}); "
          f"importing torch, transformers, transformer_lens alone: {med(imports, 0):.2f} s, {med(imports, 1):.2f} "
          f"CPU s; inside: model load {loaded:.2f} s, run {ran * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--model", default=None, help="default: the demo's SmolLM2 (its float32 folder) from the cache")
    parser.add_argument("--parts", default="activation,weights,forward,probe")
    args = parser.parse_args()
    print(machine())
    parts = args.parts.split(",")
    model = args.model or (demo_model() if set(parts) - {"activation"} else "")
    if "activation" in parts:
        bench_activation(args.file)
    if "forward" in parts:
        bench_forward(args.file, model)
    if "probe" in parts:
        bench_probe(model, args.file)
    if "weights" in parts:
        bench_weights(args.file, model)
    print(machine())


if __name__ == "__main__":
    main()
