"""Collection on tiny random models: hooks, refactor_glu, the file, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from collect.model import find_gated_mlps, load_hf, load_model, refactor_glu, run_with_mlp_hooks
from collect.run import CollectConfig, Interrupted, collect
from mkdocs_gluscope.cli import main
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile


def small_config(model: Path, corpus: list[Path], out: Path, **overrides) -> CollectConfig:
    options = dict(model=str(model), dataset=[str(p) for p in corpus], out=out, k=4, context_before=3,
                   context_after=1, compile=False, progress=False, device="cpu", batch_tokens=128)
    options.update(overrides)
    return CollectConfig(**options)


@pytest.mark.parametrize("engine", ["hf", "bridge"])
@pytest.mark.parametrize("arch", ["llama", "olmo", "gemma", "qwen2"])
def test_hooks_match_hugging_face_forward_hooks(arch, engine, model_factory):
    folder = model_factory(arch)
    reference, tokenizer = load_hf(str(folder), torch.float32)
    reference.set_attn_implementation("eager")  # the bridge runs eager attention
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer, mlp in enumerate(find_gated_mlps(reference)):
        handles.append(mlp.gate.register_forward_hook(
            lambda m, i, o, layer=layer: seen.__setitem__((layer, "gate"), o)))
        handles.append(mlp.up.register_forward_hook(
            lambda m, i, o, layer=layer: seen.__setitem__((layer, "in"), o)))
        handles.append(mlp.down.register_forward_pre_hook(
            lambda m, i, layer=layer: seen.__setitem__((layer, "post"), i[0])))
    ids = torch.tensor([tokenizer("Once again the council met.")["input_ids"],
                        tokenizer("The cat sat on the mat, twice.")["input_ids"][:8]][0:1])
    with torch.inference_mode():
        reference(ids)
    loaded, _ = load_model(str(folder), device="cpu", refactor=False, engine=engine)
    if engine == "hf":
        loaded.hf_model.set_attn_implementation("eager")  # compare like with like
    got = {}

    def on_layer(layer, gate, in_, post):
        got[layer, "gate"], got[layer, "in"], got[layer, "post"] = gate.clone(), in_.clone(), post.clone()

    run_with_mlp_hooks(loaded, ids, list(range(loaded.n_layers)), on_layer)
    assert set(got) == set(seen)
    for key in seen:
        torch.testing.assert_close(got[key], seen[key], rtol=1e-5, atol=1e-6, msg=str(key))
    # Gemma's gate goes through GELU, the others through SiLU.
    assert loaded.act_fn_name.startswith("gelu" if arch == "gemma" else "silu")


def test_refactor_glu_keeps_logits_and_flips_exactly_negative_neurons(model_factory):
    model, tokenizer = load_hf(str(model_factory("llama")), torch.float32)
    ids = torch.tensor([tokenizer("Meanwhile the market rose again.")["input_ids"]])
    mlps = find_gated_mlps(model)
    expected = torch.stack([(m.gate.weight * m.up.weight).sum(1) < 0 for m in mlps])
    assert expected.any() and not expected.all()
    with torch.inference_mode():
        before = model(ids).logits
        flipped = refactor_glu(mlps)
        after = model(ids).logits
    assert torch.equal(flipped, expected)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert all(((m.gate.weight * m.up.weight).sum(1) >= 0).all() for m in mlps)


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
    code = main(list(args))
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
    if given.get("--model") == "GPT2":
        import transformers

        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=400))
        gpt2.save_pretrained(tmp_path / "gpt2")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "gpt2" / name).write_bytes((model_factory("llama") / name).read_bytes())
        given["--model"] = str(tmp_path / "gpt2")
    options.update(given)
    argv = ["collect", *[x for kv in options.items() for x in kv], "--no-compile", "--no-progress", "--device", "cpu"]
    code, text = run_cli(*argv, capsys=capsys)
    assert code == 2, text
    assert "gluscope: error: " in text and message in text, text
    assert "Traceback" not in text
    assert not (tmp_path / "x.h5").exists()


def test_saved_dataset_and_parquet_inputs(model_factory, tmp_path):
    import datasets

    import tiny

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

    from collect.run import _CtrlC

    with _CtrlC() as ctrl_c:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert ctrl_c.requested  # the loop finishes its batch, checkpoints and stops
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is not handler  # the previous handler is back
