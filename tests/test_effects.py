"""Each example's direct effect on the output: the file's numbers against the model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collect.run import collect
from mkdocs_gluscope.effects import example_effects, raised_and_lowered
from mkdocs_gluscope.store import ActivationsFile, HOOKS
from test_collect import small_config


def final_norm_fixed(model, arch: str, x: torch.Tensor):
    """The final norm of ``arch`` written out here, as a linear map with its scale ``s`` at ``x`` held
    fixed: ``v -> g * v * s`` (Llama's RMSNorm), ``v -> (v - mean v) * s`` (OLMo's LayerNorm); and ``s``."""
    norm = model.model.norm
    if arch == "llama":
        s = torch.rsqrt(x.pow(2).mean() + norm.variance_epsilon)
        return (lambda v: norm.weight.double() * v * s), float(s)
    s = torch.rsqrt(x.var(unbiased=False) + 1e-5)
    return (lambda v: (v - v.mean()) * s), float(s)


@pytest.mark.parametrize("arch", ["llama", "olmo"])  # RMSNorm; LayerNorm, which centres
def test_direct_effect_is_the_logit_change_when_the_contribution_leaves_the_final_residual(
        arch, model_factory, corpus_files, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = model_factory(arch)
    path = collect(small_config(folder, corpus_files, tmp_path / "a.h5", window_dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()  # the weights before refactor_glu
    checked = 0
    with ActivationsFile(path) as f:
        assert f.has_effects and "effect_norm" in f.attrs
        # The scale the file recorded at every position of document 0 is the model's own.
        ids = torch.from_numpy(f.document(0).astype(np.int64))[None]
        seen = {}
        handles = [model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("final", i[0][0]))]
        handles += [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda m, i, layer=layer: seen.__setitem__(layer, i[0][0])) for layer in f.layers]
        recorded = f.final_scale_at(np.zeros(ids.shape[1], int), np.arange(ids.shape[1]))
        with torch.no_grad():
            logits = model(ids).logits[0]
            reference = [final_norm_fixed(model, arch, seen["final"][p]) for p in range(ids.shape[1])]
        np.testing.assert_allclose(recorded, [s for _, s in reference], rtol=1e-5)
        for layer in f.layers:
            for n in range(f.d_mlp):
                data = f.neuron(layer, n)
                effects = example_effects(data, data.top_value)  # read in the hook_post lists (h = 0)
                for c in range(4):
                    for j in range(f.k):
                        if data.top_doc[c, 0, j] != 0 or not np.isfinite(effects.effect[c, 0, j]):
                            continue
                        p = int(data.top_pos[c, 0, j])
                        nxt = int(ids[0, p + 1])
                        w_out = model.model.layers[layer].mlp.down_proj.weight[:, n]
                        contribution = seen[layer][p, n] * w_out  # post * w_out (refactor_glu flips both)
                        x = seen["final"][p]
                        without = model.lm_head(reference[p][0](x - contribution))[nxt]
                        change = float(logits[p, nxt] - without.detach())
                        assert effects.effect[c, 0, j] == pytest.approx(change, rel=1e-4, abs=1e-6)
                        checked += 1
    for h in handles:
        h.remove()
    assert checked >= 10


def test_effects_name_the_tokens_raised_and_lowered(tmp_path):
    """A negative post * s raises the bottom of the out list: the roles swap, amounts scale."""
    from synthetic import write_synthetic

    path = write_synthetic(tmp_path / "s.h5")
    with ActivationsFile(path) as f:
        data = f.neuron(0, 0)
    raised, lowered = raised_and_lowered(data, -2.0, n=3)
    out = data.vocab_token[0], data.vocab_score[0]
    assert [t for t, _ in raised] == list(out[0][1][:3])
    assert raised[0][1] == pytest.approx(-2.0 * out[1][1][0]) and raised[0][1] > 0
    assert [t for t, _ in lowered] == list(out[0][0][:3])


def test_no_effects_option_writes_a_file_without_them(model_factory, corpus_files, tmp_path):
    path = collect(small_config(model_factory("llama"), corpus_files, tmp_path / "a.h5", effects=False))
    with ActivationsFile(path) as f:
        assert not f.has_effects
        assert f.neuron(0, 0).top_next_score is None
        assert HOOKS[0] == "hook_post"
