"""The GPU check of issue 10, as one script: run it when a GPU is at hand and copy its summary into
README.md and site_src/gpu.md, with the GPU's name it prints.

1. ``bench/cuda_check.py``: the GPU's statistics equal the CPU reference;
2. ``bench/collect_overhead.py`` at the SmolLM2, 1B and 7B shapes in bfloat16 (ratio targets:
   at most 1.30, -, 1.10);
3. a torchrun collection with 1 process against a plain run of the same tiny model: the same file;
4. 20M tokens of the 7B shape, extrapolated from its measured collection throughput.

    python bench/gpu_check.py                  # about 8 minutes on an H200
    python bench/gpu_check.py --quick          # smaller corpora, to try the script itself
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
    scale = 16 if args.quick else 1
    summary = []
    if args.device.startswith("cuda"):
        run([sys.executable, "bench/cuda_check.py"])
    # (shape, tokens, batch tokens): enough batches for the later-batch ratio to mean something.
    shapes = [("smollm2", 1_048_576, 65_536), ("1b", 524_288, 65_536), ("7b", 262_144, 32_768)]
    throughput_7b = None
    for shape, tokens, batch_tokens in shapes:
        out = run([sys.executable, "bench/collect_overhead.py", "--shape", shape, "--device", args.device,
                   "--dtype", args.dtype, "--tokens", str(tokens // scale), "--batch-tokens", str(batch_tokens // scale),
                   "--doc-len", "512", "--repeats", "2", "--no-file"])
        whole = re.search(r"ratio b/a, whole run:\s+([\d.]+)", out)
        late = re.search(r"ratio b/a, later batches:\s+([\d.]+)", out)
        speed = re.search(r"\(b\) full collection:.*?\(([\d,]+) tok/s\)", out)
        summary.append(f"{shape}: ratio {whole.group(1)} whole run, {late.group(1)} later batches, "
                       f"{speed.group(1)} tokens/s collected")
        if shape == "7b":
            throughput_7b = float(speed.group(1).replace(",", ""))
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
    print(f"\nsummary ({device}, {args.dtype}, torch {torch.__version__}):")
    for line in summary:
        print(f"  {line}")


if __name__ == "__main__":
    main()
