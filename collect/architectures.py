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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
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
    #: refactor_glu may flip these neurons (False where negating w_in does not negate in: gpt-oss's in + 1)
    refactor: bool = True
    #: where set, gate is read as this module's input instead of the gate projection's output (a family
    #: that scales gate before its activation: Falcon-H1)
    act_module: torch.nn.Module | None = None
    definition: str | None = None  # how this family's hooks differ from the plain gate, in, post (pages say it)
    #: the MLP module the projections and the activation were read from (None for a routed expert)
    module: torch.nn.Module | None = None

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

    block: torch.nn.Module  # the whole MoE block
    experts_module: torch.nn.Module
    experts: list[GatedMLP]
    shared: GatedMLP | None
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    act_module: torch.nn.Module | None = None  # the experts' activation, called on their [gate | in] rows' gate
    #: where each row's (token, expert) comes from: "call" (experts(hidden, top_k_index, weights)),
    #: "scores" (the router's [tokens, experts] scores, every expert on every token: Llama 4), "sorted"
    #: (the router's pairs sorted by expert: JetMoE)
    routing: str = "call"
    router: torch.nn.Module | None = None
    #: the family's own values of the experts' rows (gpt-oss), read in its ``_apply_gate``; None: the
    #: activation's input is gate, the first half of each [gate | in] row
    rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    act_name: str | None = None  # the activation pages compute act(gate) with, where not the model's own
    definition: str | None = None  # how this family's hooks differ from the plain gate, in, post (pages say it)
    done: torch.nn.Module | None = None  # whose forward hook fires once experts and shared expert ran (block)
    top_k: int | None = None  # experts per token (the model's num_experts_per_tok), for the memory plan

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
    skipped: list[int] = field(default_factory=list)  # layers without an MLP (attention or state-space only)


