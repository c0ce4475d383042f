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

from mkdocs_gluscope.store import CASES, SHARED, ActivationsFile, early_end, neuron_id


@dataclass
class Pick:
    layer: int
    neuron: int
    reason: str
    score: float
    expert: int | str | None = None  # a routed expert's index, SHARED, or None for a dense layer's neuron

    @property
    def id(self) -> str:
        return neuron_id(self.layer, self.neuron, self.expert)


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


@dataclass
class NeuronSet:
    """Neurons scored against one another: a dense layer, the routed experts of one MoE layer
    (expert after expert, ``d_expert`` neurons each), or a shared expert. ``freq`` is each case's
    share of the tokens the neurons see (for a routed expert: of the tokens routed to it)."""

    layer: int
    experts: list[int | str | None]  # one entry per block of d neurons
    d: int
    freq: np.ndarray  # [N, C]
    count: np.ndarray  # [N, C]
    magnitude: np.ndarray  # [N, C]
    post: np.ndarray  # [N, C]
    routing: np.ndarray | None = None  # [N] routing frequency of each neuron's expert (routed experts)

    def which(self, n: int) -> tuple[int | str | None, int]:
        return self.experts[n // self.d], n % self.d


def dense_set(f: ActivationsFile, layer: int) -> NeuronSet:
    """One dense layer's neurons as a :class:`NeuronSet`."""
    row = f.row(layer)
    count = f.read("stats/count", row)
    hook_post = (row, slice(None), slice(None), 0)  # every neuron and case, hook_post
    magnitude, post = case_extremes(f.read("top/value", hook_post), f.read("top/pos", hook_post), early_end(f.attrs))
    return NeuronSet(layer, [None], f.d_mlp, count / max(f.n_tokens, 1), count, magnitude, post)


def expert_set(f: ActivationsFile, layer: int, shared: bool) -> NeuronSet | None:
    """One MoE layer's routed experts together (each case's scale is then its scale among the layer's
    experts), or its shared expert, as a :class:`NeuronSet`; None if the file has none."""
    experts = [e for e in f.experts_of(layer) if (e == SHARED) == shared]
    if not experts:
        return None
    rows = [f.expert_rows[layer, e][1] for e in experts]
    group = "shared_experts/" if shared else "experts/"
    count = f.read(group + "stats/count", rows)  # [E, d, C]
    routed = np.array([max(f.routed[layer, e], 1) for e in experts], dtype=np.float64)
    hook_post = (rows, slice(None), slice(None), 0)
    magnitude, post = case_extremes(f.read(group + "top/value", hook_post), f.read(group + "top/pos", hook_post),
                                    early_end(f.attrs))
    d = count.shape[1]

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(experts) * d, *x.shape[2:])

    return NeuronSet(layer, experts, d, flat(count / routed[:, None, None]), flat(count), flat(magnitude), flat(post),
                     np.repeat(routed / max(f.n_tokens, 1), d))


def neuron_sets(f: ActivationsFile) -> list[NeuronSet]:
    """Every scored set of ``f``: its dense layers, then per MoE layer its routed experts and its
    shared expert."""
    sets = [dense_set(f, layer) for layer in f.layers] if f.d_mlp else []
    for layer in f.expert_layers:
        sets += [s for s in (expert_set(f, layer, False), expert_set(f, layer, True)) if s is not None]
    return sets


def layer_case_scales(f: ActivationsFile, layer: int, expert: int | str | None = None) -> np.ndarray:
    """:func:`case_scales` of one model layer of ``f`` (for an ``expert``'s neuron: of the layer's
    routed experts together, or of its shared expert): what pick divides each case's extreme by."""
    found = dense_set(f, layer) if expert is None else expert_set(f, layer, expert == SHARED)
    return case_scales(found.magnitude)


