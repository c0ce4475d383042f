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
compiled statistics are reused (on a GPU; on a CPU the kernel of :mod:`collect.fused` reads each
expert's filled slots only).
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
    (and ``post`` where the family's own forward gives it) of each computed (token, expert) pair, as
    rows ``[S, I]``, with the pair of each row; ``member`` False marks rows of tokens not routed to
    their expert (Llama 4 runs every expert on every token)."""

    gate: torch.Tensor
    in_: torch.Tensor
    swish: torch.Tensor
    token: torch.Tensor  # [S] flat token index (row-major over the batch's [B, T])
    expert: torch.Tensor  # [S]
    post: torch.Tensor | None = None
    member: torch.Tensor | None = None


class _Restore:
    """A handle that removes an instance attribute set over a class's method."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        self.module.__dict__.pop(self.name, None)


@dataclass
class ExpertTap:
    """Hooks that collect :class:`ExpertRows` while one MoE block runs: the routing (the experts
    module's call, or the router's output, as the family routes), and the rows, once per call of
    the experts' activation (the eager loop calls it once per expert): its input is ``gate``, the
    first half of the ``[gate | in]`` rows, its output ``act(gate)``; or, for a family with values of
    its own (gpt-oss), the rows its ``_apply_gate`` receives and returns."""

    moe: Any  # collect.architectures.MoELayer
    where: str = "mixture-of-experts layer"
    _parts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    _acts: list[torch.Tensor] = field(default_factory=list)
    _routing: Any = None

    def install(self) -> list[Any]:
        moe = self.moe
        handles: list[Any] = []

        def called(module: Any, args: tuple, kwargs: dict) -> None:
            # experts(hidden_states, top_k_index, top_k_weights): tokens flattened (checked at load)
            self._routing = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))

        def routed(module: Any, args: tuple, out: Any) -> None:
            self._routing = out

        if moe.routing == "call":
            handles.append(moe.experts_module.register_forward_pre_hook(called, with_kwargs=True))
        else:
            handles.append(moe.router.register_forward_hook(routed))
        if moe.rows is not None:  # the family's own values, read where its _apply_gate runs
            experts, values = moe.experts_module, moe.rows
            original = type(experts)._apply_gate

            def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
                out = original(experts, gate_up)
                gate, in_, swish = values(gate_up)
                self._parts.append((gate, in_, swish, out))
                return out

            experts.__dict__["_apply_gate"] = apply_gate
            return handles + [_Restore(experts, "_apply_gate")]
        if moe.act_module is None:
            raise GluscopeError(f"{self.where}: its experts have no activation module to read gate and in from")

        def act_in(module: Any, args: tuple) -> None:
            full = _first_half_rows(args[0], self.where)
            half = full.shape[-1] // 2
            self._parts.append((full[..., :half], full[..., half:]))

        def act_out(module: Any, args: tuple, out: torch.Tensor) -> None:
            self._acts.append(out)

        return handles + [moe.act_module.register_forward_pre_hook(act_in),
                          moe.act_module.register_forward_hook(act_out)]

    def take(self) -> ExpertRows:
        """The rows of the last forward pass (and forget them)."""
        if self._routing is None or not self._parts:
            raise GluscopeError(f"{self.where}: its experts were not called in the forward pass")
        routing, parts, acts = self._routing, self._parts, self._acts
        self._routing, self._parts, self._acts = None, [], []
        moe = self.moe

        def rows(tensors: list[torch.Tensor]) -> torch.Tensor:
            flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
            return flat[0] if len(flat) == 1 else torch.cat(flat)

        gate, in_ = rows([p[0] for p in parts]), rows([p[1] for p in parts])
        swish = rows([p[2] for p in parts] if moe.rows is not None else acts)
        post = rows([p[3] for p in parts]) if moe.rows is not None else None
        member = None
        if moe.routing == "call":
            implementation = experts_implementation(moe.experts_module)
            token, expert = row_pairs(routing.reshape(-1, routing.shape[-1]), implementation, moe.n_experts)
        elif moe.routing == "scores":  # every expert on every token, expert after expert
            scores = routing[0]  # [T, E]: 0 where the token is not routed to the expert
            n_tokens = scores.shape[0]
            implementation = "every expert on every token"
            pair = torch.arange(n_tokens * moe.n_experts, device=scores.device)
            token, expert = pair % n_tokens, pair // n_tokens
            member = scores.T.reshape(-1) > 0
        else:  # "sorted": (index_sorted_experts, batch_index, batch_gates, expert_size, logits)
            _, token, _, expert_size, _ = routing
            implementation = "rows sorted by expert"
            sizes = torch.as_tensor(expert_size, device=token.device)
            expert = torch.repeat_interleave(torch.arange(len(expert_size), device=token.device), sizes,
                                             output_size=token.shape[0])
        if gate.shape[0] != token.shape[0]:
            raise GluscopeError(
                f"{self.where}: its experts ({implementation}) computed {gate.shape[0]} rows for {token.shape[0]} "
                "routed (token, expert) pairs; gluscope cannot tell which row belongs to which pair")
        return ExpertRows(gate=gate, in_=in_, swish=swish, token=token, expert=expert, post=post, member=member)


