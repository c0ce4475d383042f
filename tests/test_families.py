"""The mixture-of-experts and hybrid families of 2025-26, each on a tiny random model built from its transformers
config: the file agrees with a recomputation from the model's own modules, and its pages build."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from collect.model import load_hf
from collect.run import CollectConfig, collect
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import HOOKS, ActivationsFile, first_counted_position
from sites import build_site

IN, GATE = HOOKS.index("hook_pre_linear"), HOOKS.index("hook_pre")


def small_config(model: Path, corpus: list[Path], out: Path, **overrides) -> CollectConfig:
    options = dict(model=str(model), dataset=[str(p) for p in corpus], out=out, k=4, context_before=3,
                   context_after=1, compile=False, progress=False, device="cpu", batch_tokens=128,
                   dtype="float32", samples=2, band_samples=1)
    options.update(overrides)
    return CollectConfig(**options)


# -- the reference: each family's modules, written out here, independent of collect's adapters ------------

def mlp_module(layer: torch.nn.Module) -> torch.nn.Module:
    """The decoder layer's MLP or MoE block, by the family's own attribute name."""
    for name in ("block_sparse_moe", "feed_forward", "mlp"):
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return getattr(layer, name)
    raise AssertionError(f"no MLP in {type(layer).__name__}")


def dense_values(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, in)`` of a dense gated MLP (or shared expert) at ``x``, as its forward computes them."""
    if hasattr(mlp, "input_linear"):  # Granite's fused shared MLP: [gate | in] halves
        return mlp.input_linear(x).chunk(2, dim=-1)
    gate = mlp.gate_proj(x) * getattr(mlp, "gate_multiplier", 1.0)  # Falcon-H1 scales gate
    return gate, mlp.up_proj(x)


