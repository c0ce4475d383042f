"""gluscope probe: your own text through the model, values as a collection records them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from collect import architectures
from collect.architectures import locate
from collect.model import load_hf
from collect.probe import Prober
from collect.run import collect
from mkdocs_gluscope.cli import main
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile
from test_collect import run_cli, small_config

TEXT = tiny.CORPUS[1]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own: a probe remembers where a model's MLPs are (layouts/) there."""
    monkeypatch.setenv("GLUSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_adapter(*args, **kwargs):
    raise AssertionError("TransformerLens' adapter was asked, though the layout was remembered")


def test_probe_values_equal_those_a_one_document_collection_records(model_factory, tmp_path):
    folder = model_factory("llama")
    corpus = tiny.write_corpus_files(tmp_path / "corpus", [TEXT])
    path = collect(small_config(folder, corpus, tmp_path / "one.h5", window_dtype="float32", context_before=40,
                                context_after=2, samples=0))
    for engine in ("transformers", "checkpoint"):  # the first probe, then one from the recipe it checked
        prober = Prober.load(str(folder), bos="auto")
        assert prober.engine == engine
        check_against_collection(prober, path)


def check_against_collection(prober: Prober, path: Path) -> None:
    with ActivationsFile(path) as f:
        neurons = [(layer, n) for layer in f.layers for n in range(f.d_mlp)]
        probed = prober.run(TEXT, neurons)
        assert list(probed.tokens) == list(f.document(0))
        assert probed.strings == [f.vocab[int(t)] for t in probed.tokens]  # the tokens as the pages spell them
        T = len(probed.tokens)
        checked = 0
        for i, (layer, n) in enumerate(neurons):
            data = f.neuron(layer, n)
            hooks = {"hook_post": probed.post[i], "hook_pre_linear": probed.in_[i], "hook_pre": probed.gate[i],
                     "swish": probed.swish[i]}
            cases = probed.cases(i)
            for c in range(len(CASES)):
                for h, hook in enumerate(HOOKS):
                    if data.top_doc[c, h, 0] < 0:
                        assert not (cases[probed.first_counted:] == c).any()
                        continue
                    p = int(data.top_pos[c, h, 0])
                    assert cases[p] == c
                    # The same hooks; the collection's padded batch may round the last bit otherwise.
                    assert data.top_value[c, h, 0] == pytest.approx(hooks[hook][p], rel=1e-5, abs=1e-6)
                    t = p + np.arange(-f.context_before, f.context_after + 1)
                    inside = (t >= 0) & (t < T)
                    np.testing.assert_allclose(data.top_gate[c, h, 0][inside], probed.gate[i][t[inside]], rtol=1e-5,
                                               atol=1e-6)
                    np.testing.assert_allclose(data.top_in[c, h, 0][inside], probed.in_[i][t[inside]], rtol=1e-5,
                                               atol=1e-6)
                    checked += 1
        assert checked > len(neurons)


def test_probe_command_colors_in_a_terminal_only_and_writes_the_pages_row(model_factory, tmp_path, capsys):
    folder = model_factory("llama")
    assert main(["probe", "--model", str(folder), "--neurons", "1.3,0.5", "--no-color", TEXT]) == 0
    plain = capsys.readouterr().out
    assert "\x1b[" not in plain and "neuron 1.3: strongest post" in plain and "neuron 0.5" in plain
    assert "⁺⁺ gate+_in+" in plain and re.search("[⁺⁻][⁺⁻]", plain.split("neuron 1.3")[1])
    html_path = tmp_path / "probe.html"
    assert main(["probe", "--model", str(folder), "--neurons", "1.3", "--color", "--values", "--html",
                 str(html_path), TEXT]) == 0
    colored = capsys.readouterr().out
    assert "\x1b[" in colored and "48;2;" in colored
    table = [line.split("\t") for line in colored.splitlines() if "\t" in line]
    assert table[0] == ["position", "token", "case"] + list(HOOKS)
    page = html_path.read_text()
    assert page.count('class="gs-ex"') == 1 and "gs-x" in page and "<button" not in page
    assert 'class="gs-examples gs-probe-out"' in page and "data-g=" in page and "<script>" in page
    assert main(["probe", "--model", str(folder), "--neurons", "7.3", TEXT]) == 2
    err = capsys.readouterr().err
    assert err.count("gluscope: error:") == 1 and "layer 7" in err


@pytest.mark.parametrize("bad", ["12", "1.x", "1.2,3"])
def test_probe_refuses_bad_neuron_lists(bad, capsys):
    code, text = run_cli("probe", "--model", "m", "--neurons", bad, "text", capsys=capsys)
    assert code == 2 and "expected neurons LAYER.NEURON" in text and text.count("gluscope: error") == 1


def test_a_later_probe_finds_the_mlps_without_the_adapter_and_gets_the_same_values(model_factory, own_cache,
                                                                                    monkeypatch):
    """The first probe of a model asks TransformerLens where its MLPs are and remembers the answer; a later
    one reads it back (importing TransformerLens takes seconds) and its values are the same bits."""
    folder = str(model_factory("llama"))
    neurons = [(0, 5), (1, 3), (1, 47)]
    first = Prober.load(folder, recipe=False).run(TEXT, neurons)
    assert len(list((own_cache / "layouts").glob("*.json"))) == 1
    monkeypatch.setattr(architectures, "_ask_adapter", no_adapter)
    again = Prober.load(folder, recipe=False).run(TEXT, neurons)
    for name in ("gate", "in_", "post", "swish"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name


def test_a_layout_that_does_not_fit_the_model_is_asked_for_again(model_factory, own_cache, monkeypatch):
    folder = str(model_factory("llama"))
    expected = Prober.load(folder, recipe=False).run(TEXT, [(1, 3)]).post
    (path,) = (own_cache / "layouts").glob("*.json")
    asked = []
    ask = architectures._ask_adapter
    monkeypatch.setattr(architectures, "_ask_adapter", lambda *a: asked.append(1) or ask(*a))
    for broken in (path.read_text().replace('"up_proj"', '"no_such_proj"'), "{not json"):
        path.write_text(broken)
        assert np.array_equal(Prober.load(folder, recipe=False).run(TEXT, [(1, 3)]).post, expected)
        assert '"up_proj"' in path.read_text()  # written again, as the adapter answered
    assert len(asked) == 2


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3mm", "falconh1"])
def test_a_remembered_layout_gives_the_adapters_own_modules(arch, model_factory, tmp_path, monkeypatch):
    """Plain, fused (Phi-3), a multimodal wrapper's language tower, a gate scaled before its activation
    (Falcon-H1): rebuilt from the remembered module names, each layer's MLP is what the adapter found."""
    model, _ = load_hf(str(model_factory(arch)), torch.float32)
    asked = locate(model, None, remember=tmp_path)
    monkeypatch.setattr(architectures, "_ask_adapter", no_adapter)
    again = locate(model, None, remember=tmp_path)
    assert (again.adapter, again.layers_path, again.n_layers, again.skipped) == (
        asked.adapter, asked.layers_path, asked.n_layers, asked.skipped)
    assert list(again.layers) == list(asked.layers)
    for layer, mlp in asked.layers.items():
        other = again.layers[layer]
        for part in ("module", "gate", "up", "down", "act_module"):
            assert getattr(other, part) is getattr(mlp, part), (layer, part)
        assert (other.fused, other.definition, other.act_fn) == (mlp.fused, mlp.definition, mlp.act_fn)
        for weight in ("w_gate", "w_in", "w_out", "b_gate", "b_in"):
            a, b = getattr(mlp, weight), getattr(other, weight)
            assert (a is None and b is None) or torch.equal(a, b), (layer, weight)


@pytest.mark.slow
def test_a_later_probe_command_imports_neither_transformers_nor_transformer_lens(model_factory, own_cache, capsys):
    """What makes a probe of the demo model take seconds less: a fresh process, as a user runs it. With
    --no-recipe it goes through transformers, and still finds the MLPs without TransformerLens."""
    folder = str(model_factory("llama"))
    args = ["probe", "--model", folder, "--neurons", "1.3,0.5", "--values", "--no-color", TEXT]
    assert main(args) == 0  # asks the adapter and checks the recipe; remembers both
    expected = capsys.readouterr().out
    script = ("import sys; from mkdocs_gluscope.cli import main; code = main(sys.argv[1:]); "
              "print('imported:', 'transformers' in sys.modules, 'transformer_lens' in sys.modules); sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for extra, imported in (([], "False False"), (["--no-recipe"], "True False")):
        result = subprocess.run([sys.executable, "-c", script, *args, *extra], capture_output=True, text=True,
                                env=env, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + f"imported: {imported}\n"


def probe_all(prober: Prober, text: str = TEXT):
    neurons = [(layer, n) for layer in sorted(prober.mlp_sizes) for n in range(prober.mlp_sizes[layer])]
    return prober.run(text, neurons)


def same_values(a, b) -> None:
    assert list(a.tokens) == list(b.tokens) and a.strings == b.strings and a.first_counted == b.first_counted
    for name in ("gate", "in_", "post", "swish"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_later_probe_of_a_llama_checkpoint_runs_without_transformers_and_gets_the_same_bits(
        dtype, model_factory, own_cache, monkeypatch):
    """The first probe goes through transformers, checks the checkpoint recipe against it and keeps it;
    a later probe computes the layers from the safetensors files alone, every value the same bits (texts
    of one token and of the model's full context too), and never loads the model through transformers."""
    folder = str(model_factory("llama"))
    first = Prober.load(folder, dtype=dtype)
    assert first.engine == "transformers" and len(list((own_cache / "probe").glob("*.json"))) == 1
    texts = (TEXT, "a", TEXT * (256 // len(first.tokens(TEXT))))  # the last near the model's 256 positions
    expected = [probe_all(first, text) for text in texts]
    import collect.model
    monkeypatch.setattr(collect.model, "load_hf", lambda *a, **k: pytest.fail("loaded through transformers"))
    again = Prober.load(folder, dtype=dtype)
    assert again.engine == "checkpoint"
    for text, want in zip(texts, expected):
        same_values(probe_all(again, text), want)
    with pytest.raises(GluscopeError, match="layer 2 is not a dense layer"):
        again.run(TEXT, [(2, 0)])
    with pytest.raises(GluscopeError, match="the model takes at most 256"):
        again.run(TEXT * 200, [(0, 0)])


def test_a_recipe_that_differs_from_transformers_in_one_bit_is_not_kept(model_factory, own_cache, monkeypatch):
    from collect import trunk

    folder = str(model_factory("llama"))
    norm = trunk._rms_norm
    with monkeypatch.context() as patch:  # (only this patch: the test's own cache folder stays set)
        patch.setattr(trunk, "_rms_norm", lambda x, w, eps: norm(x, w, eps) * (1 + 2**-20))  # the last bits
        assert Prober.load(folder).engine == "transformers"
        assert not list((own_cache / "probe").glob("*.json"))
    assert Prober.load(folder).engine == "transformers"  # now checked equal and kept
    assert Prober.load(folder).engine == "checkpoint"


def test_a_changed_checkpoint_or_other_options_go_through_transformers_again(model_factory, own_cache, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model_factory("llama"), folder)
    assert Prober.load(str(folder)).engine == "transformers"
    assert Prober.load(str(folder)).engine == "checkpoint"
    assert Prober.load(str(folder), refactor_glu=False).engine == "transformers"  # another recipe
    assert Prober.load(str(folder), bos="never").engine == "transformers"
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] *= 2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    changed = Prober.load(str(folder))
    assert changed.engine == "transformers"
    reference = Prober.load(str(folder), recipe=False)
    same_values(probe_all(changed), probe_all(reference))
    assert Prober.load(str(folder)).engine == "checkpoint"
    same_values(probe_all(Prober.load(str(folder))), probe_all(reference))


@pytest.mark.parametrize("arch", ["gemma", "phi3"])
def test_other_families_keep_no_recipe(arch, model_factory, own_cache):
    folder = str(model_factory(arch))
    assert Prober.load(folder).engine == "transformers"
    assert Prober.load(folder).engine == "transformers" and not list((own_cache / "probe").glob("*.json"))
