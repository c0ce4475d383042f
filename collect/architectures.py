"""Where a model keeps each layer's gated MLP: TransformerLens' architecture adapters decide.

TransformerLens 4 ships an adapter for each architecture it supports (``ArchitectureAdapterFactory``),
whose ``component_mapping`` names the decoder layers (``blocks``: ``model.layers``, or
``model.language_model.layers`` in a multimodal wrapper) and each layer's MLP as a bridge
component: ``GatedMLPBridge`` (gate/in/out submodules), ``JointGateUpMLPBridge`` (one fused gate/up
projection and the family's split function) or ``MoEBridge`` (a router, experts, shared experts;
on the dense layers of an interleaved stack, dense gate/in/out projections). We read that mapping
instead of keeping name rules of our own, and still hook the Hugging Face modules directly (the
fast path): booting a ``TransformerBridge`` would run attention eagerly.

Only the layers asked for are inspected, so ``--layers`` can pick the dense layers of a model whose
other layers we could not record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mkdocs_gluscope.errors import GluscopeError

#: Attribute names of an MLP's activation, in the order JointGateUpMLPBridge looks for them.
ACT_ATTRS = ("activation_fn", "act_fn", "act", "activation")


@dataclass
class GatedMLP:
    """One set of gated neurons: a dense layer's MLP, a shared expert, or one routed expert.

    The weights are views of the model's own parameters, so :func:`collect.model.refactor_glu`
    edits the model in place. ``gate``/``up``/``down`` are the modules the ``hf`` engine hooks
    (None for a routed expert, whose values :mod:`collect.moe` computes from what the experts saw).
    """

    w_gate: torch.Tensor  # [d_mlp, d_model]
    w_in: torch.Tensor  # [d_mlp, d_model]
    w_out: torch.Tensor  # [d_model, d_mlp]
    b_gate: torch.Tensor | None
    b_in: torch.Tensor | None
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gate: torch.nn.Module | None = None  # output: gate, or [gate | in] when ``fused``
    up: torch.nn.Module | None = None  # output: in (None when fused)
    down: torch.nn.Module | None = None  # input: act(gate) * in
    fused: bool = False

    @property
    def d_mlp(self) -> int:
        return self.w_gate.shape[0]

    def split(self, fused_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, in)`` from a fused projection's output: the first half is gate, the second in,
        the rule every JointGateUpMLPBridge family uses (checked when the layer is located)."""
        d = self.d_mlp
        return fused_output[..., :d], fused_output[..., d:]


@dataclass
class MoELayer:
    """A mixture-of-experts layer: routed experts kept as fused 3-D tensors (transformers 5), an
    optional shared expert that sees every token, the experts module whose call (hidden states and
    routing) and the activation module whose input and output (``gate`` with ``in`` beside it,
    ``act(gate)``) :mod:`collect.moe` reads."""

    block: torch.nn.Module  # the whole MoE block: its forward hook fires once experts and shared expert ran
    experts_module: torch.nn.Module
    experts: list[GatedMLP]
    shared: GatedMLP | None
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    act_module: torch.nn.Module | None = None  # the experts' activation, called on their [gate | in] rows' gate

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def d_expert(self) -> int:
        return self.experts[0].d_mlp


@dataclass
class Located:
    """The requested layers of a model, as found through its TransformerLens adapter."""

    adapter: str  # the adapter's class name, for messages and provenance
    layers_path: str  # e.g. model.language_model.layers
    n_layers: int
    layers: dict[int, GatedMLP | MoELayer] = field(default_factory=dict)


def _architecture(hf_model: Any) -> str:
    """The name TransformerLens' adapter registry knows the model by: its class, or failing that the
    config's ``architectures`` (a model built from a bare config lacks the latter)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    known = ArchitectureAdapterFactory._adapters
    name = type(hf_model).__name__
    if name in known:
        return name
    for candidate in getattr(hf_model.config, "architectures", None) or []:
        if candidate in known:
            return candidate
    return name


def adapter_for(hf_model: Any) -> Any:
    """TransformerLens' architecture adapter of a loaded model; a GluscopeError if it has none."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf

    arch = _architecture(hf_model)
    if arch not in ArchitectureAdapterFactory._adapters:
        raise GluscopeError(
            f"model class {type(hf_model).__name__} has no TransformerLens architecture adapter, so gluscope "
            "cannot tell where its MLP is; supported: gated-MLP architectures TransformerLens knows, such as "
            "Llama, OLMo, Gemma, Mistral, Qwen, Phi-3, Mixtral, OLMoE, DeepSeek-V2")
    dtype = next(hf_model.parameters()).dtype
    try:
        config = build_bridge_config_from_hf(hf_model.config, arch, "model", dtype)
        return ArchitectureAdapterFactory.select_architecture_adapter(config)
    except Exception as e:  # an adapter that cannot read this config: one line, not a traceback
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise GluscopeError(f"model class {type(hf_model).__name__}: TransformerLens' adapter for {arch} could not "
                            f"be set up from its config ({type(e).__name__}: {first})") from None


