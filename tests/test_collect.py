"""Collection on tiny random models: hooks, refactor_glu, the file, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import tiny
from collect.model import find_gated_mlps, load_hf, load_model, refactor_glu, run_with_mlp_hooks
from collect.run import CollectConfig, Interrupted, collect
from mkdocs_gluscope.cli import main
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile, first_counted_position

REPO = Path(__file__).resolve().parent.parent


def small_config(model: Path, corpus: list[Path], out: Path, **overrides) -> CollectConfig:
    options = dict(model=str(model), dataset=[str(p) for p in corpus], out=out, k=4, context_before=3,
                   context_after=1, compile=False, progress=False, device="cpu", batch_tokens=128,
                   dtype="float32")
    options.update(overrides)
    return CollectConfig(**options)


def copy_model_with(folder: Path, target: Path, **config_changes) -> Path:
    """A copy of a saved tiny model with some of its config.json entries changed."""
    import shutil

    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def reference_stack(model, arch: str):
    """The decoder layers, written out per family here, independent of collect's adapter lookup."""
    return model.model.language_model.layers if arch in ("gemma3mm", "llava") else model.model.layers


def hf_reference_hooks(model, arch: str, layers: list[int]) -> tuple[dict, list]:
    """Hugging Face forward hooks on each listed layer's MLP modules: gate, in and post as the
    model's own forward computes them (Phi-3 chunks its fused gate_up_proj output in two)."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    stack = reference_stack(model, arch)
    for layer in layers:
        mlp = stack[layer].mlp
        if arch == "phi3":
            def fused(m, i, o, layer=layer):
                seen[layer, "gate"], seen[layer, "in"] = o.chunk(2, dim=-1)
            handles.append(mlp.gate_up_proj.register_forward_hook(fused))
        else:
            handles.append(mlp.gate_proj.register_forward_hook(
                lambda m, i, o, layer=layer: seen.__setitem__((layer, "gate"), o)))
            handles.append(mlp.up_proj.register_forward_hook(
                lambda m, i, o, layer=layer: seen.__setitem__((layer, "in"), o)))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda m, i, layer=layer: seen.__setitem__((layer, "post"), i[0])))
    return seen, handles


DENSE = {"llama": 2, "olmo": 2, "gemma": 2, "qwen2": 2, "phi3": 2, "gemma3mm": 2, "llava": 2, "deepseek2": 1}


@pytest.mark.parametrize("engine", ["hf", "bridge"])
@pytest.mark.parametrize("arch", list(DENSE))
def test_hooks_match_hugging_face_forward_hooks(arch, engine, model_factory):
    layers = 3 if arch == "deepseek2" else 2
    folder = model_factory(arch, layers)
    recorded = list(range(DENSE[arch]))  # DeepSeek-V2: its dense first layer (first_k_dense_replace)
    reference, tokenizer = load_hf(str(folder), torch.float32)
    reference.set_attn_implementation("eager")  # the bridge runs eager attention
    seen, handles = hf_reference_hooks(reference, arch, recorded)
    ids = torch.tensor([tokenizer("Once again the council met.")["input_ids"]])
    with torch.inference_mode():
        reference(ids)
    loaded, _ = load_model(str(folder), dtype="float32", device="cpu", refactor=False, engine=engine,
                           layers=recorded)
    if engine == "hf":
        loaded.hf_model.set_attn_implementation("eager")  # compare like with like
    got = {}

    def on_layer(layer, gate, in_, post):
        got[layer, "gate"], got[layer, "in"], got[layer, "post"] = gate.clone(), in_.clone(), post.clone()

    run_with_mlp_hooks(loaded, ids, recorded, on_layer)
    assert set(got) == set(seen) and len(seen) == 3 * len(recorded)
    for key in seen:
        torch.testing.assert_close(got[key], seen[key], rtol=1e-5, atol=1e-6, msg=str(key))
    # Gemma's gate goes through GELU, the others through SiLU.
    assert loaded.act_fn_name.startswith("gelu" if arch.startswith("gemma") else "silu")


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
def test_act_of_gate_is_the_models_own_and_not_computed_again(arch, model_factory):
    """The collection's act(gate) equals the model's own act_fn output bit for bit: that output itself
    where the model ran the activation on the recorded gate (Llama, Gemma: the activation runs once
    per layer, not a second time for the statistics), act_fn of the recorded split where the gate is
    a split of a fused projection (Phi-3: the same layout as the model's own split, so the same
    values even where a CPU's vectorized activation rounds a contiguous copy differently, as
    AVX-512 machines do)."""
    folder = model_factory(arch, 2)
    loaded, _ = load_model(str(folder), dtype="float32", device="cpu", refactor=False, engine="hf")
    calls, own = [], {}
    for layer, mlp in loaded.mlps.items():
        def record(m, i, o, layer=layer):
            calls.append(layer)
            own.setdefault(layer, o.detach().clone())
        mlp.act_fn.register_forward_hook(record)
    got = {}

    def on_layer(layer, gate, in_, post, act):
        got[layer] = (gate.clone(), act.clone())

    tokenizer = loaded.tokenizer
    run_with_mlp_hooks(loaded, torch.tensor([tokenizer("Once again the council met.")["input_ids"]]),
                       [0, 1], on_layer, with_act=True)
    assert sorted(got) == [0, 1]
    for layer, (gate, act) in got.items():
        assert torch.equal(act.view(torch.int32), own[layer].view(torch.int32)), layer
        torch.testing.assert_close(act, loaded.mlps[layer].act_fn(gate), rtol=1e-6, atol=1e-7)
    assert calls[:2] == ([0, 1] if arch != "phi3" else [0, 0])


def test_refactor_glu_keeps_logits_and_flips_exactly_negative_neurons(model_factory):
    model, tokenizer = load_hf(str(model_factory("llama")), torch.float32)
    ids = torch.tensor([tokenizer("Meanwhile the market rose again.")["input_ids"]])
    mlps = find_gated_mlps(model)
    layers = model.model.layers
    expected = torch.stack([(m.mlp.gate_proj.weight * m.mlp.up_proj.weight).sum(1) < 0 for m in layers])
    assert expected.any() and not expected.all()
    with torch.inference_mode():
        before = model(ids).logits
        flipped = refactor_glu(mlps)
        after = model(ids).logits
    assert torch.equal(flipped, expected)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert all(((m.mlp.gate_proj.weight * m.mlp.up_proj.weight).sum(1) >= 0).all() for m in layers)


def test_file_matches_contract(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "run.h5"))
    with h5py.File(out) as f:
        assert f.attrs["format"] == "gluscope-activations" and f.attrs["format_version"] == 1
        assert list(f.attrs["cases"]) == list(CASES) and list(f.attrs["hooks"]) == list(HOOKS)
        L, N, k, W = 2, 48, 4, 5
        shapes = {
            "stats/count": ((L, N, 4), np.int64), "stats/sum": ((L, N, 4, 4), np.float64),
            "stats/min": ((L, N, 4, 4), np.float32), "stats/max": ((L, N, 4, 4), np.float32),
            "top/value": ((L, N, 4, 4, k), np.float32), "top/doc": ((L, N, 4, 4, k), np.int32),
            "top/pos": ((L, N, 4, 4, k), np.int32), "top/gate": ((L, N, 4, 4, k, W), np.float16),
            "top/in": ((L, N, 4, 4, k, W), np.float16), "weights/flipped": ((L, N), np.bool_),
            "weights/cos_gate_in": ((L, N), np.float32), "corpus/doc_offsets": ((9,), np.int64),
        }
        for path, (shape, dtype) in shapes.items():
            assert f[path].shape == shape and f[path].dtype == dtype, path
        offsets = f["corpus/doc_offsets"][...]
        n_docs = len(offsets) - 1
        # BOS excluded: every document contributes its length minus one.
        assert f.attrs["n_tokens"] == offsets[-1] - n_docs
        assert f["stats/count"][...].sum(axis=-1).max() <= f.attrs["n_tokens"]
        assert (f["corpus/tokens"][...][offsets[:-1]] == 0).all()  # BOS first
        assert f.attrs["model"] and f.attrs["dataset"] and f.attrs["act_fn"] == "silu"
        # refactor_glu: every recorded neuron has a non-negative gate/in cosine.
        assert (f["weights/cos_gate_in"][...] >= 0).all()
        docs, pos = f["top/doc"][...], f["top/pos"][...]
        assert ((docs >= -1) & (docs < n_docs)).all()
        assert (pos[docs >= 0] >= 1).all()  # never the BOS position
    with ActivationsFile(out) as f:
        n = f.neuron(1, 5)
        c = f.case_index("gate+_in-")
        # The window's centre is the example's own value.
        centre = f.context_before
        filled = n.top_doc[c, 1] >= 0
        np.testing.assert_allclose(n.top_in[c, 1, filled, centre], n.top_value[c, 1, filled], rtol=1e-3)
        assert (n.top_in[c, 1, filled, centre] < 0).all()  # in- case
        assert json.dumps(f.attrs, default=str)


def test_include_bos_counts_the_first_position(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "bos.h5", include_bos=True))
    with h5py.File(out) as f:
        assert f.attrs["n_tokens"] == f["corpus/doc_offsets"][-1]
        assert (f["top/pos"][...] == 0).any()


def test_model_without_bos_counts_every_position(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("qwen2"), corpus_files, tmp_path / "qwen.h5"))
    with h5py.File(out) as f:
        assert not f.attrs["has_bos"]
        assert f.attrs["n_tokens"] == f["corpus/doc_offsets"][-1]


def test_bos_always_prepends_one_where_the_tokenizer_does_not(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("qwen2"), corpus_files, tmp_path / "qwen-bos.h5", bos="always"))
    with h5py.File(out) as f:
        offsets = f["corpus/doc_offsets"][...]
        eos = 1  # the test tokenizer's </s>
        assert f.attrs["has_bos"] and (f["corpus/tokens"][...][offsets[:-1]] == eos).all()
        assert f.attrs["n_tokens"] == offsets[-1] - (len(offsets) - 1)


def test_resume_gives_the_same_file_as_an_uninterrupted_run(model_factory, corpus_files, tmp_path):
    model = model_factory("llama")
    whole = collect(small_config(model, corpus_files, tmp_path / "whole.h5", batch_tokens=64))
    config = small_config(model, corpus_files, tmp_path / "resumed.h5", batch_tokens=64)
    with pytest.raises(Interrupted, match="--resume"):
        collect(config, stop_after_batches=2)
    assert config.checkpoint_path.exists() and not config.out.exists()
    config.resume = True
    resumed = collect(config)
    assert not config.checkpoint_path.exists()
    with h5py.File(whole) as a, h5py.File(resumed) as b:
        names = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        for name in names:
            x, y = a[name][...], b[name][...]
            if x.dtype.kind == "f":
                assert np.array_equal(x, y, equal_nan=True), name
            else:
                assert np.array_equal(x, y), name


def test_long_documents_split_into_further_documents(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "split.h5",
                               max_doc_tokens=8, long_docs="split"))
    with h5py.File(out) as f:
        lengths = np.diff(f["corpus/doc_offsets"][...])
        assert lengths.max() == 8 and len(lengths) > 8
        assert (f["corpus/tokens"][...][f["corpus/doc_offsets"][:-1]] == 0).all()  # each has a BOS
        assert len(set(f["corpus/source_index"][...])) == 8


def test_max_tokens_stops_the_corpus(model_factory, corpus_files, tmp_path):
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "few.h5", max_tokens=50))
    with h5py.File(out) as f:
        assert f["corpus/doc_offsets"][-1] == 50


def run_cli(*args: str, capsys) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors and --help
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_cli_collect_then_info(model_factory, corpus_files, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    code, text = run_cli("collect", "--model", str(model_factory("llama")), "--dataset",
                         *map(str, corpus_files), "--out", str(out), "--max-tokens", "1k", "--k", "3",
                         "--no-compile", "--no-progress", "--device", "cpu", capsys=capsys)
    assert code == 0, text
    code, text = run_cli("info", str(out), capsys=capsys)
    assert code == 0 and "tokens" in text and "gate-_in-" in text
    assert "8 random examples per case, 2 per case and band" in text and "top and bottom 10 tokens" in text
    bare = tmp_path / "bare.h5"
    code, text = run_cli("collect", "--model", str(model_factory("llama")), "--dataset",
                         *map(str, corpus_files), "--out", str(bare), "--max-tokens", "1k", "--k", "3", "--samples", "0",
                         "--no-compile", "--no-progress", "--device", "cpu", capsys=capsys)
    assert code == 0, text
    code, text = run_cli("info", str(bare), capsys=capsys)
    assert "distributions: none" in text
    with ActivationsFile(bare) as f:
        assert not f.has_distributions and f.neuron(0, 0).samples is None and "samples" not in f.file


@pytest.mark.parametrize(
    "problem, args, message",
    [
        ("unknown model", ["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
        ("empty corpus", ["--dataset", "EMPTY"], "the corpus has no documents"),
        ("missing column", ["--text-column", "body"], "no column 'body'"),
        ("zero tokens", ["--max-tokens", "0"], "--max-tokens 0"),
        ("unwritable output", ["--out", "/proc/gluscope/x.h5"], "cannot write --out"),
        ("bad layer", ["--layers", "7"], "--layers [7]: this model has layers 0..1"),
        ("missing dataset file", ["--dataset", "/nonexistent/file.jsonl"], "no such file"),
        ("not a gated model", ["--model", "GPT2"], "has no gated MLP"),
        ("malformed JSONL line", ["--dataset", "BADJSON"], "line 2 is not valid JSON"),
        ("JSONL line not an object", ["--dataset", "LISTJSON"], "line 1 is a JSON list, not an object"),
        ("reversed layer range", ["--layers", "5-3"], "the range 5-3 runs backwards"),
        ("empty layer list", ["--layers", ""], "'' names no layer"),
        ("documents longer than the model's positions", ["--dataset", "LONG", "--max-doc-tokens", "400"],
         "but the model has 256 positions (max_position_embeddings); use --max-doc-tokens 256 or less"),
        ("unsupported activation", ["--model", "MISH"], "activation 'mish' is not supported; gluscope knows silu"),
        ("include-bos with skip-positions", ["--include-bos", "FLAG", "--skip-positions", "2"],
         "--include-bos counts the BOS position, --skip-positions 2"),
    ],
)
def test_bad_input_gives_one_clear_error(problem, args, message, model_factory, corpus_files, tmp_path, capsys):
    options = {"--model": str(model_factory("llama")), "--dataset": str(corpus_files[0]),
               "--out": str(tmp_path / "x.h5")}
    given = dict(zip(args[::2], args[1::2]))
    if given.get("--dataset") == "EMPTY":
        empty = tmp_path / "empty.jsonl"
        empty.write_text('{"text": ""}\n{"text": "   "}\n')
        given["--dataset"] = str(empty)
    if given.get("--dataset") in ("BADJSON", "LISTJSON"):
        bad = tmp_path / "bad.jsonl"
        second = '{"text": "cut off' if given["--dataset"] == "BADJSON" else '{"text": "fine"}'
        first = '["a", "list"]' if given["--dataset"] == "LISTJSON" else '{"text": "fine"}'
        bad.write_text(f"{first}\n{second}\n")
        given["--dataset"] = str(bad)
    if given.get("--dataset") == "LONG":
        long = tmp_path / "long.jsonl"
        long.write_text(json.dumps({"text": " ".join(tiny.CORPUS) * 20}) + "\n")
        given["--dataset"] = str(long)
    if given.get("--model") == "MISH":
        given["--model"] = str(copy_model_with(model_factory("llama"), tmp_path / "mish", hidden_act="mish"))
    if given.get("--model") == "GPT2":
        import transformers

        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=400))
        gpt2.save_pretrained(tmp_path / "gpt2")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "gpt2" / name).write_bytes((model_factory("llama") / name).read_bytes())
        given["--model"] = str(tmp_path / "gpt2")
    options.update(given)
    argv = ["collect", *[x for kv in options.items() for x in kv if x != "FLAG"], "--no-compile", "--no-progress",
            "--device", "cpu"]
    code, text = run_cli(*argv, capsys=capsys)
    assert code == 2, text
    assert "gluscope: error: " in text and message in text, text
    assert "Traceback" not in text
    assert not (tmp_path / "x.h5").exists()


def test_saved_dataset_and_parquet_inputs(model_factory, tmp_path):
    import datasets

    rows = {"body": tiny.CORPUS}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    model = model_factory("llama")
    counts = []
    for source in (tmp_path / "saved", tmp_path / "rows.parquet"):
        out = collect(small_config(model, [source], tmp_path / f"{source.stem}.h5", text_column="body"))
        with h5py.File(out) as f:
            counts.append(len(f["corpus/doc_offsets"]) - 1)
            assert sorted(f["corpus/source_index"][...]) == list(range(len(tiny.CORPUS)))
    assert counts == [len(tiny.CORPUS)] * 2


def test_first_ctrl_c_asks_for_a_checkpoint_and_the_second_aborts():
    import signal

    from collect.interrupt import StopOnSignal

    with StopOnSignal() as ctrl_c:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert ctrl_c.requested  # the loop finishes its batch, checkpoints and stops
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is not handler  # the previous handler is back


# -- issue 7 ("Trust") ---------------------------------------------------------------------------

def test_dtype_auto_follows_what_torch_reports_about_the_device(monkeypatch):
    from collect import model as model_module
    from collect.model import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    # AVX2 kernels emulate bfloat16 (4x slower than float32), whatever the CPU itself could do.
    monkeypatch.setattr(model_module.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(model_module.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16  # an explicit choice is kept


def test_dtype_auto_is_float32_where_torch_is_limited_to_avx2():
    """For real: ATEN_CPU_CAPABILITY=avx2 is what torch runs with on a CPU without AVX-512."""
    import os
    import subprocess
    import sys

    code = "from collect.model import resolve_dtype; print(resolve_dtype('auto'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "torch.float32", result.stderr


def test_dtype_auto_is_the_default_and_the_file_records_what_ran(model_factory, corpus_files, tmp_path):
    from collect.model import dtype_name, resolve_dtype
    from mkdocs_gluscope.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).dtype == "auto"
    assert parser.parse_args(["collect", "--model", "m", "--dataset", "d", "--out", "o"]).dtype == "auto"
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "auto.h5", dtype="auto"))
    with h5py.File(out) as f:
        assert f.attrs["dtype_requested"] == "auto"
        assert f.attrs["dtype"] == dtype_name(resolve_dtype("auto")) and f.attrs["dtype"] in ("float32", "bfloat16")


def same_statistics(a_path: Path, b_path: Path, sums_to_rounding: bool = False) -> None:
    """Every dataset equal; with ``sums_to_rounding``, ``stats/sum`` to float rounding (added in another order)."""
    with h5py.File(a_path) as a, h5py.File(b_path) as b:
        assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
        names: list[str] = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        assert "samples/doc" in names and "stats/hist" in names and "vocab/token" in names  # every dataset
        for name in names:
            if sums_to_rounding and name == "stats/sum":
                np.testing.assert_allclose(a[name][...], b[name][...], rtol=1e-6, atol=1e-6, err_msg=name)
                continue
            assert np.array_equal(a[name][...], b[name][...], equal_nan=a[name].dtype.kind == "f"), name


def test_failing_torch_compile_falls_back_to_eager_with_a_warning(model_factory, corpus_files, tmp_path,
                                                                  monkeypatch, capsys, torch_path):
    import collect.compiled as compiled_module

    eager = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "eager.h5"))

    def broken_compile(enabled, **kwargs):
        def compiled(*args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong details")
        return compiled

    monkeypatch.setattr(compiled_module, "compiled_reduce_batch", broken_compile)
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "fallback.h5", compile=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("gluscope: warning: torch.compile failed")
    same_statistics(eager, out)


def test_miscompiled_statistics_are_caught_and_recomputed_eagerly(model_factory, corpus_files, tmp_path,
                                                                  monkeypatch, capsys, torch_path):
    """Found: a compile cache from an AVX-512 run gave wrong counts on an AVX2-only CPU, silently."""
    import collect.compiled as compiled_module

    eager = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "eager.h5"))

    def miscompiled(enabled, **kwargs):
        def compiled(*args):
            reduced = compiled_module.reduce_batch(*args)
            reduced.count[::2] += 1  # what a kernel built for another instruction set did
            return reduced
        return compiled

    monkeypatch.setattr(compiled_module, "compiled_reduce_batch", miscompiled)
    out = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "checked.h5", compile=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "differ from the eager computation (count of neurons" in warnings[0]
    same_statistics(eager, out)


def test_out_of_memory_names_batch_tokens(model_factory, corpus_files, tmp_path, monkeypatch, capsys):
    import collect.run as run_module

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(run_module, "run_with_mlp_hooks", no_memory)
    code, text = run_cli("collect", "--model", str(model_factory("llama")), "--dataset", str(corpus_files[0]),
                         "--out", str(tmp_path / "oom.h5"), "--batch-tokens", "4096", "--no-compile",
                         "--no-progress", "--device", "cpu", capsys=capsys)
    assert code == 2 and "Traceback" not in text
    assert text.count("gluscope: error: ") == 1
    assert "out of memory at --batch-tokens 4096" in text and "--batch-tokens 2048" in text


def test_resume_refuses_a_changed_corpus(model_factory, tmp_path):
    corpus = tiny.write_corpus_files(tmp_path / "corpus")
    config = small_config(model_factory("llama"), corpus, tmp_path / "run.h5", batch_tokens=64)
    with pytest.raises(Interrupted):
        collect(config, stop_after_batches=2)
    texts = list(tiny.CORPUS)
    texts[3] = texts[3].replace("1999", "2001")  # one edited document, same options
    tiny.write_corpus_files(tmp_path / "corpus", texts)
    config.resume = True
    with pytest.raises(GluscopeError, match="the corpus"):
        collect(config)
    tiny.write_corpus_files(tmp_path / "corpus")  # the original files: the checkpoint fits again
    out = collect(config)
    import hashlib

    with h5py.File(out) as f:
        digest = hashlib.sha256(f["corpus/tokens"][...].astype("<i4").tobytes()
                                + f["corpus/doc_offsets"][...].astype("<i8").tobytes()).hexdigest()
        assert f.attrs["corpus_sha256"] == digest


def test_sigterm_checkpoints_and_resume_completes_the_same_file(model_factory, tmp_path):
    """A cluster preempting the job: SIGTERM mid-run leaves a checkpoint and exit status 143, and
    --resume finishes the file an uninterrupted run writes."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    corpus = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    words = " ".join(tiny.CORPUS).split()
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n" for _ in range(1500)))
    model = model_factory("llama")
    args = ["--model", str(model), "--dataset", str(corpus), "--k", "4", "--batch-tokens", "64",
            "--no-compile", "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "preempted.h5"
    command = [sys.executable, "-m", "mkdocs_gluscope.cli", "collect", *args, "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    stderr = bytearray()
    progressed = threading.Event()

    def read() -> None:
        while chunk := proc.stderr.read1(4096):
            stderr.extend(chunk)
            # tqdm's bar shows tokens done: wait for a first batch (a count above zero).
            if re.search(rb"collect:\s+\d+%\|[^|]*\|\s*(?!0\.00/)[\d.]+k?/", bytes(stderr)):
                progressed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert progressed.wait(120), bytes(stderr).decode(errors="replace")[-2000:]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    reader.join(10)
    text = bytes(stderr).decode(errors="replace")
    assert code == 143, text[-2000:]
    assert "SIGTERM" in text and "rerun the same command with --resume" in text and "Traceback" not in text
    checkpoint = out.with_name(out.name + ".ckpt")
    assert checkpoint.exists() and not out.exists()
    done = torch.load(checkpoint, weights_only=True)["batches_done"]
    assert 1 <= done
    resumed = subprocess.run(command + ["--resume", "--no-progress"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after {done}/" in resumed.stderr and not checkpoint.exists()
    whole = subprocess.run([*command[:-1], str(tmp_path / "whole.h5"), "--no-progress"], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    same_statistics(tmp_path / "whole.h5", out)


def test_every_activation_matches_transformers():
    from transformers.activations import ACT2FN

    from mkdocs_gluscope.activations import ACTIVATIONS

    x = torch.cat([torch.linspace(-30, 30, 2001, dtype=torch.float64),
                   torch.tensor([-1e-8, 0.0, 1e-8, -88.0, 88.0], dtype=torch.float64)])
    for name, ours in ACTIVATIONS.items():
        theirs = ACT2FN[name](x).numpy()
        np.testing.assert_allclose(ours(x.numpy()), theirs, rtol=1e-12, atol=1e-12, err_msg=name)


def test_unsupported_activation_is_refused_before_any_batch(model_factory, corpus_files, tmp_path, monkeypatch):
    import collect.run as run_module

    mish = copy_model_with(model_factory("llama"), tmp_path / "mish", hidden_act="mish")
    monkeypatch.setattr(run_module, "run_with_mlp_hooks", lambda *a, **k: pytest.fail("a batch ran"))
    with pytest.raises(GluscopeError, match="activation 'mish' is not supported; gluscope knows silu"):
        collect(small_config(mish, corpus_files, tmp_path / "mish.h5"))
    assert not (tmp_path / "mish.h5").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # with a BOS, and without one
def test_skip_positions_leaves_the_first_positions_out_of_every_statistic(arch, model_factory, corpus_files,
                                                                          tmp_path):
    out = collect(small_config(model_factory(arch), corpus_files, tmp_path / "skip.h5", skip_positions=3))
    with ActivationsFile(out) as f:
        first = first_counted_position(f.attrs)
        assert f.attrs["skip_positions"] == 3 and first == (4 if arch == "llama" else 3)
        lengths = np.diff(f.doc_offsets)
        counted = int(np.maximum(lengths - first, 0).sum())  # brute force: positions first.. of each doc
        assert f.n_tokens == counted
    with h5py.File(out) as f:
        count = f["stats/count"][...]
        # No exact zeros in these random activations: every counted position is in one case.
        assert (count.sum(axis=-1) == counted).all()
        docs, pos = f["top/doc"][...], f["top/pos"][...]
        assert (docs >= 0).any() and (pos[docs >= 0] >= first).all()


def test_inputs_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import collect.run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    good = tmp_path / "ok.jsonl"
    good.write_text('{"text": "hello"}\n')
    cases = [
        (["--dataset", "/nonexistent/corpus.jsonl"], "--dataset: no such file or folder: /nonexistent/corpus.jsonl"),
        (["--dataset", str(tmp_path / "notes.csv")], "has an unsupported type; expected .txt, .jsonl, .parquet"),
        (["--dataset", str(good), "--shard", "3/2"], "--shard '3/2'"),
        (["--dataset", str(good), "--bos", "sometimes"], "--bos"),
        (["--dataset", str(good), "--dtype", "float64"], "--dtype 'float64'; expected one of auto, float32"),
        (["--dataset", str(good), "--skip-positions", "-1"], "--skip-positions -1"),
        (["--dataset", str(good), "--out", str(tmp_path)], "is a folder"),
    ]
    for args, message in cases:
        options = {"--model": "/no/such/model", "--out": str(tmp_path / "x.h5")}
        options.update(dict(zip(args[::2], args[1::2])))
        code, text = run_cli("collect", *[x for kv in options.items() for x in kv], "--device", "cpu",
                             capsys=capsys)
        assert code == 2 and text.startswith("gluscope: error: ") and message in text, (args, text)
        assert text.count("\n") == 1 and "Traceback" not in text


def test_top_level_help_lists_every_command_in_plain_text(capsys):
    from mkdocs_gluscope.cli import COMMANDS

    code, text = run_cli("--help", capsys=capsys)
    assert code == 0
    assert "``" not in text and "`" not in text
    summary = text.split("positional arguments")[0]  # the description, before argparse's own list
    for name in COMMANDS:
        assert name in summary, name


def test_gpu_path_without_host_syncs_gives_the_same_file(model_factory, corpus_files, tmp_path, monkeypatch,
                                                         torch_path):
    """The GPU's path on a CPU: lists found by nonzero_static with a capacity learnt from earlier
    batches (here too small on purpose, so some layer-batches overflow and are redone exactly, from
    the hooks kept for them: one forward pass per batch)."""
    import collect.batch as batch_module
    import collect.run as run_module
    from collect.memory import ListCapacity

    forwards, redone = [], []
    run_with_hooks, redo = run_module.run_with_mlp_hooks, batch_module.LayerPaths.redo

    def counting(loaded, input_ids, layers, on_layer, on_moe=None, **options):
        forwards.append(input_ids.shape)
        return run_with_hooks(loaded, input_ids, layers, on_layer, on_moe, **options)

    def counting_redo(self, *args, **kwargs):
        redone.append(args)
        return redo(self, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_with_mlp_hooks", counting)
    plain = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "plain.h5", batch_tokens=64))
    batches, forwards[:] = len(forwards), []
    monkeypatch.setattr(batch_module.LayerPaths, "redo", counting_redo)
    monkeypatch.setattr(ListCapacity, "ON_CPU", True)
    monkeypatch.setattr(ListCapacity, "MARGIN", 0.5)
    monkeypatch.setattr(ListCapacity, "FLOOR", 1)
    static = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "static.h5", batch_tokens=64))
    assert 0 < len(redone) < 2 * batches and len(forwards) == batches
    same_statistics(plain, static)


def test_statistics_too_large_for_the_gpu_name_layer_groups_that_fit(model_factory, corpus_files, tmp_path,
                                                                     monkeypatch):
    """A small card: the run is refused before any batch, with the --layers groups that fit."""
    import collect.memory as memory
    from collect.memory import layer_groups, state_bytes

    assert layer_groups(list(range(32)), 10, 160) == [list(range(16)), list(range(16, 32))]
    assert layer_groups(list(range(30)), 10, 115) == [list(range(i, i + 10)) for i in (0, 10, 20)]
    # The figures of site_src/gpu.md: a 7B shape in bfloat16, k 16, 19-token float16 windows.
    seven_b = state_bytes(11008, 32, small_config(Path("m"), [], Path("o"), k=16, context_before=16,
                                                  context_after=2, samples=0), torch.bfloat16)
    assert 7.6 < seven_b / 2**30 < 7.7
    with_distributions = state_bytes(11008, 32, small_config(Path("m"), [], Path("o"), k=16, context_before=16,
                                                             context_after=2, samples=8), torch.bfloat16)
    assert 11.4 < with_distributions / 2**30 < 11.5
    # On a GPU the top-k windows live in host memory: the device keeps the rest (issue 16: <= 30 KB a neuron).
    defaults = small_config(Path("m"), [], Path("o"), k=16, context_before=16, context_after=2, samples=8)
    assert state_bytes(1, 1, defaults, torch.bfloat16, "device") <= 30_000
    device, host = (state_bytes(11008, 32, defaults, torch.bfloat16, part) for part in ("device", "host"))
    assert device + host == with_distributions and 5.0 < device / 2**30 < 5.1 and 6.3 < host / 2**30 < 6.4

    per_layer = state_bytes(48, 1, small_config(Path("m"), [], Path("o")), torch.float32, "device")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (
        int((per_layer + 64 * 48 * 4 * 12) / 0.9) + 10, 2**34))
    loaded = type("Loaded", (), {"device": torch.device("cuda:0"), "d_mlp": 48, "dtype": torch.float32, "moe": {}})()
    config = small_config(Path("m"), [], Path("o"), batch_tokens=64)
    with pytest.raises(GluscopeError, match=r"in 2 groups \(--layers 0 then --layers 1, .*gluscope merge"):
        memory.check_state_fits(loaded, [0, 1], config)
    memory.check_state_fits(loaded, [1], config)  # one layer fits
    # Room for less than one layer: one line naming the option that makes room, not a traceback.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (
        int((per_layer / 2 + 64 * 48 * 4 * 12) / 0.9) + 10, 2**34))
    with pytest.raises(GluscopeError, match=r"not even one layer's statistics fit: .* smaller --batch-tokens"):
        memory.check_state_fits(loaded, [0, 1], config)


