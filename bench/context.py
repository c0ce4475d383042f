"""A neuron in context, measured: related neurons, the effects' cost to a collection, and the probe.

    python bench/context.py --file data/demo.h5 [--model MODEL] [--parts activation,weights,forward,probe] [--runs 5]

* ``activation``: ``gluscope related``'s part by activation over every neuron of the file (one run).
* ``weights``: the part by weights for every layer of the model (one run).
* ``forward``: what effects add to a collection's forward pass: a batch of the file's documents through
  the model with the MLP hooks (statistics left out), stopping after the last recorded layer (before
  effects) against running on to the final norm and recording its scale; all layers recorded, and the
  first half only (there the rest of the model runs too). Interleaved, one torch thread, medians.
* ``probe``: ``gluscope probe`` on a sentence, end to end from the shell in fresh processes (medians of
  ``--runs``), from the checked recipe (the default, once a first probe kept one) and with ``--no-recipe``
  (through transformers) interleaved; its steps timed in as many fresh processes (imports, the file's
  opening, model load, the forward pass, printing), and its imports by package (``python -X importtime``).

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
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if ":" in line)
    get = lambda key: fields.get(key, "?").strip()  # noqa: E731
    isa = "AVX-512" if "avx512f" in get("Flags").split() else "AVX2 only" if "avx2" in get("Flags").split() else "no AVX2"
    return (f"{get('Model name')} (family {get('CPU family')} model {get('Model')}, {isa}), {len(os.sched_getaffinity(0))} "
            f"cores; load average {os.getloadavg()[0]:.1f}")


def demo_model() -> str:
    """The demo's model as ``gluscope demo`` leaves it: the float32 folder converted once from the GGUF file."""
    from collect.demo import cache_dir, converted_model, fetch_model

    return str(converted_model(fetch_model(cache_dir()), cache_dir()))


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the child) of one command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
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


PROBE_NEURONS = "28.473,7.824"
#: What the probe's phases are called in the breakdown, in the order the command goes through them.
PHASES = ("import gluscope cli", "import the probe (torch...)", "open the file (schema check)",
          "load tokenizer + model", "refactor_glu its layers, forward pass", "print")


def probe_phases(model: str, file: Path) -> None:
    """In a fresh process (``--probe-phases``): the steps ``gluscope probe`` takes, in its order, each timed;
    printed as one JSON line. The steps are the command's own calls (``run_probe``), unrolled."""
    import io
    import json

    began = time.time()  # the parent compares it with when it started this process
    marks = [(time.perf_counter(), time.process_time())]

    def mark() -> None:
        marks.append((time.perf_counter(), time.process_time()))

    from mkdocs_gluscope import cli
    from mkdocs_gluscope.probe import print_probed
    cli.freeze_at_exit()  # as cli.main
    mark()
    from collect.probe import Prober, single_thread
    mark()
    single_thread()
    with cli.open_activations(file) as f:
        bos, refactor = str(f.attrs.get("bos", "auto")), bool(f.attrs.get("refactor_glu", True))
    mark()
    prober = Prober.load(model, refactor_glu=refactor, bos=bos)
    mark()
    neurons = cli._neuron_list(PROBE_NEURONS)
    probed = prober.run(SENTENCE, neurons)
    mark()
    print_probed(probed, io.StringIO(), color=True)
    mark()
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    import torch

    print(json.dumps({"phases": dict(zip(PHASES, steps)), "total": [b - a for a, b in zip(marks[0], marks[-1])],
                      "tokens": len(probed.tokens), "engine": prober.engine, "transformers": "transformers" in sys.modules,
                      "transformer_lens": "transformer_lens" in sys.modules, "threads": torch.get_num_threads(),
                      "began": began, "ended": time.time()}), flush=True)


