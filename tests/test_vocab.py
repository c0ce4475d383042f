"""vocab/: the tokens each neuron's w_out, w_gate and w_in align with, against brute force from the HF modules."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from collect.model import load_hf
from collect.run import collect
from collect.vocab import extreme_tokens, norm_scale
from mkdocs_gluscope.store import VOCAB_K, VOCAB_WEIGHTS, ActivationsFile
from test_collect import small_config

PAD = 24  # embedding rows past the tokenizer, made large so that they would win every list


def padded_model(base, folder):
    """A copy of a tiny model with random norm weights (so ``weight`` and ``1 + weight`` differ) and
    ``PAD`` large embedding rows that no token id of the tokenizer reaches."""
    from transformers import AutoTokenizer

    model, _ = load_hf(str(base), torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    n = len(tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.copy_(0.2 + torch.randn(param.shape, generator=generator))
        model.resize_token_embeddings(n + PAD, mean_resizing=False)
        for matrix in {id(m): m for m in (model.get_input_embeddings().weight,
                                          model.get_output_embeddings().weight)}.values():
            matrix[n:] = 50 * torch.randn(PAD, matrix.shape[1], generator=generator)
    model.save_pretrained(folder)
    for f in base.iterdir():
        if "token" in f.name or f.name.endswith(".txt"):
            shutil.copy(f, folder / f.name)
    return folder


def scale_of(norm, arch):
    """The family's norm scale, written out per family (Gemma keeps ``1 + weight``)."""
    return (1 + norm.weight) if arch.startswith("gemma") else norm.weight


def reference(folder, arch, refactor=True):
    """``[layer, neuron, 3, 2, K]`` token ids and scores by brute force, one neuron at a time."""
    from transformers import AutoTokenizer

    model, _ = load_hf(str(folder), torch.float32)
    n = len(AutoTokenizer.from_pretrained(folder))
    stack = model.model.layers
    with torch.no_grad():
        embedded = model.get_input_embeddings()(torch.arange(n))  # Gemma's sqrt(d_model) included
        unembed = model.get_output_embeddings().weight[:n]
        final = scale_of(model.model.norm, arch)
        ids, scores, flips, full_out = [], [], [], []
        for block in stack:
            mlp = block.mlp
            w_gate, w_in, w_out = mlp.gate_proj.weight, mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
            flip = ((w_gate * w_in).sum(1) < 0) if refactor else torch.zeros(len(w_gate), dtype=torch.bool)
            w_in[flip] *= -1
            w_out[:, flip] *= -1
            pre = {"gemma2": getattr(block, "pre_feedforward_layernorm", None), "olmo2": None}.get(
                arch, getattr(block, "post_attention_layernorm", None))
            post = scale_of(block.post_feedforward_layernorm, arch) if arch in ("gemma2", "olmo2") else 1
            # The pre-MLP norm applied to each token's embedding on its own.
            normed = torch.stack([pre(e) if pre is not None else e for e in embedded])
            layer_ids, layer_scores = [], []
            for neuron in range(len(w_gate)):
                per_weight = [unembed @ (final * post * w_out[:, neuron])]
                per_weight += [normed @ w for w in (w_gate[neuron], w_in[neuron])]
                order = [s.argsort(descending=True) for s in per_weight]
                layer_ids.append([[o[:VOCAB_K], o.flip(0)[:VOCAB_K]] for o in order])
                layer_scores.append([[s[o[:VOCAB_K]], s[o.flip(0)[:VOCAB_K]]] for s, o in zip(per_weight, order)])
            ids.append(np.array([[[x.numpy() for x in pair] for pair in neuron] for neuron in layer_ids]))
            scores.append(np.array([[[x.numpy() for x in pair] for pair in neuron] for neuron in layer_scores]))
            flips.append(flip.numpy())
            # Every row, the padding too: the padded rows do reach the top of the out lists.
            full_out.append(model.get_output_embeddings().weight @ (final * post * w_out[:, 0]))
    assert max(int(s.abs().argmax()) for s in full_out) >= n  # the test means something
    return np.stack(ids), np.stack(scores), np.stack(flips), n


