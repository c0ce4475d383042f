"""The GPU check of issues 10 and 16, as one script: run it when a GPU is at hand and copy its
summary into README.md and site_src/gpu.md, with the GPU's name it prints.

1. ``bench/cuda_check.py``: the GPU's statistics equal the eager CPU reference, through the path
   without host syncs too (its syncs counted per batch), distributions included;
2. ``bench/collect_overhead.py`` at the SmolLM2, 1B and 7B shapes in bfloat16, 512-token
   documents: the collection against the forward pass with and without the logits (``--trunk``),
   whole run and later batches, with and without the distributions;
3. ``bench/sync_count.py``: host syncs per batch of the collection at the SmolLM2, 1B, 7B and
   OLMoE-1B-7B shapes, distributions on (a dense model's target: one per batch);
4. ``bench/moe_overhead.py`` at the OLMoE-1B-7B layer shape: collection against the forward pass;
5. a torchrun collection with 1 process against a plain run of the same tiny model: the same file;
6. 20M tokens of the 7B shape, extrapolated from its measured collection throughput.

    python bench/gpu_check.py                       # on a GPU (about 15 minutes on an H100)
    python bench/gpu_check.py --device cpu --quick  # a smoke test of the script itself: few layers,
                                                    # small corpora, float32, the GPU's path counted on the CPU
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def run(command: list[str], **kwargs) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, **kwargs)
    print(f"$ {' '.join(command)}   [{time.perf_counter() - started:.0f} s]", flush=True)
    text = done.stdout + ("" if done.returncode == 0 else done.stderr[-3000:])
    print(text.rstrip(), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"failed with status {done.returncode}")
    return done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true", help="small corpora: checks the script, not the GPU")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = args.dtype if cuda else "float32"  # no native bfloat16 on most CPUs
    scale = 16 if args.quick else 1
    summary = []
    if cuda or not args.quick:
        out = run([sys.executable, "bench/cuda_check.py", "--device", args.device])
        syncs = re.search(r"host syncs of the path without them, per batch.*?: (\[[\d, ]*\])", out)
        summary.append(f"statistics equal the CPU reference on both paths; syncs per batch {syncs.group(1)}")
    # (shape, tokens, batch tokens): enough batches for the later-batch ratio to mean something.
    shapes = [("smollm2", 1_048_576, 65_536), ("1b", 524_288, 65_536), ("7b", 262_144, 32_768)]
    throughput_7b = None
    for shape, tokens, batch_tokens in shapes:
        size = ["--tokens", str(tokens // scale), "--batch-tokens", str(batch_tokens // scale), "--doc-len", "512",
                "--repeats", "2"]
        quick = args.quick and not cuda  # a CPU: 2 layers, 4 batches of 2 documents
        if quick:
            size = ["--layers", "2", "--tokens", "1024", "--batch-tokens", "256", "--doc-len", "128", "--repeats", "1"]
        out = run([sys.executable, "bench/collect_overhead.py", "--shape", shape, "--device", args.device,
                   "--dtype", dtype, "--no-file", "--trunk", *size])
        with_distributions = out.split("with distributions", 1)[1]
        ratios = {name: [re.search(rf"ratio b/{name}, {span}:\s+([\d.]+)", with_distributions).group(1)
                         for span in ("whole run", "later batches")] for name in ("a", "c")}
        speed = re.search(r"\(b\) full collection:.*?\(([\d,]+) tok/s\)", with_distributions)
        summary.append(f"{shape}{' (2 layers)' if quick else ''}, distributions on: ratio vs the forward pass "
                       f"without logits {ratios['c'][0]} whole run, {ratios['c'][1]} later batches (with logits "
                       f"{ratios['a'][0]}, {ratios['a'][1]}); {speed.group(1)} tokens/s collected")
        if shape == "7b":
            throughput_7b = float(speed.group(1).replace(",", ""))
            state = re.search(r"on a GPU: device state ([\d,]+) bytes per neuron \(([\d.]+) GiB\), host state "
                              r"([\d,]+) bytes per neuron \(([\d.]+) GiB", with_distributions)
            summary.append(f"statistics of the 7B shape (computed): {state.group(1)} bytes a neuron on the device "
                           f"({state.group(2)} GiB), {state.group(3)} in host memory ({state.group(4)} GiB)")
    for shape in ("smollm2", "1b", "7b", "olmoe"):
        if cuda:  # the whole model where it fits next to its statistics, else 2 layers of it
            size = ["--layers", "2"] if shape in ("7b", "olmoe") else []
        else:
            size = ["--layers", "1", "--tokens", "1024", "--doc-len", "256", "--batch-tokens", "512"]
            size += ["--experts", "8"] if shape == "olmoe" else []
        out = run([sys.executable, "bench/sync_count.py", "--shape", shape, "--device", args.device, "--dtype", dtype,
                   *size])
        counts = re.search(r"host syncs per batch: (\[[\d, ]*\])", out).group(1)
        bare = re.search(r"alone: (\d+)", out).group(1)
        summary.append(f"host syncs per batch, {shape}{'' if cuda else ' (the GPU path on the CPU, 1 layer)'}: "
                       f"{counts} (the bare forward pass of a batch: {bare})")
    moe = (["--layers", "2", "--tokens", "16384", "--batch-tokens", "4096"] if cuda else
           ["--layers", "1", "--experts", "8", "--d-expert", "256", "--d-model", "512", "--heads", "8",
            "--vocab", "1024", "--tokens", "512", "--doc-len", "128", "--batch-tokens", "256"])
    out = run([sys.executable, "bench/moe_overhead.py", "--device", args.device, "--dtype", dtype, *moe])
    ratios = [re.search(rf"{span}.*?ratio ([\d.]+)", out).group(1) for span in ("whole run", "later batches")]
    summary.append(f"MoE{' (OLMoE layer shape, 2 layers)' if cuda else ' (a small MoE)'}: collection vs the forward "
                   f"pass {ratios[0]} whole run, {ratios[1]} later batches")
    with tempfile.TemporaryDirectory() as tmp:
        import tiny

        model = tiny.make_model_dir(Path(tmp) / "model")
        corpus = tiny.write_corpus_files(Path(tmp) / "corpus")
        common = ["collect", "--model", str(model), "--dataset", *map(str, corpus), "--k", "4", "--batch-tokens", "64",
                  "--device", args.device, "--dtype", "float32", "--no-progress"]
        run([sys.executable, "-m", "mkdocs_gluscope.cli", *common, "--out", f"{tmp}/plain.h5"])
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
             "-m", "mkdocs_gluscope.cli", *common, "--out", f"{tmp}/torchrun.h5"])
        from test_distributed import same_file

        same_file(Path(f"{tmp}/plain.h5"), Path(f"{tmp}/torchrun.h5"), world_size=1)
        summary.append("torchrun with 1 process: the same file as a plain run (every dataset)")
    if throughput_7b:
        minutes = 20e6 / throughput_7b / 60
        summary.append(f"20M tokens of the 7B shape: {minutes:.0f} minutes at {throughput_7b:,.0f} tokens/s "
                       "(extrapolated, without writing the file)")
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nsummary ({device}, {dtype}, torch {torch.__version__}):")
    for line in summary:
        print(f"  {line}")


if __name__ == "__main__":
    main()
