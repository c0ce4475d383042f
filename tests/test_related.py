"""Related neurons: by shared strongest examples (from the file) and by weights (from the model)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mkdocs_gluscope.cli import main
from mkdocs_gluscope import related
from mkdocs_gluscope.related import RELATED_K, shared_examples
from mkdocs_gluscope.store import ActivationsFile, early_end
from synthetic import write_synthetic


def brute_force_shared(f: ActivationsFile) -> dict[tuple, list[tuple]]:
    """Every (neuron, case)'s list, from every pair of hook_post lists compared as sets."""
    early = early_end(f.attrs)
    units = {}
    for i, layer in enumerate(f.layers):
        for n in range(f.d_mlp):
            for c in range(4):
                doc, pos = f.file["top/doc"][i, n, c, 0], f.file["top/pos"][i, n, c, 0]
                keep = (doc >= 0) & (pos >= early)
                units[layer, n, c] = (set(zip(doc[keep].tolist(), pos[keep].tolist())), set(doc[keep].tolist()))
    lists = {}
    for a, (pa, da) in units.items():
        found = [(-len(pa & pb), -len(da & db), b) for b, (pb, db) in units.items() if b != a and pa & pb]
        lists[a] = [(b, -p, -d) for p, d, b in sorted(found)[:RELATED_K]]
    return lists


def test_related_by_activation_finds_neurons_planted_to_share_examples(tmp_path, capsys, monkeypatch):
    path = write_synthetic(tmp_path / "s.h5", layers=2, d_mlp=8, k=4,
                           docs=[[0] + list(range(1, 30)) for _ in range(40)])
    with h5py.File(path, "r+") as h5:
        doc, pos = h5["top/doc"], h5["top/pos"]
        # 0.2 gate+_in+ and 1.5 gate-_in- share three strong tokens (and a fourth document at another position);
        # 0.3 and 1.1 share one token at position 2, the start of a document, which does not count.
        doc[0, 2, 0, 0] = [31, 32, 33, 34]
        pos[0, 2, 0, 0] = [20, 21, 22, 10]
        doc[1, 5, 3, 0] = [33, 32, 31, 34]
        pos[1, 5, 3, 0] = [22, 21, 20, 11]
        doc[0, 3, 1, 0, 0], pos[0, 3, 1, 0, 0] = 35, 2
        doc[1, 1, 2, 0, 0], pos[1, 1, 2, 0, 0] = 35, 2
    assert main(["related", str(path)]) == 0
    assert "by activation" in capsys.readouterr().out
    with ActivationsFile(path) as f:
        shared = f.neuron(0, 2).related.shared
        assert (shared["layer"][0, 0], shared["neuron"][0, 0], shared["case"][0, 0]) == (1, 5, 3)
        assert (shared["positions"][0, 0], shared["docs"][0, 0]) == (3, 4)
        back = f.neuron(1, 5).related.shared
        assert (back["layer"][3, 0], back["neuron"][3, 0], back["case"][3, 0], back["positions"][3, 0]) == (0, 2, 0, 3)
        assert (1, 1, 2) not in {(int(a), int(b), int(c)) for a, b, c in zip(
            *(f.neuron(0, 3).related.shared[x][1] for x in ("layer", "neuron", "case")))}
        assert f.neuron(0, 2).related.feeds is None  # no --model: the weights part is absent
        expected = brute_force_shared(f)
        for (layer, n, c), entries in expected.items():
            got = f.neuron(layer, n).related.shared
            listed = [((int(got["layer"][c, j]), int(got["neuron"][c, j]), int(got["case"][c, j])),
                       int(got["positions"][c, j]), int(got["docs"][c, j]))
                      for j in range(RELATED_K) if got["layer"][c, j] >= 0]
            assert listed == entries, (layer, n, c)
        # The same lists when the pairs are expanded a few at a time (many blocks of source cases), and
        # when shared documents are counted by comparing the lists rather than as bitsets.
        monkeypatch.setattr(related, "BITSET_BYTES", 0)
        small = shared_examples(f.file["top/doc"][:, :, :, 0], f.file["top/pos"][:, :, :, 0], f.doc_offsets,
                                early_end(f.attrs), f.layers, pair_budget=7)
        for name, values in small.items():
            assert np.array_equal(values, f.file["related"][name][...]), name


