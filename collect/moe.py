"""Mixture-of-experts layers: every expert's neurons are neurons.

transformers 5 keeps a layer's routed experts as fused 3-D tensors (``gate_up_proj`` [E, 2I, D],
``down_proj`` [E, D, I]) and runs them with grouped kernels, so there is no per-expert module to
hook. We capture what the experts module is called with (the hidden states and each token's
routed experts) and compute ``gate`` and ``in`` of an expert's neurons ourselves, from the same
weights. :func:`check_expert_rule` proves, once per layer when the model is located, that this
recomputation is what the module itself does; a family whose experts compute something else
(interleaved gate/up, biases, clamped activations as in gpt-oss) is refused there.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from mkdocs_gluscope.errors import GluscopeError


def expert_hooks(expert: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate, in, post)`` of one expert's neurons at ``hidden`` [..., D]: what the expert computes
    for a token routed to it (before the routing weight scales its output)."""
    gate = torch.nn.functional.linear(hidden, expert.w_gate, expert.b_gate)
    in_ = torch.nn.functional.linear(hidden, expert.w_in, expert.b_in)
    return gate, in_, expert.act_fn(gate) * in_


@torch.no_grad()
def check_expert_rule(experts_module: torch.nn.Module, routed: list[Any], where: str) -> None:
    """Run the experts module on a few random tokens, all routed to one expert with weight 1, and
    compare with ``down(act(gate) * in)`` from our views of its weights."""
    param = routed[0].w_gate
    d_model = param.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(3, d_model, generator=generator).to(param.device, param.dtype)
    for e in sorted({0, len(routed) - 1}):
        index = torch.full((3, 1), e, dtype=torch.long, device=param.device)
        weights = torch.ones(3, 1, dtype=param.dtype, device=param.device)
        try:
            theirs = experts_module(hidden, index, weights)
        except Exception as error:  # another calling convention: not a layout we know
            raise GluscopeError(
                f"{where}: its experts module {type(experts_module).__name__} is not called as "
                f"experts(hidden_states, top_k_index, top_k_weights) ({type(error).__name__}); gluscope "
                "cannot tell which tokens each expert sees") from None
        _, _, post = expert_hooks(routed[e], hidden)
        ours = torch.nn.functional.linear(post, routed[e].w_out)
        tolerance = 1e-4 if param.dtype == torch.float32 else 3e-2
        scale = float(theirs.abs().max()) or 1.0
        if not torch.allclose(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance * scale):
            raise GluscopeError(
                f"{where}: expert {e} of {type(experts_module).__name__} does not compute "
                "down_proj(act(gate) * in) with [gate | in] = gate_up_proj halves; gluscope records experts of "
                "that form only (gpt-oss-style experts with biases, interleaved or clamped gates are not)")


def expert_batches(
    moe: Any,
    hidden: torch.Tensor,
    routing: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    valid: torch.Tensor,
    experts: list[int | str],
) -> Iterator[tuple[int | str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per recorded expert of one MoE layer and batch: ``(expert, gate, in, post, valid)`` with the
    hooks ``[B, T, N]`` and ``valid`` ``[B, T]`` true at the counted positions routed to the expert,
    so the dense statistics (:func:`collect.stats.reduce_batch`) apply as they are.

    ``hidden`` [B, T, D] and ``routing`` [B, T, top_k] are what the experts module was called with.
    A routed expert's ``gate`` and ``in`` are NaN at positions not routed to it: the expert never
    saw those tokens, and the example windows show them as empty rather than as values the model
    did not compute. The shared expert (``"s"``) sees every token; its hooks come from the model's
    own modules."""
    from mkdocs_gluscope.store import SHARED

    nan = float("nan")
    for expert in experts:
        if expert == SHARED:
            if shared is not None:
                yield SHARED, *shared, valid
            continue
        routed = (routing == expert).any(dim=-1)  # [B, T]
        counted = valid & routed
        # Only the routed tokens go through the expert's weights (top_k / n_experts of them): the
        # same matmul work the model itself does; the rest of the [B, T, N] view stays NaN.
        tokens = routed.reshape(-1).nonzero().squeeze(1)
        values = expert_hooks(moe.experts[expert], hidden.reshape(-1, hidden.shape[-1])[tokens])
        out = []
        for v in values:
            full = v.new_full((routed.numel(), v.shape[-1]), nan)
            full[tokens] = v
            out.append(full.view(*routed.shape, v.shape[-1]))
        yield expert, *out, counted
