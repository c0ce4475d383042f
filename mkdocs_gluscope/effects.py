"""Each example's direct effect on the output, read from an activations file (no model).

At an example's position the neuron adds ``post * w_out`` to the residual stream. Read out directly
through the final norm (its scale ``s`` at that position held fixed) and the unembedding, that changes
the logit of every token ``t`` by ``post * s * score(t)``, where ``score(t) = W_U[t] . (g_final *
g_post * w_out)`` is the neuron's ``vocab/`` ``out`` score of ``t``. A collection records ``s`` at
every corpus position (``corpus/final_scale``) and, for every top-k example, the score of the token
that actually follows it (``top/next_score``): so

* the **effect** of an example is ``post * s * next_score``: how much the neuron, by itself and by the
  direct path, raised (or lowered) the logit of the token that came next;
* the tokens it raises and lowers most there are the neuron's ``out`` top and bottom lists, each
  changed by ``post * s * score`` (``post * s`` is the same factor for every token; where it is
  negative, the bottom list is what it raises).

``post`` is the example's hook_post: the recorded value in a hook_post list, and in the other lists
act(gate)·in at the window's centre as the page computes it (from the stored gate and in windows).
What the effect leaves out (a post-MLP norm's division by the rms of the MLP output, final-logit
soft-capping) is in the file's ``effect_norm`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mkdocs_gluscope.store import VOCAB_WEIGHTS, NeuronData

_OUT = VOCAB_WEIGHTS.index("out")


@dataclass
class Effects:
    """Effects of one neuron's top-k examples, ``[C, H, k]`` each (NaN where unknown: an empty slot, an
    example at its document's last token)."""

    effect: np.ndarray  # post * s * next_score: the change of the next token's logit
    factor: np.ndarray  # post * s: every token t's logit changes by factor * score(t)


#: Tokens an example's tooltip names as raised and lowered most.
RAISED = 5


def direct_effect(post: np.ndarray, final_scale: np.ndarray, next_score: np.ndarray) -> Effects:
    """The effects of examples with these ``post`` values, final-norm scales and next-token scores
    (arrays of one shape)."""
    factor = np.asarray(post, dtype=np.float64) * final_scale
    return Effects(effect=factor * next_score, factor=factor)


def example_effects(data: NeuronData, post: np.ndarray) -> Effects | None:
    """The effects of ``data``'s top-k examples given each example's ``post`` ``[C, H, k]``; None where
    the file has no effects."""
    if data.top_next_score is None or data.top_final_scale is None:
        return None
    return direct_effect(post, data.top_final_scale, data.top_next_score)


def raised_and_lowered(data: NeuronData, factor: float, n: int = RAISED) -> tuple[list[tuple[int, float]],
                                                                              list[tuple[int, float]]]:
    """The ``n`` tokens whose logit an example with ``factor`` (= post * s) raises most and lowers
    most, as ``(token id, change)``, from the neuron's ``out`` lists; empty without them."""
    if data.vocab_token is None or data.vocab_score is None or not np.isfinite(factor) or factor == 0:
        return [], []
    tokens, scores = data.vocab_token[_OUT], data.vocab_score[_OUT]  # [2, K]: top, bottom
    up, down = (0, 1) if factor > 0 else (1, 0)

    def listed(direction: int) -> list[tuple[int, float]]:
        return [(int(t), float(factor * s)) for t, s in zip(tokens[direction][:n], scores[direction][:n]) if t >= 0]

    return listed(up), listed(down)
