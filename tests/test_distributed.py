"""One collection on several gloo processes (torchrun, CPU) writes the file a single process writes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from collect.run import Interrupted, collect
from test_collect import small_config

REPO = Path(__file__).resolve().parent.parent
OPTIONS = dict(batch_tokens=64, k=4)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def same_file(single: Path, other: Path, world_size: int) -> None:
    """Every dataset equal (sums up to rounding: the ranks add in another order)."""
    with h5py.File(single) as a, h5py.File(other) as b:
        names: list[str] = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        other_names: list[str] = []
        b.visit(lambda name: other_names.append(name) if isinstance(b[name], h5py.Dataset) else None)
        assert sorted(names) == sorted(other_names)
        for name in names:
            x, y = a[name][...], b[name][...]
            if name.endswith("stats/sum"):  # (the expert groups too)
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
            elif x.dtype.kind == "f":
                assert np.array_equal(x, y, equal_nan=True), name
            else:
                assert np.array_equal(x, y), name
        assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
        assert a.attrs["world_size"] == 1 and b.attrs["world_size"] == world_size


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    program = [str(script)] if script else ["-m", "mkdocs_gluscope.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *program, "collect", *args]
    return subprocess.run(command, env={**env(), **env_vars}, capture_output=True, text=True, timeout=600)


#: ``gluscope`` with one rank failing at one of its batches (GLUSCOPE_TEST_FAIL="RANK:BATCH"), as a GPU
#: error or an out-of-memory would: run by torchrun in place of the command.
FAILING_RANK = """
import os, sys, time
import collect.run as run

rank, at = (int(x) for x in os.environ["GLUSCOPE_TEST_FAIL"].split(":"))
calls, original = [0], run._run_batch

def failing(*args, **kwargs):
    calls[0] += 1
    if int(os.environ["RANK"]) == rank and calls[0] == at:
        with open(os.environ["GLUSCOPE_TEST_FAILED_AT"], "w") as f:
            f.write(repr(time.time()))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return original(*args, **kwargs)

