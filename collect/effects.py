"""Each example's direct effect on the output: what a collection records for it.

A neuron adds ``post * w_out`` to the residual stream. Read out directly (no later layer in between)
through the final norm and the unembedding, at a position where the final norm's scale is ``s``, it
changes the logit of token ``t`` by ``post * s * W_U[t] . (g_final * g_post * w_out)`` (a centring
norm also removes the mean of the vector first): the final norm's elementwise scale ``g_final`` and
``W_U`` come from the weights, ``post`` from the example, ``s`` from the position. So a collection
records two things (``mkdocs_gluscope.effects`` reads them back):

* ``corpus/final_scale``: ``s`` at every corpus position, measured by a forward hook on the final
  norm (:func:`final_scale_hook`) from the module's own input ``x`` and output ``y``:
  ``s = <y - N(0), u> / <u, u>`` with ``u = g * (x - [mean x])``, exact for every norm of the form
  ``g * (x - [mean x]) / sqrt(var + eps) + b`` (RMSNorm, LayerNorm, Gemma's ``1 + weight``) without
  knowing its ``eps``. The run now goes on to the final norm (it used to stop after the last recorded
  MLP) and stops there: the unembedding is still skipped.
* ``top/next_score``: for every top-k example, ``W_U[t] . (g_final * g_post * w_out)`` of the token
  ``t`` that follows it in its document (:class:`NextTokenScores`, at the end of the run, from the
  weights after refactor_glu: the ``vocab/`` ``out`` score of that token).

Left out, and said so in the file's ``effect_norm`` attribute: a post-MLP norm (OLMo-2's and
Gemma-2/3's ``post_feedforward_layernorm``) also divides the whole MLP output by its rms at the
position, which the run does not record, so for those families the effect is the one before that
division; final-logit soft-capping (Gemma-2) is monotone and left out; expert neurons have no
effects (the router's weight at the position would multiply them, and is not recorded).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import numpy as np
import torch

from collect.vocab import find_modules, linear_part, norm_scale, out_directions

#: The per-position scales travel with the run's per-run counters (``routed``: checkpointed with
#: the statistics and restored by ``--resume``) under this key; 0 where no batch has written yet.
FINAL_SCALE_KEY = "final_scale"


class FinalNorm:
    """The model's final norm and its linear part (elementwise scale, centring, ``N(0)``)."""

    def __init__(self, loaded: Any) -> None:
        modules = find_modules(loaded, [])
        if modules.final_norm is None:
            raise ValueError("the model's adapter names no final norm")
        self.module = modules.final_norm
        param = modules.unembed
        d_model = param.shape[1]
        self.scale, self.centres = norm_scale(self.module, d_model, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            self.zero = self.module(torch.zeros(1, d_model, dtype=param.dtype, device=param.device)).float()[0]

    def position_scales(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``s`` [...] at every position of the norm's input ``x`` and output ``y`` [..., d_model]."""
        u = linear_part(x.float(), self.scale, self.centres)
        return ((y.float() - self.zero) * u).sum(-1) / (u * u).sum(-1)


def start_final_scales(loaded: Any, corpus: Any, routed: dict[str, torch.Tensor], device: torch.device | str
                       ) -> FinalNorm | None:
    """The final norm, with the run's scales in ``routed[FINAL_SCALE_KEY]``: ``[n_tokens + 1]``
    float32, 0 where no batch has written yet (kept if a resumed checkpoint brought them), the last
    slot taking padding. None, with a warning, where the model's final norm cannot be found."""
    try:
        norm = FinalNorm(loaded)
    except ValueError as e:
        print(f"gluscope: no effects in this file: {e}", file=sys.stderr)
        return None
    if FINAL_SCALE_KEY not in routed:
        routed[FINAL_SCALE_KEY] = torch.zeros(len(corpus.tokens) + 1, dtype=torch.float32, device=device)
    return norm


@contextlib.contextmanager
def final_scale_hook(norm: FinalNorm | None, routed: dict[str, torch.Tensor], first_token: np.ndarray,
                     lengths: torch.Tensor) -> Iterator[None]:
    """While inside, a forward of the model writes ``s`` of every real position of its batch into
    ``routed[FINAL_SCALE_KEY]`` (row ``r``'s position ``t`` at ``first_token[r] + t``, padding into the
    last slot, without a host sync), then stops the forward pass (``StopForward``: the unembedding is
    skipped). Nothing happens where ``norm`` is None."""
    if norm is None:
        yield
        return
    from collect.model import StopForward

    scales = routed[FINAL_SCALE_KEY]
    first = torch.from_numpy(np.asarray(first_token, dtype=np.int64)).to(scales.device, non_blocking=True)

    def hook(module: Any, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        y = output[0] if isinstance(output, tuple) else output
        s = norm.position_scales(x, y)  # [B, T]
        t = torch.arange(s.shape[1], device=s.device)
        index = torch.where(t[None, :] < lengths[:, None], first[:, None] + t[None, :], scales.shape[0] - 1)
        scales.scatter_(0, index.reshape(-1), s.reshape(-1))
        raise StopForward

    handle = norm.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def share_final_scales(world: Any, scales: torch.Tensor | None) -> None:
    """Under torchrun every rank writes its own batches' positions: the elementwise maximum gives
    every rank all of them (scales are positive, 0 where unwritten), and is idempotent, so it is
    safe at every checkpoint and at the end."""
    if scales is None or world.size == 1:
        return
    import torch.distributed as dist

    dist.all_reduce(scales, op=dist.ReduceOp.MAX)


def file_final_scale(scales: torch.Tensor) -> np.ndarray:
    """``corpus/final_scale`` as written: float32 per corpus position, NaN where no batch of this run
    (or shard) covered it."""
    values = scales[:-1].float().cpu().numpy()
    return np.where(values > 0, values, np.nan).astype(np.float32)


class NextTokenScores:
    """``top/next_score`` of a prepared model's dense layers: the norms and unembedding found once."""

    def __init__(self, loaded: Any, layers: list[int]) -> None:
        self.loaded = loaded
        self.modules = find_modules(loaded, layers)
        m = self.modules
        dtype, device, d_model = m.unembed.dtype, m.unembed.device, m.unembed.shape[1]
        self.final = norm_scale(m.final_norm, d_model, dtype=dtype, device=device) if m.final_norm is not None else None
        self.post = {layer: norm_scale(m.post_mlp[layer], d_model, dtype=dtype, device=device)
                     for layer in layers if m.post_mlp[layer] is not None}


    @torch.no_grad()
    def __call__(self, layer: int, top_doc: torch.Tensor, top_pos: torch.Tensor, tokens: np.ndarray,
                 doc_offsets: np.ndarray, *, budget: int = 1 << 26) -> np.ndarray:
        """``[N, C, H, k]`` float32: the ``out`` score of the token after each example (NaN for an empty
        slot and for an example at its document's last token); neuron blocks of at most ``budget``
        gathered floats."""
        direction = out_directions(self.loaded.mlps[layer].w_out, self.post.get(layer), self.final)  # [N, d]
        unembed = self.modules.unembed
        doc = top_doc.cpu().numpy().astype(np.int64)
        pos = top_pos.cpu().numpy().astype(np.int64)
        safe = np.clip(doc, 0, len(doc_offsets) - 2)
        at = doc_offsets[safe] + pos + 1
        has_next = (doc >= 0) & (at < doc_offsets[safe + 1])
        ids = torch.from_numpy(np.where(has_next, tokens[np.where(has_next, at, 0)], 0)).to(direction.device)
        N = ids.shape[0]
        block = max(1, budget // max(ids[0].numel() * direction.shape[1], 1))
        out = torch.empty(ids.shape, dtype=torch.float32)
        for a in range(0, N, block):
            b = min(a + block, N)
            rows = unembed[ids[a:b].reshape(b - a, -1)].float()  # [n, C*H*k, d]
            out[a:b] = torch.einsum("nld,nd->nl", rows, direction[a:b]).reshape(ids[a:b].shape).cpu()
        return np.where(has_next, out.numpy(), np.nan).astype(np.float32)


def describe(loaded: Any) -> str:
    """The file's ``effect_norm`` attribute: how the norms entered the effects, and what is left out."""
    m = find_modules(loaded, sorted(loaded.mlps))
    final = m.names["final"]
    text = (f"effect = post * s * W_U[t] . (g({final})"
            + (f" * g({m.names['post']})" if m.names["post"] != "none" else "")
            + " * w_out), s = corpus/final_scale at the example's position, t = the next token; g = a norm's "
              "elementwise scale (mean removed first for a centring norm)")
    if m.names["post"] != "none":
        text += (f"; left out: {m.names['post']} also divides the MLP output by its rms at the position (not "
                 "recorded)")
    return text
