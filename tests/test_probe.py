"""gluscope probe: your own text through the model, values as a collection records them."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tiny
from collect.probe import Prober
from collect.run import collect
from mkdocs_gluscope.cli import main
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile
from test_collect import run_cli, small_config

TEXT = tiny.CORPUS[1]


def test_probe_values_equal_those_a_one_document_collection_records(model_factory, tmp_path):
    folder = model_factory("llama")
    corpus = tiny.write_corpus_files(tmp_path / "corpus", [TEXT])
    path = collect(small_config(folder, corpus, tmp_path / "one.h5", window_dtype="float32", context_before=40,
                                context_after=2, samples=0))
    prober = Prober.load(str(folder), bos="auto")
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