def _act_fn(module: torch.nn.Module, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    for attr in ACT_ATTRS:
        candidate = getattr(module, attr, None)
        if callable(candidate):
            return candidate
    raise GluscopeError(f"{where} ({type(module).__name__}) has no activation function "
                        f"({', '.join(ACT_ATTRS)}); gluscope needs it to compute act(gate)")


def _sub(module: torch.nn.Module, name: str | None) -> torch.nn.Module | None:
    if not name:
        return None
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _children(module: torch.nn.Module) -> str:
    return ", ".join(name for name, _ in module.named_children()) or "none"


def _dense(mlp: torch.nn.Module, gate: torch.nn.Module, up: torch.nn.Module, down: torch.nn.Module,
           where: str) -> GatedMLP:
    return GatedMLP(w_gate=gate.weight, w_in=up.weight, w_out=down.weight,
                    b_gate=getattr(gate, "bias", None), b_in=getattr(up, "bias", None),
                    act_fn=_act_fn(mlp, where), gate=gate, up=up, down=down)


def _fused(bridge: Any, mlp: torch.nn.Module, where: str) -> GatedMLP:
    """A fused gate/up projection, split by the family's own rule (the adapter's split function),
    which must amount to halves, gate first: that is the rule our one hook on the fused output uses."""
    fused = _sub(mlp, bridge.fused_attr)
    out = _sub(mlp, bridge.submodules["out"].name) if "out" in bridge.submodules else None
    if fused is None or out is None:
        raise GluscopeError(f"{where} ({type(mlp).__name__}, modules [{_children(mlp)}]) lacks the fused "
                            f"projection {bridge.fused_attr!r} or the down projection its adapter names")
    with torch.no_grad():
        gate_lin, up_lin = bridge.split_gate_up_matrix(mlp)
    weight = fused.weight
    d = weight.shape[0] // 2
    if not (torch.equal(gate_lin.weight, weight[:d]) and torch.equal(up_lin.weight, weight[d:])):
        raise GluscopeError(f"{where}: the family's split of {bridge.fused_attr} is not [gate | in] halves; "
                            "gluscope hooks fused projections split that way only")
    bias = getattr(fused, "bias", None)
    return GatedMLP(w_gate=weight[:d], w_in=weight[d:], w_out=out.weight,
                    b_gate=None if bias is None else bias[:d], b_in=None if bias is None else bias[d:],
                    act_fn=_act_fn(mlp, where), gate=fused, up=None, down=out, fused=True)


def _batched_experts(mlp: torch.nn.Module) -> torch.nn.Module | None:
    from transformer_lens.model_bridge.generalized_components.moe import has_batched_experts

    found = [child for _, child in mlp.named_children() if has_batched_experts(child)]
    return found[0] if len(found) == 1 else None


def _moe(bridge: Any, mlp: torch.nn.Module, where: str) -> GatedMLP | MoELayer:
    from transformer_lens.model_bridge.generalized_components import GatedMLPBridge

    subs = bridge.submodules
    # Dense layer of an interleaved stack: the adapter declares the dense projections and the module
    # has them (MoEBridge's own positive detection).
    dense = [_sub(mlp, subs[key].name) if key in subs else None for key in ("dense_gate", "dense_in", "dense_out")]
    if all(m is not None for m in dense):
        return _dense(mlp, *dense, where=where)
    experts = _batched_experts(mlp)
    if experts is None:
        raise GluscopeError(
            f"{where} is a mixture-of-experts block ({type(mlp).__name__}, modules [{_children(mlp)}]) whose "
            "experts are not kept as batched 3-D gate_up_proj/down_proj tensors; gluscope reads experts in "
            "that layout only (transformers 5)")
    params = {name: tuple(p.shape) for name, p in experts.named_parameters()}
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    layout_ok = (set(params) == {"gate_up_proj", "down_proj"} and gate_up.ndim == 3 and down.ndim == 3
                 and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
                 and gate_up.shape[2] == down.shape[1]
                 and any(callable(getattr(experts, a, None)) for a in ACT_ATTRS))
    if not layout_ok:
        found = ", ".join(f"{name} {list(shape)}" for name, shape in params.items())
        raise GluscopeError(
            f"{where}: its experts ({type(experts).__name__}: {found}) are not gate_up_proj [E, 2I, D] and "
            "down_proj [E, D, I] with an act_fn and no biases; gluscope records experts computing "
            "down(act(gate) * in) only (gpt-oss's interleaved, biased, clamped experts are not)")
    n_experts, two_d, d_model = gate_up.shape
    d = two_d // 2
    act = _act_fn(experts, where + " experts")
    if not isinstance(act, torch.nn.Module):
        raise GluscopeError(f"{where}: its experts' activation is a plain function ({act!r}), not a module gluscope "
                            "can hook to read gate and in where the experts computed them")
    routed = [GatedMLP(w_gate=gate_up[e, :d], w_in=gate_up[e, d:], w_out=down[e], b_gate=None, b_in=None,
                       act_fn=act) for e in range(n_experts)]
    shared = None
    for key, sub in subs.items():
        if isinstance(sub, GatedMLPBridge) and key.startswith("shared"):
            module = _sub(mlp, sub.name)
            if module is not None:
                parts = [_sub(module, sub.submodules[k].name) for k in ("gate", "in", "out")]
                if any(p is None for p in parts):
                    raise GluscopeError(f"{where}'s shared expert lacks gate/in/out projections "
                                        f"(modules [{_children(module)}])")
                shared = _dense(module, *parts, where=f"{where} shared expert")
    from collect.moe import check_experts

    layer = MoELayer(block=mlp, experts_module=experts, experts=routed, shared=shared, act_fn=act, act_module=act)
    check_experts(layer, where)
    return layer


def locate(hf_model: Any, layers: list[int] | None) -> Located:
    """Each requested layer's gated MLP (all layers when ``layers`` is None); a GluscopeError that
    names what was found where a layer has none we can record."""
    from transformer_lens.model_bridge.generalized_components import (
        GatedMLPBridge,
        JointGateUpMLPBridge,
        MoEBridge,
    )

    adapter = adapter_for(hf_model)
    name = type(adapter).__name__
    model_class = type(hf_model).__name__
    mapping = adapter.component_mapping or {}
    blocks = mapping.get("blocks")
    stack = _sub(hf_model, getattr(blocks, "name", None)) if blocks is not None else None
    if stack is None or not isinstance(stack, torch.nn.ModuleList):
        raise GluscopeError(f"model class {model_class}: its TransformerLens adapter {name} names no list of "
                            "decoder layers; gluscope supports gated-MLP language models")
    n_layers = len(stack)
    if layers is None:
        layers = list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise GluscopeError(f"--layers {bad}: this model has layers 0..{n_layers - 1}")
    bridge = blocks.submodules.get("mlp")
    found = Located(adapter=name, layers_path=blocks.name, n_layers=n_layers)
    for index in sorted(set(layers)):
        where = f"model class {model_class} ({name}): layer {index}'s MLP"
        mlp = _sub(stack[index], getattr(bridge, "name", None))
        if mlp is None:
            raise GluscopeError(f"{where} was not found (modules [{_children(stack[index])}]); gluscope needs "
                                "a gated MLP")
        if isinstance(bridge, JointGateUpMLPBridge):
            found.layers[index] = _fused(bridge, mlp, where)
        elif isinstance(bridge, GatedMLPBridge):
            parts = [_sub(mlp, bridge.submodules[k].name) if k in bridge.submodules else None
                     for k in ("gate", "in", "out")]
            if any(p is None for p in parts):
                raise GluscopeError(f"{where} is {type(mlp).__name__} with modules [{_children(mlp)}], not the "
                                    "gate/in/out its adapter names")
            found.layers[index] = _dense(mlp, *parts, where=where)
        elif isinstance(bridge, MoEBridge):
            found.layers[index] = _moe(bridge, mlp, where)
        else:
            raise GluscopeError(
                f"model class {model_class} has no gated MLP: layer {index}'s MLP is {type(mlp).__name__} with "
                f"modules [{_children(mlp)}] ({type(bridge).__name__} in TransformerLens' {name}); gluscope "
                "needs a gated MLP, act(gate) * in (Llama, OLMo, Gemma, Mistral, Qwen, Phi-3, Mixtral, OLMoE, ...)")
    return found
