"""Mixture-of-experts layers: every expert's neurons are neurons, recorded from the model's own computation.

transformers keeps a layer's routed experts as 3-D tensors and runs them as one grouped matmul
(``grouped_mm``), a batched one (``batched_mm``) or a loop over experts (``eager``): there is no
per-expert module to hook. :class:`ExpertTap` reads each routed (token, expert) pair's ``gate``
and ``in`` where the experts themselves computed them, in whichever implementation runs: the
activation module's input is ``gate``, the first half of each row of the ``[gate | in]``
projection the experts just computed (checked by its memory layout), and its output is
``act(gate)``; ``post = act(gate) * in`` is the same multiplication the experts make. Nothing is
recomputed, so a value near zero keeps the sign the model gave it, bit for bit, in every dtype.
Which pair each row belongs to follows from the routing the experts were called with and the
implementation's order of rows (:func:`row_pairs`); :func:`check_experts` proves both on a few
tokens when the model is located.

The experts of a layer are then reduced together, as one wide layer of ``experts x d_expert``
neurons over packed positions (:func:`pack_experts`, :class:`collect.stats.Packing`): each
expert's tokens packed to the front of each document, padded to a few bucket lengths so that the
compiled statistics are reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from collect.stats import Packing
from mkdocs_gluscope.errors import GluscopeError

#: The experts implementations whose order of rows :func:`row_pairs` knows (transformers' names).
IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def experts_implementation(experts_module: torch.nn.Module) -> str:
    """The implementation the experts run with now: transformers' ``config._experts_implementation``
    for classes registered with its experts interface, else the class's own loop (``eager``)."""
    config = getattr(experts_module, "config", None)
    name = getattr(config, "_experts_implementation", None) if config is not None else None
    return name or "eager"


def row_pairs(top_k_index: torch.Tensor, implementation: str, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, expert)`` of each row the experts compute, in the order they compute them, from the
    routing they were called with (``top_k_index`` ``[tokens, top_k]``): ``grouped_mm`` sorts the
    (token, slot) pairs by expert with ``torch.sort`` (the same call on the same device gives the
    same order), ``batched_mm`` keeps them in order, the eager loop takes the experts in order and
    each expert's pairs by slot, then token (``torch.where`` on its ``[top_k, tokens]`` mask)."""
    flat = top_k_index.reshape(-1)
    n_tokens, top_k = top_k_index.shape
    if implementation == "grouped_mm":
        expert, perm = torch.sort(flat)
    elif implementation == "batched_mm":
        perm = torch.arange(flat.numel(), device=flat.device)
        expert = flat
    elif implementation == "eager":
        pair = torch.arange(flat.numel(), device=flat.device)
        key = flat * flat.numel() + (pair % top_k) * n_tokens + pair // top_k
        perm = torch.argsort(key)
        perm = perm[flat[perm] < n_experts]  # a sentinel expert (expert parallelism) computes nothing
        expert = flat[perm]
    else:
        raise GluscopeError(f"experts implementation {implementation!r}: gluscope reads the rows of "
                            f"{', '.join(IMPLEMENTATIONS)} only; load the model with experts_implementation='grouped_mm'")
    return perm // top_k, expert


def _first_half_rows(gate: torch.Tensor, where: str) -> torch.Tensor:
    """The ``[..., 2I]`` rows whose first halves ``gate`` ``[..., I]`` is: the experts' ``[gate | in]``
    projection, read where the activation found it. Its layout proves it: ``gate`` has the strides
    of a contiguous ``[..., 2I]`` tensor, so each row's ``in`` follows its ``gate`` in memory."""
    size = gate.shape[-1]
    shape = gate.shape[:-1] + (2 * size,)
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    strides = tuple(reversed(strides))
    needed = gate.storage_offset() + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    same = all(s == t for n, s, t in zip(gate.shape, gate.stride(), strides) if n > 1)
    if not same or gate.untyped_storage().nbytes() < needed * gate.element_size():
        raise GluscopeError(f"{where}: the activation's input is not the first half of a [gate | in] projection "
                            f"(shape {list(gate.shape)}, strides {list(gate.stride())}); gluscope cannot read in")
    return gate.as_strided(shape, strides, gate.storage_offset())


@dataclass
class ExpertRows:
    """What one MoE block's experts computed in one forward pass: ``gate``, ``in`` and ``act(gate)``
    of each routed (token, expert) pair, as rows ``[S, I]``, with the pair of each row."""

    gate: torch.Tensor
    in_: torch.Tensor
    swish: torch.Tensor
    token: torch.Tensor  # [S] flat token index (row-major over the batch's [B, T])
    expert: torch.Tensor  # [S]