def test_gpu_capacity_follows_changed_lists_per_document(monkeypatch):
    """Batches of shorter documents hold more documents, and change more lists: the capacity
    scales with them, so that a longest-first plan does not overflow at every new length."""
    from collect.memory import ListCapacity

    monkeypatch.setattr(ListCapacity, "ON_CPU", True)
    monkeypatch.setattr(ListCapacity, "FLOOR", 10)
    capacity = ListCapacity(torch.device("cpu"), n_lists=10_000)
    assert capacity.current(8) == 10_000  # the first batch fills every list
    capacity.observe(400, 8)
    assert capacity.current(8) == 800 and capacity.current(16) == 1600
    capacity.observe(1, 8)
    assert capacity.current(8) == 10


# -- issue 9: every gated architecture TransformerLens knows -------------------------------------

def brute_force_counts(folder: Path, arch: str, layers: list[int], f: ActivationsFile) -> dict[int, tuple]:
    """Per layer, each neuron's case counts and in-sums over the file's counted positions, from Hugging
    Face forward hooks run on one document at a time, with refactor_glu's flip applied by hand."""
    model, _ = load_hf(str(folder), torch.float32)
    stack = reference_stack(model, arch)
    first = first_counted_position(f.attrs)
    out = {}
    seen, handles = hf_reference_hooks(model, arch, layers)
    counts = {layer: 0 for layer in layers}
    sums = {layer: 0 for layer in layers}
    for doc in range(f.n_docs):
        with torch.inference_mode():
            model(torch.tensor(f.document(doc), dtype=torch.long)[None])
        for layer in layers:
            mlp = stack[layer].mlp
            if arch == "phi3":
                w_gate, w_in = mlp.gate_up_proj.weight.chunk(2, dim=0)
            else:
                w_gate, w_in = mlp.gate_proj.weight, mlp.up_proj.weight
            sign = torch.where((w_gate * w_in).sum(1) < 0, -1.0, 1.0)
            gate, in_ = seen[layer, "gate"][0, first:], seen[layer, "in"][0, first:] * sign
            cases = torch.stack([(gate > 0) & (in_ > 0), (gate > 0) & (in_ < 0), (gate < 0) & (in_ > 0),
                                 (gate < 0) & (in_ < 0)], dim=-1)  # [T, N, C]
            counts[layer] = counts[layer] + cases.sum(0).numpy()
            sums[layer] = sums[layer] + (cases * in_[..., None]).sum(0).double().numpy()
    for handle in handles:
        handle.remove()
    for layer in layers:
        out[layer] = (counts[layer], sums[layer])
    return out


