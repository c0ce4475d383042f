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

from dataclasses import dataclass
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


@dataclass
class ExpertBatch:
    """One expert's share of a batch, ready for the dense statistics.

    ``gate``/``in_``/``post`` are ``[B, T', N]`` over the expert's counted positions packed to the
    front of each document, in position order (``valid`` marks the real ones, ``positions`` maps
    them back to positions in the document): a routed expert sees top_k / n_experts of the tokens,
    so the statistics run over that share, not over every position. ``window_gate``/``window_in``
    are ``[B, T, N]`` at the original positions, NaN where the token was not routed to the expert,
    for the example windows. For a shared expert nothing is packed (``positions`` None)."""

    expert: int | str
    gate: torch.Tensor
    in_: torch.Tensor
    post: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor | None
    window_gate: torch.Tensor
    window_in: torch.Tensor


def expert_batches(
    moe: Any,
    hidden: torch.Tensor,
    routing: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    valid: torch.Tensor,
    experts: list[int | str],
) -> Iterator[ExpertBatch]:
    """Per recorded expert of one MoE layer and batch, its :class:`ExpertBatch` (none for an expert
    no counted token was routed to). ``hidden`` [B, T, D] and ``routing`` [B, T, top_k] are what the
    experts module was called with; ``valid`` [B, T] the counted positions. Only the routed tokens
    go through the expert's weights: the same matmul work the model itself does. The shared expert
    (``"s"``) sees every token; its hooks come from the model's own modules."""
    from mkdocs_gluscope.store import SHARED

    nan = float("nan")
    batch, length, d_model = hidden.shape
    flat_hidden = hidden.reshape(-1, d_model)
    for expert in experts:
        if expert == SHARED:
            if shared is not None:
                gate, in_, post = shared
                yield ExpertBatch(SHARED, gate, in_, post, valid, None, gate, in_)
            continue
        routed = (routing == expert).any(dim=-1)  # [B, T]
        counted = valid & routed
        per_doc = counted.sum(dim=1)
        packed_len = int(per_doc.max())  # one sync per expert and batch
        if packed_len == 0:
            continue
        # Counted routed positions first, in position order (a stable sort keeps the earliest first,
        # which is the statistics' tie rule).
        positions = torch.sort((~counted).to(torch.uint8), dim=1, stable=True).indices[:, :packed_len]
        packed_valid = torch.arange(packed_len, device=valid.device)[None, :] < per_doc[:, None]
        # The expert's values at every routed token (counted or not), NaN elsewhere: the windows.
        tokens = routed.reshape(-1).nonzero().squeeze(1)
        routed_gate, routed_in, _ = expert_hooks(moe.experts[expert], flat_hidden[tokens])
        windows = []
        for v in (routed_gate, routed_in):
            full = v.new_full((batch * length, v.shape[-1]), nan)
            full[tokens] = v
            windows.append(full.view(batch, length, -1))
        index = positions[:, :, None].expand(-1, -1, routed_gate.shape[-1])
        gate, in_ = windows[0].gather(1, index), windows[1].gather(1, index)
        post = moe.experts[expert].act_fn(gate) * in_  # as expert_hooks computes it
        yield ExpertBatch(expert, gate, in_, post, packed_valid, positions, *windows)
