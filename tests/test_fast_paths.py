"""Collection's fast paths (collect/batch.py): one host sync per batch on the GPU's path, one forward
pass per batch, and a run-time check that catches fast code that is wrong anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import collect.run as run_module
from collect import fused
from collect.allocator import is_glibc
from collect.memory import ListCapacity
from collect.run import collect
from collect.stats import reduce_batch
from collect.syncs import SyncCounter
from test_collect import same_statistics, small_config


def run_counting_syncs(config, monkeypatch) -> list:
    """``collect(config)``, with the host syncs of each batch counted."""
    run_batch = run_module._run_batch
    per_batch = []

    def counted(*args, **kwargs):
        with SyncCounter() as syncs:
            run_batch(*args, **kwargs)
        per_batch.append(syncs.counts)

    monkeypatch.setattr(run_module, "_run_batch", counted)
    collect(config)
    monkeypatch.setattr(run_module, "_run_batch", run_batch)
    return per_batch


def test_gpu_path_makes_one_host_sync_per_batch_and_the_exact_paths_file(model_factory, corpus_files, tmp_path,
                                                                         monkeypatch, torch_path):
    """Issue 16: with the distributions, the GPU's code path (run on a CPU) waits for the device
    once per batch, the first batch included (its random examples fill without a redo), and writes
    the file of the exact path, dataset by dataset."""
    model = model_factory("llama")
    exact = collect(small_config(model, corpus_files, tmp_path / "exact.h5", batch_tokens=64))
    monkeypatch.setattr(ListCapacity, "ON_CPU", True)
    per_batch = run_counting_syncs(small_config(model, corpus_files, tmp_path / "gpu.h5", batch_tokens=64), monkeypatch)
    assert len(per_batch) > 3 and all(sum(c.values()) == 1 for c in per_batch), per_batch
    same_statistics(exact, tmp_path / "gpu.h5")


def test_gpu_path_keeps_the_windows_in_host_memory_and_resumes_into_the_exact_paths_file(
        model_factory, corpus_files, tmp_path, monkeypatch, torch_path):
    """Issue 16 (device state): on the GPU's code path (run on a CPU) the top-k windows live in host
    memory; each batch's window writes are on their way there until the batch's host sync and are
    applied during the next batch (none of an earlier batch is left when a batch ends); a run stopped
    after 2 batches (its checkpoint holds the host windows) resumes into the exact path's file,
    dataset by dataset."""
    from collect.run import Interrupted
    from collect.stats import WindowWrites

    model = model_factory("llama")
    exact = collect(small_config(model, corpus_files, tmp_path / "exact.h5", batch_tokens=64))
    monkeypatch.setattr(ListCapacity, "ON_CPU", True)
    pushed, made, push, run_batch = [], [], WindowWrites.push, run_module._run_batch

    def counted_push(self, *args):
        pushed.append(self)
        return push(self, *args)

    def checked_batch(*args, **kwargs):
        pushed.clear()
        run_batch(*args, **kwargs)
        states = args[4]
        for stats in states.values():  # what is left was made by this batch
            assert stats.writes is not None and len(stats.writes) == sum(w is stats.writes for w in pushed)
        made.append(len(pushed))

    monkeypatch.setattr(WindowWrites, "push", counted_push)
    monkeypatch.setattr(run_module, "_run_batch", checked_batch)
    config = small_config(model, corpus_files, tmp_path / "resumed.h5", batch_tokens=64)
    with pytest.raises(Interrupted, match="--resume"):
        collect(config, stop_after_batches=2)
    config.resume = True
    collect(config)
    assert len(made) > 3 and all(made), made
    same_statistics(exact, config.out)


def test_sync_counter_counts_what_makes_the_host_wait():
    x = torch.arange(10)
    with SyncCounter() as syncs:
        x.sum()
        x[x > 3]  # boolean mask: its size depends on the values
        x.nonzero()
        int(x[0])
        torch.unique(x)
        x.tolist()
        torch.nonzero_static(x > 3, size=4)  # a fixed size: no wait
    assert syncs.total == 5 and syncs.counts["tolist"] == 1, syncs.counts


def float16_model_with_an_overflowing_neuron(model_factory, folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_factory("llama"))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0] *= 1e5  # beyond float16's 65504 on most tokens
    model.to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_factory("llama") / name).exists():
            (folder / name).write_bytes((model_factory("llama") / name).read_bytes())
    return folder


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_float16_model_with_an_overflowing_neuron_runs_one_forward_pass_per_batch(path, model_factory, corpus_files,
                                                                                   tmp_path, monkeypatch, request):
    """Issue 16: a flagged layer-batch is redone from the tensors in hand, not by a second forward
    pass (the torch code flags every batch here: its fast path assumes finite values)."""
    if path == "torch":
        request.getfixturevalue("torch_path")
    elif not fused.available():
        pytest.skip("collect._fused was not built")
    folder = float16_model_with_an_overflowing_neuron(model_factory, tmp_path / "fp16")
    forwards, flagged, batches = [], [], []
    run_with_hooks, run_batch = run_module.run_with_mlp_hooks, run_module._run_batch

    def counting(loaded, input_ids, layers, on_layer, on_moe=None, **options):
        forwards.append(layers)
        return run_with_hooks(loaded, input_ids, layers, on_layer, on_moe, **options)

    def batch_counting(*args, **kwargs):
        batches.append(args[2])
        return run_batch(*args, **kwargs)

    def noting(*args, **kwargs):
        reduced = reduce_batch(*args, **kwargs)
        flagged.append(bool(reduced.suspect))
        return reduced

    monkeypatch.setattr(run_module, "run_with_mlp_hooks", counting)
    monkeypatch.setattr(run_module, "_run_batch", batch_counting)
    monkeypatch.setattr("collect.compiled.reduce_batch", noting)
    out = collect(small_config(folder, corpus_files, tmp_path / "run.h5", dtype="float16", layers=[0],
                               refactor_glu=False))
    import h5py

    with h5py.File(out) as f:
        assert f["stats/nonfinite"][0, 0].sum() > f.attrs["n_tokens"] // 2  # the overflowing neuron
        assert (f["stats/nonfinite"][0, 1:] == 0).all()
    assert len(batches) > 3 and len(forwards) == len(batches)
    if path == "torch":
        assert sum(flagged) == len(batches)  # every batch flagged by the fast path, and redone


def miscompiled(corrupt):
    """A ``compiled_reduce_batch`` whose results ``corrupt`` changes: what a kernel compiled for
    another instruction set did."""
    def make(enabled, **kwargs):
        def compiled(*args):
            reduced = reduce_batch(*args, assume_finite=True)
            corrupt(reduced)
            return reduced
        return compiled
    return make


@pytest.mark.parametrize("fault", ["neurons-past-32", "per-document-counts", "histograms", "kernel-histograms",
                                   "kernel-candidates"])
def test_wrong_fast_code_is_caught_and_the_batch_recomputed(fault, model_factory, corpus_files, tmp_path,
                                                            monkeypatch, capsys, request):
    """Issue 15: the run-time check compares every output of the fast code on neurons spread over
    every layer: a fault anywhere is caught with one warning line and the file is the eager one."""
    import collect.compiled as compiled_module
    from collect.stats import histogram_batch

    if fault.startswith("kernel"):
        if not fused.available():
            pytest.skip("collect._fused was not built")
    else:
        request.getfixturevalue("torch_path")
    model = model_factory("llama")
    eager = collect(small_config(model, corpus_files, tmp_path / "eager.h5"))
    if fault == "neurons-past-32":
        monkeypatch.setattr(compiled_module, "compiled_reduce_batch",
                            miscompiled(lambda r: r.doc_abs[:, 32:].mul_(2)))
    elif fault == "per-document-counts":
        monkeypatch.setattr(compiled_module, "compiled_reduce_batch",
                            miscompiled(lambda r: r.doc_count[:, 40:].add_(1)))
    elif fault == "histograms":
        def wrong_histogram(enabled):
            def histogram(*args):
                histogram_batch(*args)
                args[-2][40, 0, 0, 0] += 1  # one count too many in neuron 40's hist
            return histogram
        monkeypatch.setattr(compiled_module, "compiled_reduce_batch", miscompiled(lambda r: None))
        monkeypatch.setattr("collect.batch.compiled_histogram_batch", wrong_histogram)
    else:
        layer_batch = fused.layer_batch

        def wrong_kernel(*args, **kwargs):
            out = layer_batch(*args, **kwargs)
            if fault == "kernel-histograms" and kwargs.get("density") is not None:
                kwargs["density"][45, 3, 2, 2] += 1
            if fault == "kernel-candidates" and out[1] is not None:  # a sample list's best candidate lost
                out[1].sample_key[45:, :, 0] = out[1].sample_key[45:, :, 1]
            return out
        monkeypatch.setattr(fused, "layer_batch", wrong_kernel)
    out = collect(small_config(model, corpus_files, tmp_path / "checked.h5", compile=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    expected = {"neurons-past-32": "doc_abs", "per-document-counts": "doc_count", "histograms": "hist",
                "kernel-histograms": "density", "kernel-candidates": "sample candidates"}[fault]
    assert len(warnings) == 1 and f"differ from the eager computation ({expected} of neurons" in warnings[0], warnings
    # The eager torch code adds the rest of the run's sums in another order than the kernel did.
    same_statistics(eager, out, sums_to_rounding=fault.startswith("kernel"))


def test_a_kernel_that_adds_other_counts_when_asked_again_stops_the_run(model_factory, corpus_files, tmp_path,
                                                                       monkeypatch):
    """The kernel adds a checked batch to the statistics' own tables; a batch that fails the check is
    taken back out by the same call into zeroed tables. Were that call to add other counts (a kernel
    that is not deterministic), the tables could not be restored: the run stops with one error line
    instead of writing histograms that no one can trust."""
    from mkdocs_gluscope.errors import GluscopeError

    if not fused.available():
        pytest.skip("collect._fused was not built")
    layer_batch = fused.layer_batch
    calls = []

    def flaky_kernel(*args, **kwargs):
        out = layer_batch(*args, **kwargs)
        if kwargs.get("density") is not None:
            calls.append(1)
            if len(calls) == 1:  # the first call only: the check catches it, the take-back misses it
                kwargs["density"][45, 3, 2, 2] += 1
        return out
    monkeypatch.setattr(fused, "layer_batch", flaky_kernel)
    with pytest.raises(GluscopeError, match="added other histogram counts to the same layer-batch a second time"):
        collect(small_config(model_factory("llama"), corpus_files, tmp_path / "flaky.h5", compile=True))


def test_nan_post_at_a_zero_gate_is_flagged_by_the_fast_path():
    """Issue 15: a NaN in post or act(gate) where gate or in is exactly zero (no case) was counted by
    the exact path but not flagged by the fast one."""
    from collect.stats import compiled_reduce_batch

    g = torch.Generator().manual_seed(0)
    gate, in_ = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 6, generator=g)
    gate[1, 4, 3] = 0.0
    swish = torch.nn.functional.silu(gate)
    valid = torch.ones(2, 9, dtype=torch.bool)
    for poisoned in ("post", "swish"):
        post, act = swish * in_, swish.clone()
        (post if poisoned == "post" else act)[1, 4, 3] = float("nan")
        exact = reduce_batch(gate, in_, post, act, valid)
        assert exact.nonfinite[3].tolist() == [0, 0, 0, 0, 1]
        assert bool(reduce_batch(gate, in_, post, act, valid, assume_finite=True).suspect), poisoned
        assert bool(compiled_reduce_batch(True, exact_on_suspect=False)(gate, in_, post, act, valid).suspect)
        if fused.available():
            kernel, _ = fused.layer_batch(gate, in_, post, act, valid)
            assert torch.equal(kernel.nonfinite, exact.nonfinite)


def test_the_compile_cache_is_the_projects_own_per_torch_and_instruction_set(tmp_path, monkeypatch):
    """Issue 15: kernels compiled by another torch, or for another CPU's instruction set (an AVX-512
    cache read on an AVX2 CPU gave wrong counts), are never read: the cache folder is keyed by both,
    under the gluscope cache; a folder the user chose is kept."""
    import os

    from collect.compiled import use_own_compile_cache

    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_own_compile_cache()
    chosen = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert chosen == str(tmp_path / "inductor" / f"{torch.__version__.replace('+', '_')}-{capability}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_own_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


#: A collection of 8 batches (2 layers of 1,024 neurons, 2,048 tokens a batch: 8 MB of hooks a
#: layer), printing the fresh pages each batch faulted in; argv[1] "keep": with keep_freed_memory.
_COLLECTION_PAGES = """
import resource, sys, tempfile
from pathlib import Path
import numpy as np, torch, transformers
import tiny
import collect.run as run_module
from collect.allocator import keep_freed_memory
from collect.corpus import Corpus
from collect.model import prepare_model
from collect.run import CollectConfig, collect_statistics
torch.set_num_threads(1)
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("keep_freed_memory refused")
work = Path(tempfile.mkdtemp())
tokenizer = tiny.train_tokenizer(work, bos=True)
config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=1024,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=512, bos_token_id=0)
torch.manual_seed(0)
loaded, _ = prepare_model(transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer)
tokens = np.random.default_rng(0).integers(3, tokenizer.vocab_size, size=(64, 256)).astype(np.int32)
tokens[:, 0] = 0
corpus = Corpus(tokens=tokens.reshape(-1), doc_offsets=np.arange(65) * 256, source_index=np.arange(64), titles=None,
                has_bos=True)
cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=work / "x.h5", dtype="float32", batch_tokens=2048,
                    progress=False, samples=8, compile=False)
pages = []
run_batch = run_module._run_batch
def counted(*args, **kwargs):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    run_batch(*args, **kwargs)
    pages.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
run_module._run_batch = counted
collect_statistics(loaded, corpus, cfg, [0, 1])
print(" ".join(map(str, pages)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not is_glibc(), reason="glibc's malloc only")
def test_collection_reuses_the_memory_it_frees(tmp_path):
    """Issue 16: with glibc's defaults a layer's hooks, freed together, go back to the system and the
    next layer faults their pages in again (2.7 us a page on a 2-core EPYC: as long as the statistics
    take); with the setting collect() applies, the batches after the first fault in none."""
    tests = Path(__file__).resolve().parent

    def fresh_pages(mode: str) -> list[int]:
        result = subprocess.run([sys.executable, "-c", _COLLECTION_PAGES, mode], capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"})
        assert result.returncode == 0, result.stderr[-2000:]
        return [int(x) for x in result.stdout.split()]

    assert sum(fresh_pages("default")[1:]) > 2_000  # the churn this guards against (about 60,000 pages)
    assert sum(fresh_pages("keep")[1:]) < 500


def test_collect_applies_the_allocator_setting(model_factory, corpus_files, tmp_path, monkeypatch):
    """collect() sets glibc's malloc to reuse freed memory before its first forward pass (the
    benches call collect_statistics, and apply it themselves)."""
    applied = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: applied.append(True) or True)
    collect(small_config(model_factory("llama"), corpus_files, tmp_path / "out.h5"))
    assert applied == [True]