run._run_batch = failing
from mkdocs_gluscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_and_the_run_resumes(model_factory, corpus_files, tmp_path):
    """Rank 1 fails at its third batch: every process ends within seconds (not at the process group's
    timeout of hours), the run exits non-zero naming the failed rank, and --resume completes the file
    that an uninterrupted run writes."""
    import time

    model = model_factory("llama")
    single = collect(small_config(model, corpus_files, tmp_path / "single.h5", **OPTIONS))
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "failed.h5"
    args = cli_args(model, corpus_files, out) + ["--checkpoint-every", "0"]  # a checkpoint every round
    failed_at = tmp_path / "failed_at"
    done = torchrun(args, script=script, GLUSCOPE_TEST_FAIL="1:3", GLUSCOPE_TEST_FAILED_AT=str(failed_at))
    elapsed = time.time() - float(failed_at.read_text())
    assert done.returncode != 0 and not out.exists()
    assert elapsed < 30, f"the ranks took {elapsed:.0f} s to stop after rank 1 failed"
    assert "gluscope: error: rank 1 failed (RuntimeError: CUDA error: an illegal memory access" in done.stderr
    with torch_checkpoint(out) as saved:
        assert saved["batches_done"] == 4  # rounds 0 and 1 (batches 0-3) were checkpointed before it failed
    resumed = torchrun(cli_args(model, corpus_files, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after 4/" in resumed.stderr
    same_file(single, out, world_size=2)


@contextlib.contextmanager
def torch_checkpoint(out: Path):
    import torch

    yield torch.load(out.with_name(out.name + ".ckpt"), weights_only=True)


def cli_args(model: Path, corpus: list[Path], out: Path) -> list[str]:
    return ["--model", str(model), "--dataset", *map(str, corpus), "--out", str(out), "--k", "4",
            "--context-before", "3", "--context-after", "1", "--no-compile", "--no-progress", "--device", "cpu",
            "--batch-tokens", "64", "--dtype", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3], ids=["2-processes", "3-processes-uneven"])
def test_torchrun_gloo_processes_write_the_single_process_file(nproc, model_factory, corpus_files, tmp_path):
    """8 batches: 4 per rank for 2 processes; 3, 3 and 2 for 3 (the last round has an idle rank,
    and the merge tree is not a power of two)."""
    model = model_factory("llama")
    single = collect(small_config(model, corpus_files, tmp_path / "single.h5", **OPTIONS))
    out = tmp_path / "torchrun.h5"
    done = torchrun(cli_args(model, corpus_files, out), nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("gluscope: wrote") == 1  # rank 0 alone writes
    same_file(single, out, world_size=nproc)


#: ``gluscope`` on the GPU's code path (capacities, example candidates, packed lengths, the top-k
#: windows in host memory), run by torchrun on CPUs in place of the command.
GPU_PATH = """
import sys
from collect.memory import ListCapacity, PackedLength

ListCapacity.ON_CPU = PackedLength.ON_CPU = True
from mkdocs_gluscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_on_the_gpu_path_merges_host_windows_into_the_single_process_file(model_factory, corpus_files,
                                                                                   tmp_path):
    """Issue 16 (device state): 2 processes on the GPU's code path, whose top-k windows live in host
    memory, checkpointing every round (so every round merges both ranks' statistics into rank 0, the
    windows joining the one message from the host): the single process file, dataset by dataset."""
    model = model_factory("llama")
    single = collect(small_config(model, corpus_files, tmp_path / "single.h5", **OPTIONS))
    script = tmp_path / "gpu_path.py"
    script.write_text(GPU_PATH)
    out = tmp_path / "torchrun.h5"
    done = torchrun(cli_args(model, corpus_files, out) + ["--checkpoint-every", "0"], script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    same_file(single, out, world_size=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config_kwargs: dict, stop_after: int | None) -> None:
    """One rank as torchrun would start it (torch.multiprocessing.spawn target)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from collect.run import CollectConfig

    try:
        collect(CollectConfig(**config_kwargs), stop_after_batches=stop_after)
    except Interrupted:
        pass


def _spawn(config_kwargs: dict, stop_after: int | None, world: int = 2) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, _free_port(), config_kwargs, stop_after), nprocs=world, join=True)


@pytest.mark.slow
def test_interrupted_torchrun_run_resumes_with_another_number_of_processes(model_factory, corpus_files, tmp_path):
    """The ranks' statistics merge into rank 0's checkpoint; it holds whole rounds of batches, so
    it resumes under torchrun with 2 processes, or in a plain run, into the single-process file."""
    import dataclasses

    model = model_factory("llama")
    single = collect(small_config(model, corpus_files, tmp_path / "single.h5", **OPTIONS))
    for name, resume_with in (("resumed-2", 2), ("resumed-1", 1)):
        config = small_config(model, corpus_files, tmp_path / f"{name}.h5", **OPTIONS)
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        _spawn(kwargs, stop_after=3)
        assert config.checkpoint_path.exists() and not config.out.exists()
        if resume_with == 2:
            done = torchrun(cli_args(model, corpus_files, config.out) + ["--resume"])
            assert done.returncode == 0, done.stderr[-3000:]
            assert "resuming from" in done.stderr and "after 4/" in done.stderr  # 2 rounds of 2 batches
        else:
            config.resume = True
            collect(config)
        assert not config.checkpoint_path.exists()
        same_file(single, config.out, world_size=resume_with)


@pytest.mark.slow
def test_torchrun_with_expert_neurons_writes_the_single_process_file(model_factory, corpus_files, tmp_path):
    """A model with dense layers, routed experts and a shared expert (DeepSeek-V2) on 2 gloo processes:
    the experts' statistics merge exactly like a dense layer's and their routed counts add up."""
    import torch

    model = model_factory("deepseek2", 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: grouped_mm's last bits depend on the number of threads
    try:
        single = collect(small_config(model, corpus_files, tmp_path / "single.h5", **OPTIONS))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "torchrun.h5"
    done = torchrun(cli_args(model, corpus_files, out))
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(out) as f:
        assert "experts/routed" in f and "shared_experts/stats/count" in f
    same_file(single, out, world_size=2)