def pick_neurons(f: ActivationsFile, *, per_layer: int = 1, mix: int = 10, rare: float = 0.10,
                 per_case: int = 2) -> list[Pick]:
    """Rare-case standouts (``per_layer`` per layer, and as many among each MoE layer's experts and
    shared expert), then the best of each case that has fewer than ``per_case`` of them (over every
    layer and expert: so every case a neuron has rarely shows), then the ``mix`` most unusual case mixes
    (one per set). An expert neuron's case frequency is a share of the tokens routed to its expert,
    and its extreme is judged against the same case's scale among the layer's experts."""
    sets = neuron_sets(f)
    picks: list[Pick] = []
    chosen: set[str] = set()
    scores = [np.where((s.freq < rare) & (s.count >= f.k), s.magnitude / case_scales(s.magnitude), 0.0) for s in sets]
    by_case = [0] * len(CASES)

    def add(i: int, n: int, c: int) -> None:
        s = sets[i]
        expert, neuron = s.which(n)
        routed = "" if s.routing is None else f", routed {100 * s.routing[n]:.2g}% of tokens"
        share = "of its expert's tokens" if s.routing is not None else "of tokens"
        pick = Pick(s.layer, neuron, f"rare {CASES[c]} ({100 * s.freq[n, c]:.2g}% {share}{routed}) "
                                     f"reaches hook_post {s.post[n, c]:.3g}", float(scores[i][n, c]), expert)
        picks.append(pick)
        chosen.add(pick.id)
        by_case[c] += 1

    for i in range(len(sets)):
        best_case = scores[i].argmax(axis=-1)
        best = scores[i].max(axis=-1)
        for n in np.argsort(-best, kind="stable")[:per_layer]:
            if best[n] > 0:
                add(i, int(n), int(best_case[n]))
    for c in range(len(CASES)):
        candidates = sorted(((float(scores[i][n, c]), i, int(n)) for i in range(len(sets))
                             for n in np.argsort(-scores[i][:, c], kind="stable")[:per_case + len(chosen)]),
                            key=lambda x: -x[0])
        for score, i, n in candidates:
            if by_case[c] >= per_case or score <= 0:
                break
            expert, neuron = sets[i].which(n)
            if neuron_id(sets[i].layer, neuron, expert) not in chosen:
                add(i, n, c)
    mixes = []
    for i, s in enumerate(sets):
        distance = np.abs(s.freq - s.freq.mean(axis=0, keepdims=True)).sum(axis=-1)  # [N]
        for n in np.argsort(-distance, kind="stable")[:1 + len(chosen)]:
            expert, neuron = s.which(int(n))
            if neuron_id(s.layer, neuron, expert) not in chosen:
                mixes.append((float(distance[n]), i, int(n)))
                break
    for distance, i, n in sorted(mixes, key=lambda x: -x[0])[:max(mix, 0)]:
        s = sets[i]
        expert, neuron = s.which(n)
        mix_text = " / ".join(f"{100 * x:.0f}" for x in s.freq[n])
        pick = Pick(s.layer, neuron, f"unusual case mix {mix_text}% (++/+-/-+/--)", distance, expert)
        picks.append(pick)
        chosen.add(pick.id)
    picks.sort(key=lambda p: (p.layer, -1 if p.expert is None else 10**9 if p.expert == SHARED else p.expert,
                              p.neuron))
    return picks


def picks_yaml(picks: list[Pick]) -> str:
    """The ``neurons:`` entries for mkdocs.yml, each with its reason as a comment."""
    return "\n".join(f'        - "{p.id}"  # {p.reason}' for p in picks)


#: ``gluscope pick --by-score``: a case's score counts when this many of its positions were scored.
MIN_SCORED_POSITIONS = 20


def pick_by_score(f: ActivationsFile, n: int, *, min_positions: int = MIN_SCORED_POSITIONS,
                  worst: bool = False) -> list[Pick]:
    """The ``n`` neurons whose best-explained case scores highest (``worst``: whose worst-explained
    case scores lowest), among cases with at least ``min_positions`` scored positions; dense layers."""
    from mkdocs_gluscope.explanations import GROUP

    if GROUP not in f.file or not np.isfinite(f.file[GROUP]["score"][...]).any():
        raise KeyError(f"{str(f.path)!r} has no scored explanations (gluscope explain --score writes them)")
    g = f.file[GROUP]
    score = g["score"][...].astype(np.float64)  # [L, N, C]
    usable = np.isfinite(score) & (g["scored_positions"][...] >= min_positions)
    ranked = np.where(usable, score if worst else -score, np.inf)
    best_case = ranked.argmin(axis=-1)  # [L, N]
    best = ranked.min(axis=-1)
    picks = []
    for flat in np.argsort(best, axis=None, kind="stable")[:n]:
        row, neuron = (int(x) for x in np.unravel_index(flat, best.shape))
        if not np.isfinite(best[row, neuron]):
            break
        c = int(best_case[row, neuron])
        label = g["label"].asstr()[row, neuron, c]
        picks.append(Pick(f.layers[row], neuron, f"{CASES[c]} explained as {label} (score {score[row, neuron, c]:.2f})",
                          float(score[row, neuron, c])))
    return picks