@dataclass
class ExpertTap:
    """Hooks that collect :class:`ExpertRows` while one MoE block runs: the routing from the experts
    module's call, the rows from its activation module (input: ``gate``, the first half of the
    ``[gate | in]`` rows; output: ``act(gate)``), once per call (the eager loop calls it once per
    expert)."""

    moe: Any  # collect.architectures.MoELayer
    where: str = "mixture-of-experts layer"
    _rows: list[torch.Tensor] = field(default_factory=list)
    _acts: list[torch.Tensor] = field(default_factory=list)
    _routing: torch.Tensor | None = None

    def install(self) -> list[Any]:
        experts, act = self.moe.experts_module, self.moe.act_module
        if act is None:
            raise GluscopeError(f"{self.where}: its experts have no activation module to read gate and in from")

        def called(module: Any, args: tuple, kwargs: dict) -> None:
            # experts(hidden_states, top_k_index, top_k_weights): tokens flattened (checked at load)
            self._routing = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            self._rows.clear()
            self._acts.clear()

        def act_in(module: Any, args: tuple) -> None:
            self._rows.append(_first_half_rows(args[0], self.where))

        def act_out(module: Any, args: tuple, out: torch.Tensor) -> None:
            self._acts.append(out)

        return [experts.register_forward_pre_hook(called, with_kwargs=True),
                act.register_forward_pre_hook(act_in), act.register_forward_hook(act_out)]

    def take(self) -> ExpertRows:
        """The rows of the last forward pass (and forget them)."""
        if self._routing is None:
            raise GluscopeError(f"{self.where}: its experts module was not called in the forward pass")
        routing, rows, acts = self._routing, self._rows, self._acts
        self._routing, self._rows, self._acts = None, [], []
        implementation = experts_implementation(self.moe.experts_module)
        token, expert = row_pairs(routing.reshape(-1, routing.shape[-1]), implementation, self.moe.n_experts)
        full = rows[0].reshape(-1, rows[0].shape[-1]) if len(rows) == 1 else torch.cat(
            [r.reshape(-1, r.shape[-1]) for r in rows])
        swish = acts[0].reshape(-1, acts[0].shape[-1]) if len(acts) == 1 else torch.cat(
            [a.reshape(-1, a.shape[-1]) for a in acts])
        if full.shape[0] != token.shape[0]:
            raise GluscopeError(
                f"{self.where}: its experts ({implementation}) computed {full.shape[0]} rows for {token.shape[0]} "
                "routed (token, expert) pairs; gluscope cannot tell which row belongs to which pair")
        d = full.shape[-1] // 2
        return ExpertRows(gate=full[:, :d], in_=full[:, d:], swish=swish, token=token, expert=expert)


def bucket(length: int) -> int:
    """A packed length at least ``length`` from a few fixed ones (16, 20, 24, 28, 32, 40, 48, ...:
    four per octave), so that the compiled statistics see few shapes and pad at most a quarter."""
    size = 16
    while size < length:
        step = 1 << max(size.bit_length() - 3, 0)  # a quarter octave
        size += step
    return size


@dataclass
class PackedExperts:
    """One MoE layer's recorded experts over one batch, as one wide layer of ``G x I`` neurons over
    packed positions (:class:`collect.stats.Packing`), and the counted tokens routed to each."""

    gate: torch.Tensor  # [B, T', G * I]
    in_: torch.Tensor
    swish: torch.Tensor
    post: torch.Tensor
    packing: Packing
    routed: torch.Tensor  # [G] int64: counted positions routed to each recorded expert
    longest: torch.Tensor  # int64 scalar: the most counted positions of one expert in one document
    fits: torch.Tensor  # bool scalar: the packed length held them