@pytest.mark.parametrize("arch,layers", [("phi3", None), ("gemma3mm", None), ("llava", None), ("deepseek2", [0])])
def test_collect_new_families_against_brute_force(arch, layers, model_factory, corpus_files, tmp_path):
    """Fused gate/up (Phi-3), the language tower of a multimodal model (Gemma-3), and the dense layer
    of a model whose other layers are mixture-of-experts (DeepSeek-V2, --layers 0): the file's
    counts and sums match a recomputation from Hugging Face hooks, and its pages build."""
    from mkdocs_gluscope.pages import write_markdown_pages

    folder = model_factory(arch, 3 if arch == "deepseek2" else 2)
    out = collect(small_config(folder, corpus_files, tmp_path / f"{arch}.h5", layers=layers))
    with ActivationsFile(out) as f:
        recorded = f.layers
        assert recorded == (layers or [0, 1])
        reference = brute_force_counts(folder, arch, recorded, f)
        for row, layer in enumerate(recorded):
            count, sums = reference[layer]
            np.testing.assert_array_equal(f.stat("count")[row], count)
            np.testing.assert_allclose(f.stat("sum")[row, :, :, HOOKS.index("hook_pre_linear")], sums,
                                       rtol=1e-4, atol=1e-4)
        assert f.attrs["adapter"]
    pages = write_markdown_pages(out, [f"{recorded[-1]}.*"], tmp_path / "site")
    assert any(p.name == "N0.md" for p in pages)