def bucket(length: int) -> int:
    """A packed length at least ``length`` from a few fixed ones (16, 20, 24, 28, 32, 40, 48, ...:
    four per octave), so that the compiled statistics see few shapes and pad at most a quarter."""
    size = 16
    while size < length:
        step = 1 << max(size.bit_length() - 3, 0)  # a quarter octave
        size += step
    return size


class PackBuffers:
    """Memory the packed experts' values are written into, kept from batch to batch and layer to layer
    (a layer's packed values are used up before the next layer's are packed): a fresh tensor of tens
    of megabytes per batch is fresh pages from the system, and filling them cost ten times the copy
    itself (bench/moe_overhead.py --profile)."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, ``like``'s dtype and device, in the memory kept for ``name``."""
        size = 1
        for extent in shape:
            size *= extent
        flat = self._flat.get(name)
        if flat is None or flat.numel() < size or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return flat[:size].view(shape)


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
                 n_groups: int, length: int | None, buffers: PackBuffers | None = None) -> PackedExperts:
    """Pack the rows of the recorded experts (``groups`` ``[n_experts]``: each expert's group among the
    ``n_groups`` recorded, -1 if not recorded) by document and expert: slot ``s`` of a document holds
    the expert's ``s``-th routed position in the document (``lengths``), counted or not (an uncounted
    BOS still shows in the windows); ``valid`` ``[B, T]`` marks the counted positions, the packing's
    ``valid`` the counted slots. ``length``: the packed length, or None for the exact one (a host
    sync); tokens past a given length are left out and ``fits`` is False, decided on the device (no
    sync: masks become indices into a spare row). ``buffers``: where the packed values are written
    (valid until the next call with the same buffers; their empty slots then hold stale values,
    which the packing's masks leave out), else new tensors."""
    b, t = valid.shape
    device = valid.device
    group = groups[rows.expert]  # [S]
    in_doc = torch.arange(t, device=device)[None, :] < lengths[:, None]
    member = in_doc.reshape(-1)[rows.token] & (group >= 0)
    if rows.member is not None:
        member &= rows.member
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

    def packed(name: str, values: torch.Tensor) -> torch.Tensor:
        if buffers is None:
            return values[take].view(b, length, n_groups * size)
        # Each row copied to its slot, and only there (a row left out to the spare row past the
        # end): the empty slots, most of a padded packing, keep whatever they held (every reader
        # masks them, the kernel does not read them), instead of a copy of row 0 each.
        out = buffers.take(name, (spare + 1, size), values)
        return out.index_copy_(0, target, values)[:spare].view(b, length, n_groups * size)

    gate, in_, swish = packed("gate", rows.gate), packed("in", rows.in_), packed("swish", rows.swish)
    if rows.post is None and buffers is None:  # act(gate) * in: the experts' own product
        post = swish * in_
    elif rows.post is None:  # on the rows, not over the padding
        post = packed("post", torch.mul(rows.swish, rows.in_, out=buffers.take("post rows", rows.in_.shape, rows.in_)))
    else:
        post = packed("post", rows.post)
    token = rows.token[take].view(b, length, n_groups)
    positions = torch.where(filled, token % t, 0)
    inverse = torch.where(seen & (rank < length), rank, -1)
    packing = Packing(positions=positions, valid=filled & valid.reshape(-1)[token], inverse=inverse, group_size=size,
                      filled=filled)
    return PackedExperts(gate=gate, in_=in_, swish=swish, post=post, packing=packing,
                         routed=(seen & valid[:, :, None]).sum(dim=(0, 1)), longest=longest, fits=fits)


