"""A reproducible rule for choosing neurons worth a page, from the statistics alone.

Two kinds of neuron stand out in a four-case view:

* **rare-case standouts** (``per_layer`` per layer): a case the neuron is rarely in (under
  ``rare`` of tokens, with at least k examples) whose most extreme hook_post is large compared with
  the same case in the rest of the layer: divided by the 99th percentile, over the layer's neurons
  with an example of that case, of that case's extreme. Each case has its own scale because the
  cases differ in size by construction (with SiLU, ``|act(gate)| <= 0.28`` when gate < 0, so
  gate- cases are far smaller than gate+ ones and would never win against one scale per layer).
  These are the paper's "gate-_in-" kind of neuron that a max-activation tool never shows.
  Examples at the start of their document (positions below
  :func:`~mkdocs_gluscope.store.early_end`, the rule pages use for their "start of document"
  badge) are left out of the score and of the scales: many models put huge activations there
  (attention sinks), which would make every rare-case list look alike.
* **unusual case mixes** (``mix`` in all, at most one per layer): the neurons whose four case
  frequencies are farthest (L1 distance) from their layer's average mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mkdocs_gluscope.store import CASES, ActivationsFile, early_end


@dataclass
class Pick:
    layer: int
    neuron: int
    reason: str
    score: float

    @property
    def id(self) -> str:
        return f"{self.layer}.{self.neuron}"


def case_scales(magnitude: np.ndarray, percentile: float = 99) -> np.ndarray:
    """Each case's scale in one layer: the ``percentile`` of ``magnitude`` [N, C] (each neuron's
    extreme ``|hook_post|`` in the case) over the neurons that have an example of the case (1.0
    where none has)."""
    scales = np.ones(magnitude.shape[-1])
    for c in range(magnitude.shape[-1]):
        present = magnitude[:, c][magnitude[:, c] > 0]
        if len(present):
            scales[c] = np.percentile(present, percentile) or 1.0
    return scales


def case_extremes(values: np.ndarray, pos: np.ndarray, early: int) -> tuple[np.ndarray, np.ndarray]:
    """Each case's most extreme hook_post after the start of its document (the pages' badge rule):
    from ``top/value`` and ``top/pos`` of hook_post ``[..., C, k]``, the magnitude ``[..., C]``
    (0 where the case has no such example) and the signed value."""
    magnitude_k = np.where(pos >= early, np.nan_to_num(np.abs(values), nan=0.0), 0.0)
    best_j = magnitude_k.argmax(axis=-1)
    magnitude = np.take_along_axis(magnitude_k, best_j[..., None], -1)[..., 0]
    return magnitude, np.take_along_axis(values, best_j[..., None], -1)[..., 0]


def layer_case_scales(f: ActivationsFile, layer: int, expert: int | str | None = None) -> np.ndarray:
    """:func:`case_scales` of one model layer of ``f`` (or of one expert's neurons there): what pick
    divides each case's extreme by."""
    if expert is None:
        prefix, row = "", f.row(layer)
    else:
        group, row = f.expert_rows[(layer, expert)]
        prefix = group + "/"
    post = (row, slice(None), slice(None), 0)  # every neuron and case, hook_post
    magnitude, _ = case_extremes(f.read(prefix + "top/value", post), f.read(prefix + "top/pos", post), early_end(f.attrs))
    return case_scales(magnitude)


def pick_neurons(f: ActivationsFile, *, per_layer: int = 1, mix: int = 10, rare: float = 0.10,
                 per_case: int = 2) -> list[Pick]:
    """Rare-case standouts (``per_layer`` per layer), then the best of each case that has fewer
    than ``per_case`` of them (over all layers: so every case a neuron has rarely shows), then the
    ``mix`` most unusual case mixes (one per layer)."""
    freq = f.frequency()  # [L, N, C]
    count = f.stat("count")
    hook_post = (slice(None), slice(None), slice(None), 0)
    magnitude, post = case_extremes(f.read("top/value", hook_post), f.read("top/pos", hook_post), early_end(f.attrs))
    picks: list[Pick] = []
    chosen: set[tuple[int, int]] = set()
    scores = np.zeros(magnitude.shape)  # [L, N, C]
    for row in range(len(f.layers)):
        eligible = (freq[row] < rare) & (count[row] >= f.k)
        scores[row] = np.where(eligible, magnitude[row] / case_scales(magnitude[row]), 0.0)
    by_case = [0] * len(CASES)

    def add(row: int, neuron: int, c: int) -> None:
        picks.append(Pick(f.layers[row], neuron, f"rare {CASES[c]} ({100 * freq[row, neuron, c]:.2g}% of tokens) "
                                                 f"reaches hook_post {post[row, neuron, c]:.3g}",
                          float(scores[row, neuron, c])))
        chosen.add((f.layers[row], neuron))
        by_case[c] += 1

    for row in range(len(f.layers)):
        best_case = scores[row].argmax(axis=-1)
        best = scores[row].max(axis=-1)
        for neuron in np.argsort(-best, kind="stable")[:per_layer]:
            if best[neuron] > 0:
                add(row, int(neuron), int(best_case[neuron]))
    for c in range(len(CASES)):
        for flat in np.argsort(-scores[..., c], axis=None, kind="stable"):
            row, neuron = (int(x) for x in np.unravel_index(flat, scores.shape[:2]))
            if by_case[c] >= per_case or scores[row, neuron, c] <= 0:
                break
            if (f.layers[row], neuron) not in chosen:
                add(row, neuron, c)
    distance = np.abs(freq - freq.mean(axis=1, keepdims=True)).sum(axis=-1)  # [L, N]
    layers_used: set[int] = set()
    for flat in np.argsort(-distance, axis=None, kind="stable"):
        if mix <= 0:
            break
        row, neuron = np.unravel_index(flat, distance.shape)
        layer = f.layers[row]
        if (layer, int(neuron)) in chosen or layer in layers_used:
            continue
        layers_used.add(layer)
        mix_text = " / ".join(f"{100 * x:.0f}" for x in freq[row, neuron])
        picks.append(Pick(layer, int(neuron), f"unusual case mix {mix_text}% (++/+-/-+/--)", float(distance[row, neuron])))
        chosen.add((layer, int(neuron)))
        mix -= 1
    picks.sort(key=lambda p: (p.layer, p.neuron))
    return picks


def picks_yaml(picks: list[Pick]) -> str:
    """The ``neurons:`` entries for mkdocs.yml, each with its reason as a comment."""
    return "\n".join(f'        - "{p.id}"  # {p.reason}' for p in picks)