def pack_experts(rows: ExpertRows, valid: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor,
                 n_groups: int, length: int | None) -> PackedExperts:
    """Pack the rows of the recorded experts (``groups`` ``[n_experts]``: each expert's group among the
    ``n_groups`` recorded, -1 if not recorded) by document and expert: slot ``s`` of a document holds
    the expert's ``s``-th routed position in the document (``lengths``), counted or not (an uncounted
    BOS still shows in the windows); ``valid`` ``[B, T]`` marks the counted positions, the packing's
    ``valid`` the counted slots. ``length``: the packed length, or None for the exact one (a host
    sync); tokens past a given length are left out and ``fits`` is False, decided on the device (no
    sync: masks become indices into a spare row)."""
    b, t = valid.shape
    device = valid.device
    group = groups[rows.expert]  # [S]
    in_doc = torch.arange(t, device=device)[None, :] < lengths[:, None]
    member = in_doc.reshape(-1)[rows.token] & (group >= 0)
    # Each (document, group) pair's positions, in position order: their rank is the slot.
    seen = torch.zeros(b * t, n_groups + 1, dtype=torch.bool, device=device)
    seen[rows.token, torch.where(member, group, n_groups)] = True  # column n_groups: not recorded
    seen = seen[:, :n_groups].reshape(b, t, n_groups)
    rank = torch.cumsum(seen, dim=1) - 1  # [B, T, G]
    longest = rank[:, -1, :].max() + 1
    if length is None:
        length = bucket(int(longest))  # the exact path's one sync per MoE layer and batch
    fits = longest <= length
    slot = rank.view(b * t, n_groups)[rows.token, group.clamp(min=0)]
    keep = member & (slot < length)
    spare = b * length * n_groups
    row_of = torch.full((spare + 1,), -1, dtype=torch.long, device=device)
    target = torch.where(keep, ((rows.token // t) * length + slot) * n_groups + group, spare)
    row_of[target] = torch.arange(len(keep), device=device)
    row_of = row_of[:spare].view(b, length, n_groups)
    filled = row_of >= 0
    take = row_of.clamp(min=0).view(-1)
    size = rows.gate.shape[-1]

    def packed(values: torch.Tensor) -> torch.Tensor:
        return values[take].view(b, length, n_groups * size)

    gate, in_, swish = packed(rows.gate), packed(rows.in_), packed(rows.swish)
    token = rows.token[take].view(b, length, n_groups)
    positions = torch.where(filled, token % t, 0)
    inverse = torch.where(seen & (rank < length), rank, -1)
    packing = Packing(positions=positions, valid=filled & valid.reshape(-1)[token], inverse=inverse, group_size=size)
    return PackedExperts(gate=gate, in_=in_, swish=swish, post=swish * in_, packing=packing,
                         routed=(seen & valid[:, :, None]).sum(dim=(0, 1)), longest=longest, fits=fits)


@torch.no_grad()
def check_experts(moe: Any, where: str) -> None:
    """Run the experts module on a few random tokens with random routing, reading its rows with an
    :class:`ExpertTap`, and compare with ``gate`` and ``in`` from our views of its weights (and its
    output with ``down(act(gate) * in)``): proves the layout, the activation's place and the order of
    rows of the implementation it runs with, before any batch (tolerances: a recomputation may
    differ in the last bits, a wrong row or half would not be close)."""
    experts_module = moe.experts_module
    param = moe.experts[0].w_gate
    d_model, n_experts = param.shape[1], moe.n_experts
    top_k = min(2, n_experts)
    generator = torch.Generator(device="cpu").manual_seed(0)
    n_tokens = 5
    hidden = torch.randn(n_tokens, d_model, generator=generator).to(param.device, param.dtype)
    index = torch.stack([torch.randperm(n_experts, generator=generator)[:top_k] for _ in range(n_tokens)])
    index[0, 0], index[-1, 0] = 0, n_experts - 1  # the first and the last expert
    index = index.to(param.device)
    weights = torch.full((n_tokens, top_k), 1.0 / top_k, dtype=param.dtype, device=param.device)
    tap = ExpertTap(moe, where)
    handles = tap.install()
    try:
        try:
            theirs = experts_module(hidden, index, weights)
        except GluscopeError:
            raise
        except Exception as error:  # another calling convention: not a layout we know
            raise GluscopeError(
                f"{where}: its experts module {type(experts_module).__name__} is not called as "
                f"experts(hidden_states, top_k_index, top_k_weights) ({type(error).__name__}); gluscope "
                "cannot tell which tokens each expert sees") from None
        rows = tap.take()
    finally:
        for handle in handles:
            handle.remove()
    tolerance = 1e-4 if param.dtype == torch.float32 else 3e-2
    ours = torch.zeros(n_tokens, d_model, dtype=torch.float32, device=param.device)
    for e in range(n_experts):
        routed = (index == e).any(dim=1)
        mine = rows.expert == e
        if int(mine.sum()) != int(routed.sum()):
            raise GluscopeError(f"{where}: expert {e} computed {int(mine.sum())} rows for {int(routed.sum())} "
                                "routed tokens; gluscope cannot tell which row belongs to which token")
        tokens = rows.token[mine]
        expert = moe.experts[e]
        gate = torch.nn.functional.linear(hidden[tokens], expert.w_gate, expert.b_gate).float()
        in_ = torch.nn.functional.linear(hidden[tokens], expert.w_in, expert.b_in).float()
        for name, got, want in (("gate", rows.gate[mine], gate), ("in", rows.in_[mine], in_)):
            scale = float(want.abs().max()) if want.numel() else 1.0
            if not torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance * max(scale, 1e-6)):
                raise GluscopeError(
                    f"{where}: the rows expert {e} of {type(experts_module).__name__} computed are not its {name} "
                    "(gate_up_proj halves, gate first); gluscope records experts computing down(act(gate) * in) only")
        post = (rows.swish[mine] * rows.in_[mine]).float()
        ours.index_add_(0, tokens, torch.nn.functional.linear(post, expert.w_out.float()) / top_k)
    scale = float(theirs.abs().max()) or 1.0
    if not torch.allclose(ours, theirs.float(), rtol=tolerance, atol=tolerance * scale):
        raise GluscopeError(
            f"{where}: {type(experts_module).__name__} does not compute down_proj(act(gate) * in) with "
            "[gate | in] = gate_up_proj halves; gluscope records experts of that form only")