def expert_values(block: torch.nn.Module, x: torch.Tensor, seen: dict) -> dict[int, tuple]:
    """Per expert: ``(tokens, gate, in)`` of the tokens routed to it, from the block's input ``x`` [T, D] and
    the routing its own router made (``seen``: what the experts or the router were called with / returned)."""
    out = {}
    if hasattr(block, "input_linear"):  # JetMoE: the router's pairs, sorted by expert
        _, token, _, sizes, _ = seen["router"]
        weight = block.input_linear.weight
        start = 0
        for e, n in enumerate(sizes):
            t = token[start:start + n]
            start += n
            gate, in_ = (x[t] @ weight[e].T).chunk(2, dim=-1)
            out[e] = (t, gate, in_)
        return out
    experts = block.experts
    if "router_scores" in seen:  # Llama 4: every expert sees each token scaled by its score (0: not routed)
        scores = seen["router_scores"]
        for e in range(experts.gate_up_proj.shape[0]):
            t = torch.nonzero(scores[:, e] > 0).squeeze(1)
            gate, in_ = ((x[t] * scores[t, e, None]) @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            out[e] = (t, gate, in_)
        return out
    index = seen["top_k_index"]
    for e in range(experts.gate_up_proj.shape[0]):
        t = torch.nonzero((index == e).any(dim=-1)).squeeze(1)
        if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: interleaved, biased, clamped, in + 1
            raw = x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate = raw[:, ::2].clamp(max=experts.limit)
            in_ = raw[:, 1::2].clamp(-experts.limit, experts.limit) + 1
        elif getattr(experts, "is_transposed", False):
            gate, in_ = (x[t] @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        else:
            gate, in_ = (x[t] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        out[e] = (t, gate, in_)
    return out


class Reference:
    """Per (layer, expert or None): the counted positions' ``(doc, pos, gate, in)``, recomputed one document
    at a time from each block's input (a forward pre-hook) and the family's modules, refactor_glu's flips
    applied from the file."""

    def __init__(self, folder: Path, f: ActivationsFile) -> None:
        model, _ = load_hf(str(folder), torch.float32)
        stack = model.model.layers
        first = first_counted_position(f.attrs)
        self.values: dict[tuple, list] = {}
        inputs: dict[int, torch.Tensor] = {}
        seen: dict[int, dict] = {}
        handles = []
        layers = sorted(set(f.layers) | set(f.expert_layers))
        for index in layers:
            block = mlp_module(stack[index])
            handles.append(block.register_forward_pre_hook(lambda m, a, i=index: inputs.__setitem__(i, a[0])))
            seen[index] = {}
            experts = getattr(block, "experts", None)
            if isinstance(experts, torch.nn.Module) and getattr(experts, "gate_up_proj", None) is not None:
                if hasattr(block, "router") and not hasattr(experts, "has_gate"):  # Llama 4
                    handles.append(block.router.register_forward_hook(
                        lambda m, a, o, i=index: seen[i].__setitem__("router_scores", o[0])))
                else:
                    handles.append(experts.register_forward_pre_hook(
                        lambda m, a, i=index: seen[i].__setitem__("top_k_index", a[1])))
            elif hasattr(block, "input_linear") and hasattr(block, "router"):  # JetMoE
                handles.append(block.router.register_forward_hook(
                    lambda m, a, o, i=index: seen[i].__setitem__("router", o)))
        flipped = {}
        for layer in f.layers:
            flipped[layer, None] = f.weights("flipped")[f.row(layer)]
        for (layer, expert) in f.expert_rows:
            flipped[layer, expert] = np.array([f.neuron(layer, n, expert=expert, windows=False).flipped
                                               for n in range(f.expert_neurons(expert))])
        with torch.inference_mode():
            for doc in range(f.n_docs):
                model(torch.tensor(f.document(doc), dtype=torch.long)[None], use_cache=False)
                for layer in layers:
                    x = inputs[layer].reshape(-1, inputs[layer].shape[-1])
                    block = mlp_module(stack[layer])
                    found = {}
                    if layer in f.layers:
                        found[None] = (torch.arange(len(x)), *dense_values(block, x))
                    else:
                        found.update(expert_values(block, x, seen[layer]))
                        shared = (getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
                                  or getattr(stack[layer], "shared_mlp", None))
                        if shared is not None:
                            found["s"] = (torch.arange(len(x)), *dense_values(shared, x))
                    for expert, (t, gate, in_) in found.items():
                        sign = np.where(flipped[layer, expert], -1.0, 1.0)
                        keep = (t >= first).numpy()
                        self.values.setdefault((layer, expert), []).append(
                            (doc, t.numpy()[keep], gate.numpy()[keep], in_.numpy()[keep] * sign))
        for handle in handles:
            handle.remove()

    def check(self, f: ActivationsFile) -> None:
        """Counts, in-sums, gate and in extremes per case, routed counts and the in top-k lists."""
        for (layer, expert), parts in self.values.items():
            gate = np.concatenate([p[2] for p in parts])
            in_ = np.concatenate([p[3] for p in parts])
            cases = [(gate > 0) & (in_ > 0), (gate > 0) & (in_ < 0), (gate < 0) & (in_ > 0), (gate < 0) & (in_ < 0)]
            n = gate.shape[1]
            data = [f.neuron(layer, i, expert=expert, windows=False) for i in range(n)]
            what = str((layer, expert))
            if expert is not None:
                assert f.routed[layer, expert] == len(gate), what
            # A recomputation on one document at a time (the run pads documents into batches) may differ in the
            # last bits: only a value that close to zero may change its sign, and so its case.
            scale = max(float(np.abs(gate).max()), float(np.abs(in_).max()), 1.0)
            near_zero = ((np.abs(gate) < 1e-5 * scale) | (np.abs(in_) < 1e-5 * scale)).sum(0)
            difference = np.abs(np.stack([d.count for d in data]) - np.stack([c.sum(0) for c in cases], -1)).sum(1)
            assert (difference <= 2 * near_zero).all(), (what, difference, near_zero)
            same = difference == 0  # (a position that changed case moved its value to another case)
            assert same.mean() > 0.9, (what, difference)
            np.testing.assert_allclose(np.stack([d.sum[:, IN] for d in data])[same],
                                       np.stack([(c * in_).sum(0) for c in cases], -1)[same], rtol=1e-4, atol=1e-4,
                                       err_msg=what)
            for c, mask in enumerate(cases):
                some = mask.any(0) & same
                for hook, v in ((GATE, gate), (IN, in_)):
                    np.testing.assert_allclose([d.min[c, hook] for d, s in zip(data, some) if s],
                                               np.where(mask, v, np.inf).min(0)[some], rtol=1e-4, atol=1e-5)
                    np.testing.assert_allclose([d.max[c, hook] for d, s in zip(data, some) if s],
                                               np.where(mask, v, -np.inf).max(0)[some], rtol=1e-4, atol=1e-5)
                # The in lists: the k documents with the largest |in| among their positions of the case.
                best = np.full((f.n_docs, n), -1.0)
                for doc, _, g, i in parts:
                    m = [(g > 0) & (i > 0), (g > 0) & (i < 0), (g < 0) & (i > 0), (g < 0) & (i < 0)][c]
                    best[doc] = np.maximum(best[doc], np.where(m, np.abs(i), -1.0).max(0) if len(i) else -1.0)
                for i, d in enumerate(data):
                    if not same[i]:
                        continue
                    expected = np.sort(best[:, i][best[:, i] >= 0])[::-1][: f.k]
                    got = d.top_value[c, IN][d.top_doc[c, IN] >= 0]
                    if len(got) == len(expected):  # (a list may differ where a case count does, near zero)
                        np.testing.assert_allclose(np.abs(got), expected, rtol=1e-4, atol=1e-5,
                                                   err_msg=f"{what} {i} {c}")


@pytest.mark.parametrize("arch", tiny.NEW_FAMILIES)
def test_family_against_its_own_modules(arch, model_factory, corpus_files, tmp_path):
    """Each family of issue 18 (and gpt-oss): every recorded layer's dense, routed and shared neurons, their
    routed counts, case counts, sums, extremes and top-k lists, as the family's own modules give them on each
    document; its pages build (with the family's definition of the hooks where it has one)."""
    from mkdocs_gluscope.pages import write_markdown_pages

    folder = model_factory(arch, 2)
    out = collect(small_config(folder, corpus_files, tmp_path / f"{arch}.h5"))
    with ActivationsFile(out) as f:
        assert f.layers or f.expert_rows
        Reference(folder, f).check(f)
        ids = [f"{f.layers[-1]}.0"] if f.layers else []
        ids += [f"{layer}.{'s' if e == 's' else f'e{e}'}.1" for layer, e in sorted(f.expert_rows, key=str)[-2:]]
        defined = {"dense": "hook_definition" in f.attrs, "routed": "expert_hook_definition" in f.attrs}
    pages = write_markdown_pages(out, ids, tmp_path / "pages")
    texts = {p.read_text().splitlines()[0]: p.read_text() for p in pages if p.name.startswith("N")}
    assert len(texts) == len(ids)
    for title, text in texts.items():  # the family's own definition of the hooks, on its neurons' pages
        kind = "dense" if title.count(".") == 1 else "shared" if ".s." in title else "routed"
        assert ("Hooks of this family" in text) == defined.get(kind, False), title
    # The light layout publishes every neuron of the file, each listed one with its page.
    (tmp_path / "light" / "data").mkdir(parents=True)
    shutil.copy(out, tmp_path / "light" / "data" / "act.h5")
    site = build_site(tmp_path / "light", {"activations": "data/act.h5", "neurons": "all", "layout": "light"})
    for neuron_id in ids:
        layer, *expert, n = neuron_id.split(".")
        folder = "/".join([f"L{layer}"] + [("S" if e == "s" else f"E{e[1:]}") for e in expert] + [f"N{n}"])
        page = (site / "neurons" / folder / "index.html").read_text(encoding="utf-8")
        assert f"Neuron {neuron_id}" in page, neuron_id


def test_nemotron_h_is_refused_as_not_gated(model_factory, corpus_files, tmp_path, capsys):
    """Nemotron-H's MLPs and experts compute relu2(up·x): no gate, no four cases. One line says so."""
    from mkdocs_gluscope.cli import main

    folder = model_factory("nemotronh", 2)
    capsys.readouterr()
    code = main(["collect", "--model", str(folder), "--dataset", str(corpus_files[0]),
                 "--out", str(tmp_path / "n.h5"), "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().err
    last = text.strip().splitlines()[-1]  # (after transformers' own loading bar)
    assert code == 2 and last.startswith("gluscope: error: model class NemotronHForCausalLM has no gated MLP")
    assert "relu2" in last and "Traceback" not in text


def test_llama4_language_tower_of_the_multimodal_model(model_factory):
    """Llama4ForConditionalGeneration: its language model's dense and MoE layers are found inside the
    wrapper (the vision tower left alone), as for the text model."""
    import transformers

    from collect.architectures import MoELayer, locate

    tokenizer = tiny.train_tokenizer(Path(model_factory("llama4", 2)) / "tok", bos=True)
    text = tiny.tiny_config("llama4", tokenizer, layers=2, d_model=32, d_mlp=48)
    vision = transformers.Llama4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14,
                                             vision_output_dim=16, projector_input_dim=16, projector_output_dim=32,
                                             pixel_shuffle_ratio=0.5)
    config = transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=len(tokenizer))
    model = transformers.AutoModelForImageTextToText.from_config(config)
    found = locate(model, None)
    assert found.layers_path == "language_model.model.layers" or found.layers_path.endswith("language_model.layers")
    assert isinstance(found.layers[1], MoELayer) and not isinstance(found.layers[0], MoELayer)
    with pytest.raises(GluscopeError, match="--layers \\[5\\]"):
        locate(model, [5])


def test_layers_without_an_mlp_are_skipped_by_name(model_factory, corpus_files, tmp_path, capsys):
    """A hybrid stack's layer that holds only a mixer (attention or state space), here Jamba's first layer with
    its feed-forward taken out: skipped when --layers does not name it (the file's skipped_layers, listed by
    gluscope info), one clear error when it does; info lists the layers that hold neurons."""
    from collect.architectures import locate
    from collect.model import prepare_model
    from mkdocs_gluscope.cli import main

    model, tokenizer = load_hf(str(model_factory("jamba", 2)), torch.float32)
    del model.model.layers[0].feed_forward
    found = locate(model, None)
    assert found.skipped == [0] and list(found.layers) == [1]
    with pytest.raises(GluscopeError, match="layer 0's MLP was not found"):
        locate(model, [0])
    loaded, _ = prepare_model(model, tokenizer)
    assert loaded.skipped == [0]
    out = collect(small_config(model_factory("jamba", 2), corpus_files, tmp_path / "jamba.h5"))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "with neurons: 0, 1 of 2 model layers" in capsys.readouterr().out