def _architecture(hf_model: Any) -> str:
    """The name TransformerLens' adapter registry knows the model by: its class, or failing that the
    config's ``architectures`` (a model built from a bare config lacks the latter)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    known = ArchitectureAdapterFactory._adapters
    # TransformerLens may spell a class otherwise than transformers does (PhiMoEForCausalLM for
    # transformers' PhimoeForCausalLM): compare without case.
    by_lower = {key.lower(): key for key in known}
    name = type(hf_model).__name__
    for candidate in [name, *(getattr(hf_model.config, "architectures", None) or [])]:
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
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
    multiplier = getattr(mlp, "gate_multiplier", None)
    if multiplier is not None:  # Falcon-H1: act(gate_proj(x) * gate_multiplier) * up_proj(x)
        act = _act_module(mlp, where)
        bias = getattr(gate, "bias", None)
        return GatedMLP(w_gate=gate.weight * multiplier, w_in=up.weight, w_out=down.weight,
                        b_gate=None if bias is None else bias * multiplier, b_in=getattr(up, "bias", None),
                        act_fn=act, gate=gate, up=up, down=down, act_module=act, module=mlp,
                        definition=f"Falcon-H1: gate = (x·w_gate)·{multiplier:g} (its gate_multiplier), the value "
                                   "its activation reads")
    return GatedMLP(w_gate=gate.weight, w_in=up.weight, w_out=down.weight,
                    b_gate=getattr(gate, "bias", None), b_in=getattr(up, "bias", None),
                    act_fn=_act_fn(mlp, where), gate=gate, up=up, down=down, module=mlp)


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
    return _fused_halves(mlp, fused, out, where)


def _fused_halves(mlp: torch.nn.Module, fused: torch.nn.Module, out: torch.nn.Module, where: str) -> GatedMLP:
    """A fused projection whose output is ``[gate | in]`` halves (as :func:`_fused` checked)."""
    weight = fused.weight
    d = weight.shape[0] // 2
    bias = getattr(fused, "bias", None)
    return GatedMLP(w_gate=weight[:d], w_in=weight[d:], w_out=out.weight,
                    b_gate=None if bias is None else bias[:d], b_in=None if bias is None else bias[d:],
                    act_fn=_act_fn(mlp, where), gate=fused, up=None, down=out, fused=True, module=mlp)


def _batched_experts(mlp: torch.nn.Module) -> torch.nn.Module | None:
    from transformer_lens.model_bridge.generalized_components.moe import has_batched_experts

    found = [child for _, child in mlp.named_children() if has_batched_experts(child)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class GptOssValues:
    """gpt-oss's experts (``GptOssExperts._apply_gate``): interleaved ``[g0, u0, g1, u1, ...]`` rows
    with biases, and ``(clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
    ``g = min(g, limit)``. gluscope's hooks are the values the experts multiply: ``gate`` is the
    clamped ``g``, ``in`` the clamped ``u`` plus one, ``act(gate) = gate * sigmoid(alpha * gate)``
    (``quick_gelu`` for gpt-oss's alpha 1.702), ``post = act(gate) * in``: the same operations on the
    same tensors as the model, so the same bits."""

    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate = gate_up[..., ::2].clamp(min=None, max=self.limit)
        in_ = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit) + 1
        return gate, in_, gate * torch.sigmoid(gate * self.alpha)

    @property
    def definition(self) -> str:
        return (f"gpt-oss experts: gate = min(x·w_gate + b_gate, {self.limit:g}), in = clamp(x·w_in + b_in, "
                f"±{self.limit:g}) + 1, act(gate) = gate·σ({self.alpha:g}·gate), post = act(gate)·in (what the "
                "expert's down projection reads); the cases are the signs of this gate and in. refactor_glu "
                "flips no gpt-oss expert neuron (negating w_in does not negate in + 1)")


def _experts_weights(experts: torch.nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``gate_up_proj`` and ``down_proj`` of batched experts and whether they are stored transposed
    (``[E, D, 2I]``/``[E, I, D]``, as transformers' experts interface says, else by their shapes);
    a GluscopeError naming what was found for another layout."""
    params = {name: tuple(p.shape) for name, p in experts.named_parameters()}
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    biased = {"gate_up_proj_bias", "down_proj_bias"} <= set(params)
    names_ok = set(params) == {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if biased else set())
    shapes_ok = names_ok and gate_up.ndim == 3 and down.ndim == 3 and gate_up.shape[0] == down.shape[0]
    as_stored = shapes_ok and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    as_transposed = shapes_ok and gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # not in transformers' experts interface: the shapes tell (they cannot fit both)
        transposed = as_transposed
    plain = as_transposed if transposed else as_stored
    if not plain or getattr(experts, "has_gate", True) is False:
        found = ", ".join(f"{name} {list(shape)}" for name, shape in params.items())
        raise GluscopeError(
            f"{where}: its experts ({type(experts).__name__}: {found}) are not gated experts with gate_up_proj "
            "[E, 2I, D] (or [E, D, 2I]) and down_proj [E, D, I] (or [E, I, D]); gluscope records experts computing "
            "down(act(gate) * in)")
    return gate_up, down, bool(transposed)


def _act_module(module: torch.nn.Module, where: str) -> torch.nn.Module:
    act = _act_fn(module, where)
    if not isinstance(act, torch.nn.Module):
        raise GluscopeError(f"{where}: its activation is a plain function ({act!r}), not a module gluscope can hook "
                            "to read gate and in where the experts computed them")
    return act


def _routed_experts(mlp: torch.nn.Module, where: str) -> MoELayer | None:
    """The routed experts of one MoE block, by the layout their family keeps them in (one place per
    family): batched 3-D tensors run by transformers' experts interface (Mixtral, OLMoE, Qwen-MoE,
    DeepSeek, GLM-4-MoE, PhiMoE, Granite-MoE, Jamba, Qwen3-Next; gpt-oss with its own values),
    Llama 4's experts on score-scaled tokens, JetMoE's parallel experts; None if none is found."""
    experts = _batched_experts(mlp)
    if experts is None:
        parts = [getattr(mlp, name, None) for name in ("input_linear", "output_linear", "router")]
        if all(isinstance(p, torch.nn.Module) for p in parts) and all(
                getattr(p, "weight", torch.empty(0)).ndim == 3 for p in parts[:2]):
            return _jetmoe_experts(mlp, where)
        return None
    gate_up, down, transposed = _experts_weights(experts, where)
    n_experts = gate_up.shape[0]
    if transposed:  # [E, D, 2I]: views of each expert's columns as [I, D] rows
        d = gate_up.shape[2] // 2
        ups, outs = [gate_up[e].T for e in range(n_experts)], [down[e].T for e in range(n_experts)]
    else:
        d = gate_up.shape[1] // 2
        ups, outs = [gate_up[e] for e in range(n_experts)], [down[e] for e in range(n_experts)]
    common = dict(block=mlp, experts_module=experts)
    if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: interleaved [g, u] columns, biases, its own _apply_gate
        alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
        if alpha is None or limit is None or "_apply_gate" not in type(experts).__dict__:
            raise GluscopeError(f"{where}: its experts ({type(experts).__name__}) have biases but not gpt-oss's "
                                "_apply_gate, alpha and limit; gluscope does not know which values they multiply")
        values = GptOssValues(float(alpha), float(limit))
        bias = experts.gate_up_proj_bias
        routed = [GatedMLP(w_gate=ups[e][0::2], w_in=ups[e][1::2], w_out=outs[e], b_gate=bias[e][0::2],
                           b_in=bias[e][1::2], act_fn=lambda g, v=values: g * torch.sigmoid(g * v.alpha),
                           refactor=False) for e in range(n_experts)]
        return MoELayer(**common, experts=routed, shared=None, act_fn=routed[0].act_fn, rows=values,
                        act_name="quick_gelu" if alpha == 1.702 else f"gpt-oss alpha {alpha}",
                        definition=values.definition)
    act = _act_module(experts, where + " experts")
    routed = [GatedMLP(w_gate=ups[e][:d], w_in=ups[e][d:], w_out=outs[e], b_gate=None, b_in=None, act_fn=act)
              for e in range(n_experts)]
    if getattr(experts, "has_gate", None) is None and isinstance(getattr(mlp, "router", None), torch.nn.Module):
        # Llama 4: experts(tokens) on every token, each scaled by its routing score (0 where not routed)
        return MoELayer(**common, experts=routed, shared=None, act_fn=act, act_module=act, routing="scores",
                        router=mlp.router,
                        definition="Llama 4 experts see each routed token scaled by its routing score "
                                   "(σ of the router's logit): gate and in are the expert's values on the scaled token")
    return MoELayer(**common, experts=routed, shared=None, act_fn=act, act_module=act)


def _jetmoe_experts(mlp: torch.nn.Module, where: str) -> MoELayer:
    """JetMoE's parallel experts: ``input_linear`` [E, 2I, D] computes ``[gate | in]`` of the tokens
    the router sorted by expert, ``activation`` their act(gate), ``output_linear`` [E, D, I] reads post."""
    up, out = mlp.input_linear.weight, mlp.output_linear.weight
    if not (up.shape[0] == out.shape[0] and up.shape[1] == 2 * out.shape[2] and up.shape[2] == out.shape[1]):
        raise GluscopeError(f"{where}: its input_linear {list(up.shape)} and output_linear {list(out.shape)} are "
                            "not [E, 2I, D] and [E, D, I]")
    d = up.shape[1] // 2
    act = _act_module(mlp, where)
    routed = [GatedMLP(w_gate=up[e, :d], w_in=up[e, d:], w_out=out[e], b_gate=None, b_in=None, act_fn=act)
              for e in range(up.shape[0])]
    return MoELayer(block=mlp, experts_module=mlp.input_linear, experts=routed, shared=None, act_fn=act,
                    act_module=act, routing="sorted", router=mlp.router)


def _shared_expert(bridge: Any, mlp: torch.nn.Module, where: str) -> GatedMLP | None:
    from transformer_lens.model_bridge.generalized_components import GatedMLPBridge

    for key, sub in bridge.submodules.items():
        if isinstance(sub, GatedMLPBridge) and key.startswith("shared"):
            module = _sub(mlp, sub.name)
            if module is not None:
                parts = [_sub(module, sub.submodules[k].name) for k in ("gate", "in", "out")]
                if any(p is None for p in parts):
                    raise GluscopeError(f"{where}'s shared expert lacks gate/in/out projections "
                                        f"(modules [{_children(module)}])")
                return _dense(module, *parts, where=f"{where} shared expert")
    # An adapter that does not declare the block's shared expert (GLM-4-MoE): found by the name the
    # families give it, with the plain gated projections.
    for name in ("shared_experts", "shared_expert"):
        module = getattr(mlp, name, None)
        parts = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if isinstance(module, torch.nn.Module) and all(isinstance(p, torch.nn.Linear) for p in parts):
            return _dense(module, *parts, where=f"{where} shared expert")
    return None


def _moe(bridge: Any, mlp: torch.nn.Module, where: str) -> GatedMLP | MoELayer:
    subs = bridge.submodules
    # Dense layer of an interleaved stack: the adapter declares the dense projections and the module
    # has them (MoEBridge's own positive detection).
    dense = [_sub(mlp, subs[key].name) if key in subs else None for key in ("dense_gate", "dense_in", "dense_out")]
    if all(m is not None for m in dense):
        return _dense(mlp, *dense, where=where)
    layer = _routed_experts(mlp, where)
    if layer is None:
        raise GluscopeError(
            f"{where} is a mixture-of-experts block ({type(mlp).__name__}, modules [{_children(mlp)}]) whose "
            "experts are not kept as batched 3-D gate_up_proj/down_proj tensors nor as JetMoE's parallel experts; "
            "gluscope reads experts in those layouts only")
    layer.shared = _shared_expert(bridge, mlp, where)
    from collect.moe import check_experts

    check_experts(layer, where)
    return layer


def _not_gated(adapter: Any, hf_config: Any, model_class: str, name: str) -> None:
    """Refuse a model TransformerLens' adapter marks as not gated (``cfg.gated_mlp`` False), naming why."""
    cfg = getattr(adapter, "cfg", None)
    if cfg is not None and getattr(cfg, "gated_mlp", None) is False:
        act = getattr(hf_config, "mlp_hidden_act", None) or getattr(cfg, "act_fn", None)
        raise GluscopeError(
            f"model class {model_class} has no gated MLP: TransformerLens' {name} says its MLPs and experts compute "
            f"down(act(up·x)){f' with {act}' if act else ''}, no gate; gluscope needs a gated MLP, act(gate) * in")


def locate(hf_model: Any, layers: list[int] | None, *, remember: Path | None = None) -> Located:
    """Each requested layer's gated MLP (all layers when ``layers`` is None, skipping the layers of a
    hybrid stack that hold none: attention or state-space layers only); a GluscopeError that names
    what was found where a requested layer has none we can record.

    With ``remember`` (a folder) and all layers asked for, the adapter's answer is kept there as module
    names (:func:`layout_of`), one small JSON file per model class, config and transformers and
    TransformerLens versions, and read back by the next process that loads the same model: importing
    TransformerLens takes seconds, more than all that a ``gluscope probe`` of a small model does besides
    importing torch and transformers.
    An entry that does not fit the model (a module it names is missing) is ignored and replaced."""
    if remember is None or layers is not None:
        return _ask_adapter(hf_model, layers)
    key = layout_key(hf_model)
    if key is None:
        return _ask_adapter(hf_model, layers)
    path = remember / f"{key}.json"
    try:
        found = relocate(hf_model, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, GluscopeError):
        found = None  # absent, or written by something else: the adapter decides again
    if found is not None:
        return found
    found = _ask_adapter(hf_model, None)
    layout = layout_of(hf_model, found)
    if layout is not None:
        try:
            remember.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{path.name}.{os.getpid()}.part")
            part.write_text(json.dumps(layout, indent=1), encoding="utf-8")
            part.replace(path)  # whole or absent, even with two processes writing at once
        except OSError:
            pass  # a read-only cache: the adapter is asked again next time
    return found


def _ask_adapter(hf_model: Any, layers: list[int] | None) -> Located:
    from transformer_lens.model_bridge.generalized_components import (
        GatedMLPBridge,
        JointGateUpMLPBridge,
        MoEBridge,
    )

    adapter = adapter_for(hf_model)
    name = type(adapter).__name__
    model_class = type(hf_model).__name__
    _not_gated(adapter, hf_model.config, model_class, name)
    mapping = adapter.component_mapping or {}
    blocks = mapping.get("blocks")
    stack = _sub(hf_model, getattr(blocks, "name", None)) if blocks is not None else None
    if stack is None or not isinstance(stack, torch.nn.ModuleList):
        raise GluscopeError(f"model class {model_class}: its TransformerLens adapter {name} names no list of "
                            "decoder layers; gluscope supports gated-MLP language models")
    n_layers = len(stack)
    requested = layers is not None
    if layers is None:
        layers = list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise GluscopeError(f"--layers {bad}: this model has layers 0..{n_layers - 1}")
    subs = blocks.submodules
    bridge = subs.get("mlp")
    # A hybrid block whose MLP branch is an MoE block beside a (fused) shared MLP (Granite-4.0).
    moe_bridge, shared_bridge = subs.get("moe"), subs.get("shared_mlp")
    found = Located(adapter=name, layers_path=blocks.name, n_layers=n_layers)
    for index in sorted(set(layers)):
        where = f"model class {model_class} ({name}): layer {index}'s MLP"
        block = stack[index]
        if bridge is None and shared_bridge is not None:
            layer = _hybrid_moe(moe_bridge, shared_bridge, block, where)
            if layer is not None:
                found.layers[index] = layer
            continue
        mlp = _sub(block, getattr(bridge, "name", None))
        if mlp is None:
            if not requested and _has_mixer(block):
                found.skipped.append(index)  # an attention or state-space layer only
                continue
            raise GluscopeError(f"{where} was not found (modules [{_children(block)}]); gluscope needs "
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
    if not found.layers:
        raise GluscopeError(f"model class {model_class} ({name}): none of its layers holds a gated MLP")
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    for layer in found.layers.values():
        if isinstance(layer, MoELayer):
            layer.top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None)
    return found


def _has_mixer(block: torch.nn.Module) -> bool:
    """Whether a decoder layer holds an attention or state-space mixer: a layer of a hybrid stack
    without an MLP, skipped when no --layers names it."""
    return any(name in dict(block.named_children()) for name in ("mamba", "mixer", "self_attn", "attention",
                                                                   "linear_attn", "self_attention"))


def _hybrid_moe(moe_bridge: Any, shared_bridge: Any, block: torch.nn.Module, where: str) -> GatedMLP | MoELayer | None:
    """Granite-4.0 (GraniteMoeHybrid): an MoE block and a fused shared MLP side by side in the decoder
    layer, summed; without experts the shared MLP alone is the layer's dense MLP."""
    shared_module = _sub(block, shared_bridge.name)
    shared = _fused(shared_bridge, shared_module, where + " (shared MLP)") if shared_module is not None else None
    moe_module = _sub(block, getattr(moe_bridge, "name", None)) if moe_bridge is not None else None
    if moe_module is None:
        return shared
    layer = _routed_experts(moe_module, where)
    if layer is None:
        raise GluscopeError(f"{where}: its mixture-of-experts block ({type(moe_module).__name__}, modules "
                            f"[{_children(moe_module)}]) keeps its experts in a layout gluscope does not read")
    from collect.moe import check_experts

    check_experts(layer, where)
    # The shared MLP runs after the experts: the layer's own forward hook fires once both have.
    layer.shared, layer.done = shared, block
    return layer


# -- the adapter's answer, remembered ------------------------------------------------------------

#: The shape of a remembered layout; a change to it gives new keys, so older entries are never read.
LAYOUT_VERSION = 1


def layout_key(hf_model: Any) -> str | None:
    """The name of this model's layout: a hash of what the adapter's answer depends on (the model
    class, its config, the transformers and TransformerLens versions); None without TransformerLens."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions = [version("transformers"), version("transformer-lens")]
    except PackageNotFoundError:
        return None
    text = json.dumps([LAYOUT_VERSION, type(hf_model).__module__, type(hf_model).__qualname__, versions,
                       hf_model.config.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def layout_of(hf_model: Any, found: Located) -> dict[str, Any] | None:
    """What :func:`locate` found, as module names (JSON): each layer's MLP module and its gate, in and
    out projections (or fused gate/up and out) within it. None where a layer is a mixture-of-experts
    block: only dense layouts are remembered."""
    names = {id(module): name for name, module in hf_model.named_modules()}
    layers: dict[str, dict[str, Any]] = {}
    for index, mlp in found.layers.items():
        if not isinstance(mlp, GatedMLP) or mlp.module is None or not names.get(id(mlp.module)):
            return None
        base = names[id(mlp.module)] + "."
        entry: dict[str, Any] = {"module": base[:-1], "fused": mlp.fused}
        for role, module in (("gate", mlp.gate), ("in", mlp.up), ("out", mlp.down)):
            if module is None:
                continue
            name = names.get(id(module), "")
            if not name.startswith(base):
                return None
            entry[role] = name[len(base):]
        layers[str(index)] = entry
    return {"adapter": found.adapter, "layers_path": found.layers_path, "n_layers": found.n_layers,
            "skipped": list(found.skipped), "layers": layers}


def relocate(hf_model: Any, layout: dict[str, Any]) -> Located | None:
    """:func:`locate`'s answer for every layer, rebuilt from a :func:`layout_of` without
    TransformerLens: the same modules, read the same way (:func:`_dense`, :func:`_fused_halves`);
    None where the model lacks a module the layout names."""
    stack = _sub(hf_model, layout["layers_path"])
    if not isinstance(stack, torch.nn.ModuleList) or len(stack) != int(layout["n_layers"]):
        return None
    found = Located(adapter=str(layout["adapter"]), layers_path=str(layout["layers_path"]), n_layers=len(stack),
                    skipped=[int(x) for x in layout["skipped"]])
    model_class = type(hf_model).__name__
    for index, entry in sorted((int(k), v) for k, v in layout["layers"].items()):
        where = f"model class {model_class} ({found.adapter}): layer {index}'s MLP"
        mlp = _sub(hf_model, entry["module"])
        roles = ("gate", "out") if entry["fused"] else ("gate", "in", "out")
        parts = [_sub(mlp, entry[role]) for role in roles] if mlp is not None else [None]
        if any(part is None for part in parts):
            return None
        found.layers[index] = _fused_halves(mlp, *parts, where) if entry["fused"] else _dense(mlp, *parts, where=where)
    return found if found.layers else None