@pytest.fixture(scope="module")
def padded(model_factory, tmp_path_factory):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = padded_model(model_factory(arch), tmp_path_factory.mktemp(f"padded-{arch}"))
        return made[arch]
    return make


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "olmo2"])
def test_vocab_matches_brute_force_from_the_hf_modules(arch, padded, corpus_files, tmp_path):
    folder = padded(arch)
    out = collect(small_config(folder, corpus_files, tmp_path / "run.h5"))
    ids, scores, flipped, n = reference(folder, arch)
    with h5py.File(out) as f:
        token, score = f["vocab/token"][...], f["vocab/score"][...]
        assert token.shape == (2, 48, 3, 2, VOCAB_K) and token.dtype == np.int32 and score.dtype == np.float32
        assert f.attrs["vocab_k"] == VOCAB_K and f.attrs["vocab_tokens"] == n and f.attrs["vocab_norm"]
        assert np.array_equal(f["weights/flipped"][...], flipped) and flipped.any()
    assert ((token >= 0) & (token < n)).all()  # never a padding row
    np.testing.assert_array_equal(token, ids)
    np.testing.assert_allclose(score, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    # top descending, bottom ascending
    assert (np.diff(score[:, :, :, 0], axis=-1) <= 0).all() and (np.diff(score[:, :, :, 1], axis=-1) >= 0).all()
    with ActivationsFile(out) as f:
        neuron = f.neuron(1, 7)
        np.testing.assert_array_equal(neuron.vocab_token, token[1, 7])


def test_refactor_glu_flips_the_in_and_out_lists_of_flipped_neurons(padded, corpus_files, tmp_path):
    folder = padded("llama")
    on = collect(small_config(folder, corpus_files, tmp_path / "on.h5"))
    off = collect(small_config(folder, corpus_files, tmp_path / "off.h5", refactor_glu=False))
    ids, scores, _, _ = reference(folder, "llama", refactor=False)
    with h5py.File(on) as a, h5py.File(off) as b:
        flipped = a["weights/flipped"][...]
        t_on, s_on, t_off, s_off = (a["vocab/token"][...], a["vocab/score"][...], b["vocab/token"][...],
                                    b["vocab/score"][...])
    np.testing.assert_array_equal(t_off, ids)  # unflipped: the model's own weights
    np.testing.assert_allclose(s_off, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    gate, in_, out = (VOCAB_WEIGHTS.index(w) for w in ("gate", "in", "out"))
    np.testing.assert_array_equal(t_on[:, :, gate], t_off[:, :, gate])  # w_gate never flips
    for w in (in_, out):
        # A flipped neuron's top list is the unflipped bottom list, scores negated; the others unchanged.
        np.testing.assert_array_equal(t_on[flipped][:, w, 0], t_off[flipped][:, w, 1])
        np.testing.assert_array_equal(s_on[flipped][:, w, 0], -s_off[flipped][:, w, 1])
        np.testing.assert_array_equal(t_on[~flipped][:, w], t_off[~flipped][:, w])


@pytest.mark.parametrize("d_model", [32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_scale_reads_each_kind_of_norm(d_model, dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    torch.manual_seed(0)
    weight = torch.randn(d_model)
    layer_norm = torch.nn.LayerNorm(d_model)
    llama, gemma = LlamaRMSNorm(d_model), GemmaRMSNorm(d_model)
    with torch.no_grad():
        for norm in (layer_norm, llama, gemma):
            norm.weight.copy_(weight)
        layer_norm.bias.normal_()
    expected = [(layer_norm, weight, True), (llama, weight, False), (gemma, 1 + weight, False),
                (OlmoLayerNorm(d_model), torch.ones(d_model), True)]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for norm, scale, centres in expected:
        norm.to(dtype)
        got, got_centres = norm_scale(norm, d_model, dtype=dtype, device="cpu")
        torch.testing.assert_close(got, scale.to(dtype).float(), rtol=tolerance, atol=tolerance)
        assert got_centres == centres, type(norm).__name__


def test_extreme_tokens_blocks_give_the_unblocked_answer_and_ties_go_to_the_lower_id():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    x[40] = x[3]  # a tie with a lower id in another chunk
    w = torch.randn(7, 8)
    w[0] = x[3]  # neuron 0: token 3 and 40 tie at the top
    full = extreme_tokens(lambda a, b: [x[a:b]], [w], 50, k=5, token_chunk=50, neuron_block=7)
    blocked = extreme_tokens(lambda a, b: [x[a:b]], [w], 50, k=5, token_chunk=6, neuron_block=3)
    for got in (full, blocked):
        scores = w @ x.T
        torch.testing.assert_close(got[1][:, 0, 0], scores.sort(dim=1, descending=True).values[:, :5])
        torch.testing.assert_close(got[1][:, 0, 1], scores.sort(dim=1).values[:, :5])
        assert got[0][0, 0, 0, :2].tolist() == [3, 40]
    assert torch.equal(full[0], blocked[0])
    # Ten equal tokens at the top of one chunk: the lowest ids make the list, whatever the blocks.
    x[20:30] = x[3]
    for chunk in (6, 50):
        got = extreme_tokens(lambda a, b: [x[a:b]], [w], 50, k=5, token_chunk=chunk, neuron_block=3)
        assert got[0][0, 0, 0].tolist() == [3, 20, 21, 22, 23]
    few = extreme_tokens(lambda a, b: [x[a:b]], [w], 3, k=5)
    assert (few[0][:, 0, :, 3:] == -1).all() and few[1][:, 0, :, 3:].isnan().all()


def brute_force_lists(normed, unembed_out, w_gate, w_in, w_out, refactor=True):
    """``[N, 3, 2, K]`` ids and scores of one set of neurons; ``normed`` the pre-MLP inputs [V, d],
    ``unembed_out`` the unembedding with the final norm's scale folded in [V, d]."""
    w_in, w_out = w_in.clone(), w_out.clone()
    flip = ((w_gate * w_in).sum(1) < 0) if refactor else torch.zeros(len(w_gate), dtype=torch.bool)
    w_in[flip] *= -1
    w_out[:, flip] *= -1
    ids, scores = [], []
    for neuron in range(len(w_gate)):
        per_weight = [unembed_out @ w_out[:, neuron], normed @ w_gate[neuron], normed @ w_in[neuron]]
        order = [s.argsort(descending=True) for s in per_weight]
        ids.append([[o[:VOCAB_K].numpy(), o.flip(0)[:VOCAB_K].numpy()] for o in order])
        scores.append([[s[o[:VOCAB_K]].numpy(), s[o.flip(0)[:VOCAB_K]].numpy()] for s, o in zip(per_weight, order)])
    return np.array(ids), np.array(scores)


def test_expert_neurons_have_vocab_lists_too(padded, corpus_files, tmp_path):
    from transformers import AutoTokenizer

    folder = padded("qwen2moe")
    out = collect(small_config(folder, corpus_files, tmp_path / "moe.h5"))
    model, _ = load_hf(str(folder), torch.float32)
    n = len(AutoTokenizer.from_pretrained(folder))
    with torch.no_grad():
        embedded = model.get_input_embeddings()(torch.arange(n))
        unembed_out = model.get_output_embeddings().weight[:n] * model.model.norm.weight
        with h5py.File(out) as f:
            for group in ("experts", "shared_experts"):
                token, score = f[group + "/vocab/token"][...], f[group + "/vocab/score"][...]
                layers, experts = f[group + "/layer"][...], f[group + "/expert"][...]
                assert len(token) == len(layers) > 0 and ((token >= 0) & (token < n)).all()
                for row, (layer, expert) in enumerate(zip(layers, experts)):
                    block = model.model.layers[layer]
                    normed = torch.stack([block.post_attention_layernorm(e) for e in embedded])
                    if expert == -1:
                        mlp = block.mlp.shared_expert
                        weights = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
                    else:
                        gate_up, down = block.mlp.experts.gate_up_proj[expert], block.mlp.experts.down_proj[expert]
                        d = gate_up.shape[0] // 2
                        weights = gate_up[:d], gate_up[d:], down
                    ids, scores = brute_force_lists(normed, unembed_out, *weights)
                    np.testing.assert_array_equal(token[row], ids, err_msg=f"{group} row {row}")
                    np.testing.assert_allclose(score[row], scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