@torch.no_grad()
def check_experts(moe: Any, where: str) -> None:
    """Run the MoE block on a few random tokens, reading its experts' rows with an
    :class:`ExpertTap`, and compare each row's ``gate`` and ``in`` with our views of the expert's
    weights applied to the row's input, and ``post = act(gate) * in`` through the expert's down
    projection with what the experts return: proves the layout, the activation's place and the
    order of rows of the implementation the model runs with, before any batch. Tolerances: a
    recomputation may differ in the last bits, a wrong row, half or expert would not be close."""
    param = moe.experts[0].w_gate
    d_model = param.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(0)
    n_tokens = 4 * moe.n_experts
    hidden = torch.randn(1, n_tokens, d_model, generator=generator).to(param.device, param.dtype)
    seen: dict[str, Any] = {}

    def experts_in(module: Any, args: tuple, kwargs: dict) -> None:
        seen["input"] = args[0] if args else kwargs["hidden_states"]
        if moe.routing == "call":
            seen["index"] = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            seen["weights"] = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))

    def experts_out(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        seen["output"] = out[0] if isinstance(out, tuple) else out

    down = moe.block.output_linear if moe.routing == "sorted" else moe.experts_module
    tap = ExpertTap(moe, where)
    handles = tap.install() + [moe.experts_module.register_forward_pre_hook(experts_in, with_kwargs=True)]
    handles.append(down.register_forward_hook(experts_out, with_kwargs=True))
    try:
        moe.block(hidden)
        rows = tap.take()
    except GluscopeError:
        raise
    except Exception as error:  # another calling convention: not a layout we know
        raise GluscopeError(f"{where}: its experts ({type(moe.experts_module).__name__}) do not run as gluscope "
                            f"reads them ({type(error).__name__}: {str(error)[:160]})") from None
    finally:
        for handle in handles:
            handle.remove()
    x = seen["input"].reshape(-1, d_model)
    x = x[rows.token] if moe.routing == "call" else x  # Llama 4, JetMoE: the experts' input row by row
    member = rows.member if rows.member is not None else torch.ones_like(rows.token, dtype=torch.bool)
    tolerance = 1e-4 if param.dtype == torch.float32 else 3e-2
    post = (rows.swish * rows.in_ if rows.post is None else rows.post).float()
    out = torch.zeros(len(rows.token), d_model, dtype=torch.float32, device=param.device)
    for e in range(moe.n_experts):
        mine = (rows.expert == e) & member
        expert = moe.experts[e]
        gate = torch.nn.functional.linear(x[mine], expert.w_gate, expert.b_gate).float()
        in_ = torch.nn.functional.linear(x[mine], expert.w_in, expert.b_in).float()
        if moe.rows is not None:  # the family's own values of the interleaved row
            gate, in_, _ = moe.rows(torch.stack([gate, in_], dim=-1).flatten(-2))
        for name, got, want in (("gate", rows.gate[mine], gate), ("in", rows.in_[mine], in_)):
            scale = float(want.abs().max()) if want.numel() else 1.0
            if not torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance * max(scale, 1e-6)):
                raise GluscopeError(
                    f"{where}: the rows expert {e} of {type(moe.experts_module).__name__} computed are not its {name} "
                    "as gluscope reads its weights; gluscope records experts computing down(act(gate) * in) only")
        out[mine] = torch.nn.functional.linear(post[mine], expert.w_out.float())
    theirs = seen["output"].float().reshape(-1, d_model)
    if moe.routing == "call":  # the experts sum each token's rows, weighted by its routing weights
        index = seen["index"].reshape(-1, seen["index"].shape[-1])
        weights = seen["weights"].float().reshape(index.shape)
        routing = ((index[rows.token] == rows.expert[:, None]) * weights[rows.token]).sum(dim=1)
        bias = getattr(moe.experts_module, "down_proj_bias", None)
        if bias is not None:  # gpt-oss: the down projection's bias, inside the weighting
            out = out + bias[rows.expert].float()
        ours = torch.zeros_like(theirs).index_add_(0, rows.token, out * routing[:, None])
    else:
        ours = torch.where(member[:, None], out, 0.0)
        theirs = torch.where(member[:, None], theirs, 0.0)
    scale = float(theirs.abs().max()) or 1.0
    if not torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance * scale):
        raise GluscopeError(
            f"{where}: {type(moe.experts_module).__name__} does not compute down(act(gate) * in) from the rows "
            "gluscope reads; gluscope records experts of that form only")