def direct_scores(folder, arch: str, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """feeds scores [N, 2 (gate, in), N'] of layer 0 onto layer 1 and w_out cosines of layer 0, from the
    model's original weights, written out here: Llama's RMSNorm scale g, Gemma-2's (1 + weight) around
    the MLP; then refactor_glu's flips applied (w_out and w_in of a flipped neuron negated)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    layers = model.model.layers
    sign = np.where(flipped, -1.0, 1.0)
    w_out = layers[0].mlp.down_proj.weight.detach().numpy().T * sign[0][:, None]  # [N, d], flipped
    if arch == "gemma2":
        g = 1 + layers[1].pre_feedforward_layernorm.weight.detach().numpy()
        w_out = w_out * (1 + layers[0].post_feedforward_layernorm.weight.detach().numpy())
    else:
        g = layers[1].post_attention_layernorm.weight.detach().numpy()
    gate = layers[1].mlp.gate_proj.weight.detach().numpy()
    in_ = layers[1].mlp.up_proj.weight.detach().numpy() * sign[1][:, None]
    feeds = np.stack([(w_out * g) @ gate.T, (w_out * g) @ in_.T], axis=1)
    raw = layers[0].mlp.down_proj.weight.detach().numpy().T * sign[0][:, None]
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    return feeds, unit @ unit.T, w_out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # an RMSNorm before the MLP; Gemma-2's norms before and after
def test_related_by_weights_against_a_direct_computation(arch, model_factory, corpus_files, tmp_path, capsys):
    import torch

    from collect.model import load_model
    from collect.run import collect
    from test_collect import small_config

    folder = model_factory(arch)
    path = collect(small_config(folder, corpus_files, tmp_path / "a.h5", samples=0))
    assert main(["related", str(path), "--model", str(folder)]) == 0
    assert "by activation and by weights" in capsys.readouterr().out
    with ActivationsFile(path) as f:
        flipped = f.weights("flipped")
        assert flipped[0].any() and not flipped[0].all()  # both kinds of source neuron are checked
        feeds, cosine, written = direct_scores(folder, arch, flipped)
        N = f.d_mlp
        for n in range(N):
            related = f.neuron(0, n).related
            for r in range(2):  # gate, in of the later neuron
                order = np.lexsort((np.arange(N), -feeds[n, r]))  # highest first, lower neuron on ties
                assert list(related.feeds["neuron"][r, 0]) == list(order[:RELATED_K])
                assert set(related.feeds["layer"][r, 0]) == {1}
                np.testing.assert_allclose(related.feeds["score"][r, 0], feeds[n, r, order[:RELATED_K]], rtol=1e-4,
                                           atol=1e-6)
                low = np.lexsort((np.arange(N), feeds[n, r]))
                assert list(related.feeds["neuron"][r, 1]) == list(low[:RELATED_K])
            others = np.delete(np.arange(N), n)
            best = others[np.lexsort((others, -cosine[n, others]))][:RELATED_K]
            assert list(related.alike["neuron"][0]) == list(best)
            np.testing.assert_allclose(related.alike["score"][0], cosine[n, best], rtol=1e-4, atol=1e-6)
            assert f.neuron(1, n).related.feeds["layer"].max() == -1  # the last layer feeds no later one
        # What "feeds the gate+ of m" claims, on the model itself: a flipped neuron's positive post (its
        # gate+_in+ case) moves the gate of its top-listed later neuron up, and of its bottom-listed one down.
        loaded, _ = load_model(str(folder), dtype="float32", device="cpu", layers=[0, 1])
        n = int(np.flatnonzero(flipped[0])[0])
        related = f.neuron(0, n).related
        layer1 = loaded.hf_model.model.layers[1]
        norm = layer1.pre_feedforward_layernorm if arch == "gemma2" else layer1.post_attention_layernorm
        x = torch.randn(1, loaded.hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        direction = torch.from_numpy(written[n] / np.linalg.norm(written[n])).float()
        x = x - (x @ direction) * direction  # the step leaves the norm's rms unchanged to first order
        step = direction * 1e-3 * x.norm()
        with torch.no_grad():
            change = layer1.mlp.gate_proj(norm(x + step)) - layer1.mlp.gate_proj(norm(x))
        assert change[0, related.feeds["neuron"][0, 0, 0]] > 0 > change[0, related.feeds["neuron"][0, 1, 0]]


def test_related_refuses_another_model(model_factory, corpus_files, tmp_path, capsys):
    from collect.run import collect
    from test_collect import small_config

    path = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "a.h5", samples=0))
    assert main(["related", str(path), "--model", str(model_factory("qwen2"))]) == 2
    err = capsys.readouterr().err
    assert err.count("gluscope: error:") == 1 and "is not the model" in err


def test_related_loads_the_model_in_the_dtype_the_collection_ran(model_factory, corpus_files, tmp_path, capsys):
    """A float32 checkpoint collected in bfloat16 (what --dtype auto picks on a CPU with native
    bfloat16, as the demo does): a neuron whose w_gate . w_in is negative in float32 but 0 in
    bfloat16 flips in one and not the other. `gluscope related --model` loads the model in the
    file's dtype by default, so the flips are the file's; asked for float32 it says which dtype the
    collection ran in, in one error line, instead of calling it another model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from collect.run import collect
    from test_collect import small_config

    folder = tmp_path / "model"
    shutil.copytree(model_factory("llama"), folder)
    weights_file = folder / "model.safetensors"
    weights = load_file(weights_file)
    gate, up = weights["model.layers.0.mlp.gate_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"]
    gate[0], up[0] = 0.0, 0.0
    gate[0, :2] = 1.0
    up[0, 0], up[0, 1] = 1 + 2**-8 + 2**-10, -(1 + 2**-7)  # float32 dot -0.0029; bfloat16 1 + 2**-7 twice: dot 0
    assert float(gate[0] @ up[0]) < 0 and float(gate[0].bfloat16().float() @ up[0].bfloat16().float()) == 0
    save_file(weights, weights_file, metadata={"format": "pt"})

    path = collect(small_config(folder, corpus_files, tmp_path / "a.h5", samples=0, dtype="bfloat16"))
    with h5py.File(path) as f:
        assert not f["weights/flipped"][0, 0]  # flipped as the bfloat16 run decided
    assert main(["related", str(path), "--model", str(folder), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.count("gluscope: error:") == 1 and "ran in bfloat16" in err and "--dtype bfloat16" in err
    assert main(["related", str(path), "--model", str(folder)]) == 0
    with ActivationsFile(path) as f:
        assert f.neuron(0, 0).related.feeds is not None