def test_layers_outside_the_request_are_not_inspected(model_factory, corpus_files, tmp_path, monkeypatch):
    """A layer we could not record is no obstacle when --layers leaves it out."""
    import collect.architectures as arch_module

    real = arch_module._dense
    calls = []

    def counting(mlp, gate, up, down, where):
        calls.append(where)
        return real(mlp, gate, up, down, where)

    monkeypatch.setattr(arch_module, "_dense", counting)
    collect(small_config(model_factory("llama"), corpus_files, tmp_path / "one.h5", layers=[1]))
    assert len(calls) == 1 and "layer 1" in calls[0]


MOE = {"mixtral": 2, "olmoe": 2, "qwen2moe": 2, "deepseek2": 3}


def moe_reference(folder: Path, arch: str, f: ActivationsFile) -> dict:
    """Per (layer, expert): routed token count, case counts and in-sums, recomputed explicitly: the
    MoE block's input from a Hugging Face forward pre-hook, routing from the model's own router,
    each expert's gate and in from its slice of gate_up_proj (halves, as transformers' forward
    chunks them), refactor_glu's flip applied by hand. The recomputed experts reproduce the block's
    output, so these are the values the model used."""
    model, _ = load_hf(str(folder), torch.float32)
    first = first_counted_position(f.attrs)
    seen = {}
    handles = [layer.mlp.register_forward_hook(
        lambda m, i, o, index=index: seen.__setitem__(index, (i[0], o)))
        for index, layer in enumerate(model.model.layers)]
    out: dict = {}

    best: dict = {}  # (layer, expert) -> per document: largest |in| per (neuron, case), -1 if none

    def add(key, gate, in_, routed):
        cases = torch.stack([(gate > 0) & (in_ > 0), (gate > 0) & (in_ < 0), (gate < 0) & (in_ > 0),
                             (gate < 0) & (in_ < 0)], dim=-1) & routed[:, None, None]
        routed_n, count, sums = out.get(key, (0, 0, 0))
        out[key] = (routed_n + int(routed.sum()), count + cases.sum(0).numpy(),
                    sums + (cases * in_[..., None]).sum(0).double().numpy())
        magnitude = torch.where(cases, in_.abs()[..., None], -1.0).amax(dim=0)  # [N, C]
        best.setdefault(key, []).append(magnitude.numpy())

    for doc in range(f.n_docs):
        with torch.inference_mode():
            model(torch.tensor(f.document(doc), dtype=torch.long)[None])
            for index, layer in enumerate(model.model.layers):
                mlp = layer.mlp
                if not hasattr(mlp, "experts"):
                    continue  # a dense layer
                x, y = seen[index]
                x = x[0]
                _, weights, chosen = mlp.gate(x)
                experts = mlp.experts
                recomposed = torch.zeros_like(x)
                for e in range(experts.gate_up_proj.shape[0]):
                    w_gate, w_in = experts.gate_up_proj[e].chunk(2, dim=0)
                    gate, in_ = x @ w_gate.T, x @ w_in.T
                    hit = (chosen == e)
                    weight = (weights * hit).sum(-1, keepdim=True)
                    recomposed += weight * ((experts.act_fn(gate) * in_) @ experts.down_proj[e].T)
                    sign = torch.where((w_gate * w_in).sum(1) < 0, -1.0, 1.0)
                    routed = hit.any(-1)
                    routed[:first] = False
                    add((index, e), gate[first:], (in_ * sign)[first:], routed[first:])
                shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
                if shared is not None:
                    w_gate, w_in = shared.gate_proj.weight, shared.up_proj.weight
                    gate, in_ = x @ w_gate.T, x @ w_in.T
                    part = shared(x)
                    if hasattr(mlp, "shared_expert_gate"):
                        part = torch.sigmoid(mlp.shared_expert_gate(x)) * part
                    recomposed += part
                    sign = torch.where((w_gate * w_in).sum(1) < 0, -1.0, 1.0)
                    add((index, "s"), gate[first:], (in_ * sign)[first:], torch.ones(len(x) - first, dtype=torch.bool))
                torch.testing.assert_close(recomposed, y[0], rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()
    return {key: (*value, np.stack(best[key])) for key, value in out.items()}  # best: [docs, N, C]


@pytest.mark.parametrize("arch", list(MOE))
def test_expert_neurons_against_explicit_recomputation(arch, model_factory, corpus_files, tmp_path):
    """Every expert's neurons: tokens routed to each expert, case counts over those tokens and sums of
    in, as an explicit recomputation of the routing and the experts gives them; shared experts (Qwen2-MoE,
    DeepSeek-V2) over every token; DeepSeek-V2's dense first layer next to its MoE layers."""
    folder = model_factory(arch, MOE[arch])
    out = collect(small_config(folder, corpus_files, tmp_path / f"{arch}.h5"))
    with ActivationsFile(out) as f:
        reference = moe_reference(folder, arch, f)
        assert set(f.expert_rows) == set(reference)
        assert f.layers == ([0] if arch == "deepseek2" else [])
        for (layer, expert), (routed, count, sums, best) in reference.items():
            assert f.routed[layer, expert] == routed, (layer, expert)
            n = f.expert_neurons(expert)
            data = [f.neuron(layer, i, expert=expert, windows=False) for i in range(n)]
            np.testing.assert_array_equal(np.stack([d.count for d in data]), count, err_msg=str((layer, expert)))
            np.testing.assert_allclose(np.stack([d.sum[:, 1] for d in data]), sums, rtol=1e-4, atol=1e-4,
                                       err_msg=str((layer, expert)))
            # The in lists: the k documents with the largest |in| among their routed positions of the case.
            for i, d in enumerate(data):
                for c in range(4):
                    expected = np.sort(best[:, i, c][best[:, i, c] >= 0])[::-1][: f.k]
                    got = d.top_value[c, 1][d.top_doc[c, 1] >= 0]
                    np.testing.assert_allclose(np.abs(got), expected, rtol=1e-4, err_msg=str((layer, expert, i, c)))
                    docs = d.top_doc[c, 1][d.top_doc[c, 1] >= 0]
                    np.testing.assert_allclose(best[docs, i, c], np.abs(got), rtol=1e-4)
        # Routed experts see only their tokens: each token goes to top_k of them.
        top_k = 2
        for layer in f.expert_layers:
            assert sum(f.routed[layer, e] for e in f.experts_of(layer) if e != "s") == top_k * f.n_tokens
        layer, expert = next(iter(f.expert_rows))
        data = f.neuron(layer, 0, expert=expert)
        assert data.id == f"{layer}.{'s' if expert == 's' else f'e{expert}'}.0"
        np.testing.assert_allclose(data.frequency, data.count / f.routed[layer, expert])
        # The windows' centre is the example's own value; tokens the expert never saw are NaN.
        c = int(np.argmax(data.count))
        filled = data.top_doc[c, 1] >= 0
        np.testing.assert_allclose(data.top_in[c, 1, filled, f.context_before], data.top_value[c, 1, filled],
                                   rtol=1e-3)
        last = f.expert_layers[-1]
    from mkdocs_gluscope.pages import write_markdown_pages

    written = write_markdown_pages(out, [f"{last}.*"], tmp_path / "pages")  # every expert of the last layer
    names = {p.relative_to(tmp_path / "pages").as_posix() for p in written}
    assert f"neurons/L{last}/E3/N0.md" in names and f"neurons/L{last}/E0/index.md" in names
    assert (f"neurons/L{last}/S/index.md" in names) == (arch in ("qwen2moe", "deepseek2"))


def test_expert_pages_build_with_routing_and_indexes(model_factory, corpus_files, tmp_path, capsys, caplog):
    """`gluscope collect --experts` on a model with dense and MoE layers, then a strict MkDocs build of
    pages for a dense neuron, a routed expert's neurons and a shared expert's neuron: index pages per
    layer and expert, routing frequency on the pages, every link resolving."""
    import sites

    out = tmp_path / "ds.h5"
    code, text = run_cli("collect", "--model", str(model_factory("deepseek2", 3)), "--dataset",
                         str(corpus_files[0]), "--out", str(out), "--experts", "1-2,s", "--k", "4",
                         "--no-compile", "--no-progress", "--device", "cpu", "--dtype", "float32", capsys=capsys)
    assert code == 0, text
    with ActivationsFile(out) as f:
        assert sorted(f.expert_rows, key=str) == sorted([(1, 1), (1, 2), (2, 1), (2, 2), (1, "s"), (2, "s")], key=str)
        routed = f.routed[1, 2]
        assert 0 < routed < f.n_tokens and f.routed[2, "s"] == f.n_tokens
    site = sites.build_site(tmp_path / "site", {"activations": str(out), "neurons": ["0.3", "1.e2.*", "2.s.5"]})
    neurons = site / "neurons"
    page = (neurons / "L1" / "E2" / "N0" / "index.html").read_text()
    assert "Neuron 1.e2.0" in page and f"{routed:,} of" in page and "routing frequency" in page
    assert (neurons / "L2" / "S" / "N5" / "index.html").exists() and (neurons / "L0" / "N3" / "index.html").exists()
    assert "1.e2.23" in (neurons / "L1" / "E2" / "index.html").read_text()  # the expert's index lists its neurons
    layer = (neurons / "L1" / "index.html").read_text()
    assert "1.e2" in layer and "routing frequency" in layer
    assert "2.s" in (neurons / "index.html").read_text()
    # The light layout (a whole model) publishes expert neurons too.
    light = sites.build_site(tmp_path / "light", {"activations": str(out), "neurons": ["0.3", "1.e2.*", "2.s.5"],
                                                  "layout": "light"})
    assert (light / "neurons/L1/E2/N23/index.html").exists() and (light / "neurons/L2/S/N5/index.html").exists()
    assert (light / "neurons/data/neurons/L1/E2/1.parquet").exists() and "1.e2.23" in (light / "neurons/L1/E2/index.html").read_text()
    # Ids the file cannot serve are one clear line each.
    with pytest.raises(GluscopeError, match="layer 1 has no expert e0 in the file"):
        from mkdocs_gluscope.pages import write_markdown_pages
        write_markdown_pages(out, ["1.e0.3"], tmp_path / "md")
    code, text = run_cli("collect", "--model", str(model_factory("deepseek2", 3)), "--dataset",
                         str(corpus_files[0]), "--out", str(tmp_path / "bad.h5"), "--experts", "9",
                         "--no-compile", "--no-progress", "--device", "cpu", capsys=capsys)
    assert code == 2 and "--experts 9: layer 1 has experts 0..3 and s (shared)" in text and "Traceback" not in text


def test_merged_shards_and_layer_groups_of_an_moe_run_equal_one_run(model_factory, corpus_files, tmp_path, capsys):
    """Shards of an MoE run (and runs of disjoint layers) merge into the file one run writes: expert
    statistics merge like a dense layer's and routed counts add; info lists the experts."""
    from mkdocs_gluscope.merge import merge_files

    model = model_factory("deepseek2", 3)
    whole = collect(small_config(model, corpus_files, tmp_path / "whole.h5", batch_tokens=64))
    parts = [collect(small_config(model, corpus_files, tmp_path / f"s{i}.h5", shard=f"{i}/2", batch_tokens=64))
             for i in range(2)]
    parts += [collect(small_config(model, corpus_files, tmp_path / f"l{i}.h5", layers=layers, batch_tokens=64))
              for i, layers in enumerate(([0, 1], [2]))]
    for inputs, name in ((parts[:2], "sharded"), (parts[2:], "layers")):
        merged = merge_files(inputs, tmp_path / f"{name}.h5")
        with h5py.File(whole) as a, h5py.File(merged) as b:
            names = []
            a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
            assert "experts/routed" in names and "shared_experts/stats/count" in names
            for n in names:
                x, y = a[n][...], b[n][...]
                if n.endswith("sum"):
                    np.testing.assert_allclose(x, y, rtol=1e-9, err_msg=n)  # added in another order
                else:
                    assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (name, n)
            assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
    olmoe = collect(small_config(model_factory("olmoe", 2), corpus_files, tmp_path / "olmoe.h5"))
    capsys.readouterr()
    code, text = run_cli("info", str(olmoe), capsys=capsys)
    assert code == 0 and "experts L1: 4 routed x 48 neurons" in text and "nan" not in text


def test_expert_resume_and_weight_geometry(model_factory, corpus_files, tmp_path):
    """An interrupted, resumed MoE run writes the uninterrupted run's file (routed counts included);
    each expert neuron's flip and cosines are those of its slice of the fused expert weights."""
    model = model_factory("qwen2moe", 2)
    whole = collect(small_config(model, corpus_files, tmp_path / "whole.h5", batch_tokens=64))
    config = small_config(model, corpus_files, tmp_path / "resumed.h5", batch_tokens=64)
    with pytest.raises(Interrupted):
        collect(config, stop_after_batches=2)
    config.resume = True
    resumed = collect(config)
    with h5py.File(whole) as a, h5py.File(resumed) as b:
        names = []
        a.visit(lambda name: names.append(name) if isinstance(a[name], h5py.Dataset) else None)
        assert "experts/routed" in names and "shared_experts/top/gate" in names
        for name in names:
            assert np.array_equal(a[name][...], b[name][...], equal_nan=a[name].dtype.kind == "f"), name
    reference, _ = load_hf(str(model), torch.float32)
    cos = torch.nn.functional.cosine_similarity
    with ActivationsFile(whole) as f:
        for (layer, expert) in [(0, 3), (1, "s")]:
            mlp = reference.model.layers[layer].mlp
            if expert == "s":
                w_gate, w_in, w_out = (mlp.shared_expert.gate_proj.weight, mlp.shared_expert.up_proj.weight,
                                       mlp.shared_expert.down_proj.weight.T)
            else:
                w_gate, w_in = mlp.experts.gate_up_proj[expert].chunk(2, dim=0)
                w_out = mlp.experts.down_proj[expert].T
            flip = (w_gate * w_in).sum(1) < 0
            sign = torch.where(flip, -1.0, 1.0)[:, None]
            n = f.expert_neurons(expert)
            data = [f.neuron(layer, i, expert=expert, windows=False) for i in range(n)]
            assert [d.flipped for d in data] == flip.tolist() and flip.any()
            np.testing.assert_allclose([d.cos_gate_in for d in data], cos(w_gate, w_in * sign, dim=1).detach(),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose([d.cos_in_out for d in data], cos(w_in, w_out, dim=1).detach(),
                                       rtol=1e-5, atol=1e-6)  # both flipped: unchanged


def test_bridge_on_a_multimodal_model_installs_no_package(model_factory, monkeypatch):
    """Found: TransformerLens ran `pip install torchvision` when it booted Gemma-3 or Llava, which
    replaced the user's torch (2.13 CPU) by a multi-GB 2.14 CUDA build in the middle of a run."""
    import subprocess

    installs = []

    def no_install(command, *args, **kwargs):
        installs.append(command)
        raise AssertionError(f"a package install was attempted: {command}")

    monkeypatch.setattr(subprocess, "check_call", no_install)
    load_model(str(model_factory("gemma3mm")), dtype="float32", device="cpu", engine="bridge")
    assert installs == []