def import_times(command: list[str]) -> dict[str, float]:
    """Seconds spent importing, by top package (``python -X importtime``): the sum of each module's own
    time (not counting what it imports in turn) over all modules of the package, so that the packages'
    figures add up to the whole."""
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    out: dict[str, float] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2 or "cumulative" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        root = name.strip().split(".")[0]
        out[root] = out.get(root, 0.0) + int(own) / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench_probe(model: str, file: Path, runs: int = 5) -> None:
    """``gluscope probe`` on a sentence from the shell, ``runs`` times in fresh processes, interleaved with as
    many with ``--no-recipe`` (through transformers), as many fresh processes that only import what a probe
    through transformers imports (torch, transformers and the model's modeling module: that path's floor)
    and as many that time the probe's steps (:func:`probe_phases`); once with an empty cache folder before
    them (the first probe of a model asks TransformerLens where its MLPs are and checks the recipe); then
    where the imports go (``-X importtime``, one run). Medians; one torch thread, as the command."""
    import json
    import tempfile

    command = [sys.executable, "-m", "mkdocs_gluscope.cli", "probe", "--model", model, "--file", str(file),
               "--neurons", PROBE_NEURONS, "--no-color", SENTENCE]
    kind = json.loads((Path(model) / "config.json").read_text())["model_type"] if Path(model).is_dir() else "llama"
    floor = [sys.executable, "-c", "import torch, transformers.models.auto.modeling_auto, "
             f"transformers.models.auto.tokenization_auto, transformers.models.{kind}.modeling_{kind}"]
    phases_command = [sys.executable, str(Path(__file__).resolve()), "--probe-phases", "--model", model,
                      "--file", str(file)]
    with tempfile.TemporaryDirectory() as empty:
        first = timed(command, env={**os.environ, "GLUSCOPE_CACHE": empty})
    timed(command)  # not counted: keeps the layout and the checked recipe in the cache the runs below use
    ends, through, floors, steps, loads = [], [], [], [], []
    for _ in range(runs):
        loads.append(os.getloadavg()[0])
        ends.append(timed(command))
        through.append(timed([*command, "--no-recipe"]))
        floors.append(timed(floor))
        started = time.time()
        result = subprocess.run(phases_command, capture_output=True, text=True, cwd=ROOT)
        finished = time.time()
        assert result.returncode == 0, result.stderr[-2000:]
        steps.append(json.loads(result.stdout.strip().splitlines()[-1]))
        steps[-1]["start"], steps[-1]["exit"] = steps[-1]["began"] - started, finished - steps[-1]["ended"]
    med = statistics.median
    print(f"gluscope probe --neurons {PROBE_NEURONS}, {steps[0]['tokens']} tokens, end to end from the shell: "
          f"{med(w for w, _ in ends):.2f} s wall, {med(c for _, c in ends):.2f} CPU s (medians of {runs}; walls "
          f"{', '.join(f'{w:.2f}' for w, _ in ends)}; load average {min(loads):.1f}-{max(loads):.1f}); the first "
          f"probe of the model (an empty cache folder): {first[0]:.2f} s wall, {first[1]:.2f} CPU s")
    print(f"the same with --no-recipe (through transformers), interleaved: {med(w for w, _ in through):.2f} s wall, "
          f"{med(c for _, c in through):.2f} CPU s (walls {', '.join(f'{w:.2f}' for w, _ in through)})")
    print(f"importing torch and transformers' {kind} model and auto classes alone (the floor): {med(w for w, _ in floors):.2f} s "
          f"wall, {med(c for _, c in floors):.2f} CPU s (medians of {runs})")
    print(f"its steps, timed inside a fresh process (medians of {runs}; wall and CPU seconds; {steps[0]['threads']} "
          f"torch thread; engine {steps[0]['engine']}; transformers imported: {steps[0]['transformers']}; "
          f"transformer_lens imported: {steps[0]['transformer_lens']}):")
    for name in PHASES:
        print(f"  {name:<40} {med(s['phases'][name][0] for s in steps):6.2f} s {med(s['phases'][name][1] for s in steps):6.2f} CPU s")
    total = med(s["total"][0] for s in steps)
    print(f"  {'all steps':<40} {total:6.2f} s {med(s['total'][1] for s in steps):6.2f} CPU s; before them, the "
          f"interpreter's start {med(s['start'] for s in steps):.2f} s; after them, its exit {med(s['exit'] for s in steps):.2f} s")
    imports = import_times(command)
    print("imports by package (python -X importtime, each module's own time, one run; it adds its own overhead): "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in list(imports.items())[:10])
          + f"; all {sum(imports.values()):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--model", default=None, help="default: the demo's SmolLM2 (its float32 folder) from the cache")
    parser.add_argument("--parts", default="activation,weights,forward,probe")
    parser.add_argument("--runs", type=int, default=5, help="fresh probe processes to take medians over (default: 5)")
    parser.add_argument("--probe-phases", action="store_true", help=argparse.SUPPRESS)  # the child of bench_probe
    args = parser.parse_args()
    if args.probe_phases:
        probe_phases(args.model, args.file)
        return
    print(machine())
    parts = args.parts.split(",")
    model = args.model or (demo_model() if set(parts) - {"activation"} else "")
    if "activation" in parts:
        bench_activation(args.file)
    if "forward" in parts:
        bench_forward(args.file, model)
    if "probe" in parts:
        bench_probe(model, args.file, args.runs)
    if "weights" in parts:
        bench_weights(args.file, model)
    print(machine())


if __name__ == "__main__":
    main()
