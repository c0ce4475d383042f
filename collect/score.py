"""Scoring explanations by simulation against the model, on text the explainer never saw.

For every explained case the rule-based simulator (:class:`mkdocs_gluscope.explanations.Simulator`)
predicts an activation at each token of held-out documents from the explanation alone, and the model
gives the true one: ``post`` where the token is in the case, else 0. Scores, as Bills et al. (2023)
define the "all at once" score, and two more:

* ``score``: the correlation of simulated and true activations over the positions of a mix of
  sequences (windows of :data:`SEQUENCE` tokens of the held-out documents): the case's ``top``
  sequences (those where its true activation reaches the largest ``|post|``) and ``random``
  sequences, the same for every case (drawn by the sampling hash of
  :func:`~mkdocs_gluscope.distributions.position_priority`); a sequence in both counts once;
* ``precision`` and ``recall`` of the case's **strong** positions over the same positions: truly
  strong where ``|post|`` in the case reaches the explanation's ``threshold``, predicted strong where
  the simulation (in the case's sign) reaches the simulator's ``strong_level`` (half the
  explanation's largest weight).

Positions before :func:`~mkdocs_gluscope.store.early_end` of each document are left out, as the
explainer, pages and ``gluscope pick`` leave them out (attention-sink outliers that no token
explains). One forward pass serves every layer: all statistics are streamed, per batch, as sums
per sequence.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from collect.corpus import Corpus, Text, dataset_source, plan_batches, read_texts, token_strings, tokenize_corpus
from collect.model import LoadedModel, dtype_name, load_model, resolve_device, resolve_dtype, run_with_mlp_hooks
from collect.moe import ExpertRows
from mkdocs_gluscope.distributions import document_pieces, position_priority
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.explain_run import Unit
from mkdocs_gluscope.explanations import ARRAYS, STRINGS, Simulator, document_positions, token_classes
from mkdocs_gluscope.store import CASES, HOOK_SIGNS, SHARED, ActivationsFile, early_end

#: Tokens per scored sequence (Bills et al. used 64-token excerpts).
SEQUENCE = 64
#: Top sequences per case, and random sequences shared by every case.
TOP_SEQUENCES, RANDOM_SEQUENCES = 10, 40
#: Held-out tokens read by default.
SCORE_TOKENS = 32_000
#: Seed of the random sequences' draw (recorded as ``score_seed``).
SEED = 0
# Sums kept per sequence and explanation: positions, x, y, x*x, y*y, x*y, positions in the case.
_N, _X, _Y, _XX, _YY, _XY, _CASE = range(7)
_SUMS = 7


@dataclass
class HeldOut:
    """The held-out documents and which of their sequences are the random ones."""

    corpus: Corpus
    description: str
    random: np.ndarray  # [n_docs, max sequences] bool


def dataset_of(attrs: dict[str, Any]) -> list[str]:
    """The collection's ``--dataset`` as its file recorded it (``dataset_path`` for the demo)."""
    recorded = attrs.get("dataset_path") or attrs.get("dataset") or ""
    return [part for part in str(recorded).split(", ") if part]


def held_out_texts(dataset: Sequence[str], attrs: dict[str, Any], used_rows: np.ndarray, *, text_column: str,
                   split: str) -> tuple[Iterator[Text], str]:
    """The texts to score on, and a sentence saying which: with the collection's own dataset, its
    rows the file does not hold (read in the collection's order); with another, every text."""
    same = list(dataset) == dataset_of(attrs) or ", ".join(dataset) == str(attrs.get("dataset", ""))
    if same:
        rows = set(int(r) for r in used_rows)
        texts = read_texts(list(dataset), text_column=text_column, split=split, seed=int(attrs.get("seed", 0)))
        return ((t for t in texts if t.source_index not in rows),
                f"texts of the collection's dataset that the file does not hold ({len(rows):,} rows left out)")
    return read_texts(list(dataset), text_column=text_column, split=split, seed=0), "every text of the dataset"


def random_sequences(corpus: Corpus, first: int, count: int, seed: int = SEED) -> np.ndarray:
    """``[n_docs, max sequences]`` bool: the ``count`` sequences of lowest sampling priority among
    those holding a scored position (priority of the sequence's first position)."""
    lengths = corpus.lengths
    n_seq = int(-(-lengths.max() // SEQUENCE))
    starts = np.arange(n_seq)[None, :] * SEQUENCE
    real = (starts + SEQUENCE > first) & (starts < lengths[:, None])
    pieces = document_pieces(corpus.source_index)
    prio = position_priority(seed, corpus.source_index[:, None], pieces[:, None], starts)
    prio = np.where(real, prio, np.iinfo(np.int64).max)
    flat = np.argsort(prio, axis=None, kind="stable")[:min(count, int(real.sum()))]
    out = np.zeros(real.shape, dtype=bool)
    out.reshape(-1)[flat] = True
    return out


@dataclass
class _Target:
    """One unit's explanation sets under scoring: which neurons, their simulators, and what the pass keeps.

    The pass keeps, per explanation column (``M = N' * 4``, neuron-major): the true activations of its
    ``D`` top sequences so far (``top_y``, with their documents and sequence numbers), and each set's
    sums over the random sequences (whose simulation is cheap: few positions for every column). The
    top sequences are simulated once the pass is over, each column at its own sequences only."""

    unit: Unit
    neurons: torch.Tensor  # [N'] listed neuron indices
    simulators: list[Simulator]  # one per explanation set
    threshold: np.ndarray  # [M] truly strong from this |post| (inf where the case has none)
    sign: np.ndarray  # [M]
    strong: list[np.ndarray]  # per set [M]: predicted strong from this prediction (times sign)
    random: list[np.ndarray]  # per set [M, 7] float64 sums over the random sequences
    random_counts: list[np.ndarray]  # per set [M, 3] int64: predicted strong, true strong, both
    top_key: torch.Tensor  # [M, D] max |y| of each kept top sequence (> 0), -1 when empty
    top_doc: torch.Tensor  # [M, D] held-out document of each, -1 when empty
    top_seq: torch.Tensor  # [M, D] its sequence number in the document
    top_random: torch.Tensor  # [M, D] bool: the sequence is a random one too (counted there)
    top_y: torch.Tensor  # [M, D, SEQUENCE] true activations (0 outside scored positions)

    @classmethod
    def of(cls, unit: Unit, sets: Sequence[dict[str, np.ndarray]], simulator: Callable[[dict[str, np.ndarray]], Any],
           top: int) -> "_Target":
        idx = unit.neurons
        M = len(idx) * len(CASES)
        sign = np.tile(np.array([s[0] for s in HOOK_SIGNS], dtype=np.float32), len(idx))
        flat = [{name: np.asarray(a[name])[idx].reshape((M,) + np.asarray(a[name]).shape[2:]) for name in a
                 if name in ARRAYS or name in STRINGS} | {"sign": sign} for a in sets]
        threshold = np.asarray(sets[0]["threshold"], dtype=np.float32)[idx].reshape(M)
        simulators = [simulator(a) for a in flat]
        return cls(unit=unit, neurons=torch.from_numpy(idx), simulators=simulators,
                   threshold=np.nan_to_num(threshold, nan=np.inf), sign=sign,
                   strong=[sim.strong_level(sign) for sim in simulators],
                   random=[np.zeros((M, _SUMS)) for _ in sets], random_counts=[np.zeros((M, 3), np.int64) for _ in sets],
                   top_key=torch.full((M, top), -1.0), top_doc=torch.full((M, top), -1, dtype=torch.int64),
                   top_seq=torch.zeros((M, top), dtype=torch.int64), top_random=torch.zeros((M, top), dtype=torch.bool),
                   top_y=torch.zeros((M, top, SEQUENCE)))

    def add(self, gate: torch.Tensor, in_: torch.Tensor, docs: np.ndarray, positions: tuple[np.ndarray, ...],
            valid: torch.Tensor, is_random: np.ndarray, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One batch: ``gate``/``in_`` ``[B, T, N]`` (NaN where the neuron did not run: an expert's
        unrouted tokens), ``docs`` ``[B]`` held-out documents, ``positions`` the batch's
        ``(current, previous, following)`` (:meth:`Simulator.positions`), ``valid`` ``[B, T]`` the
        scored positions, ``is_random`` ``[B, J]`` the random sequences."""
        every = len(self.neurons) == gate.shape[-1]  # all of the row's neurons: no copy
        g = (gate if every else gate[..., self.neurons]).float()
        i = (in_ if every else in_[..., self.neurons]).float()
        B, T, n = g.shape
        J = T // SEQUENCE
        # post where the position is scored and finite (an expert's unrouted tokens are NaN), else 0; with the
        # case of each (position, neuron) (0..3 in CASES order: gate sign, then in sign), the true activation of
        # case c is post where the case is c: never built whole ([B, T, 4N]), only where needed. (A zero gate or
        # in has no case, and a post of 0, which no sum or maximum below sees.)
        post = torch.nan_to_num_(act(g) * i, nan=0.0, posinf=0.0, neginf=0.0).mul_(valid[..., None])
        case = (((g < 0).to(torch.uint8) << 1) | (i < 0).to(torch.uint8)).view(B, J, SEQUENCE, n)
        post = post.view(B, J, SEQUENCE, n)
        held = valid.reshape(B, J, SEQUENCE).any(-1).numpy()  # [B, J]: sequences with a scored position

        def true_activation(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            """``[..., n, 4]`` from post and case ``[..., n]``."""
            return torch.stack([torch.where(k == c, p, 0.0) for c in range(len(CASES))], dim=-1)

        # Random sequences: simulated here, at their few positions, for every column.
        chosen = is_random & held
        if chosen.any():
            pick = torch.from_numpy(chosen)
            y_r = true_activation(post[pick], case[pick]).reshape(-1, SEQUENCE, n * len(CASES))
            where = np.repeat(chosen[:, :, None], SEQUENCE, axis=2).reshape(B, T)
            v = valid.numpy()[where].reshape(-1, SEQUENCE)
            y_r = y_r.numpy()
            for s, simulate in enumerate(self.simulators):
                x = simulate.predict(*(p[where].reshape(-1, SEQUENCE) for p in positions)).astype(np.float32)
                x[~v] = 0.0
                self.random[s] += _sums(x, y_r, v[..., None], axes=(0, 1))
                self.random_counts[s] += _strong(x, y_r, self.threshold, self.sign, self.strong[s], v[..., None],
                                                 axes=(0, 1))
        rows, seqs = np.nonzero(held)
        if not len(rows):
            return
        rows_t, seqs_t = torch.from_numpy(rows), torch.from_numpy(seqs)
        # [B, J, 4, n] -> [Q, M]: each case's largest |post| in each sequence (0: the case does not occur there)
        largest = torch.zeros(B, J, len(CASES), n).scatter_reduce_(2, case.to(torch.int64), post.abs(), "amax")
        cand_key = largest[rows_t, seqs_t].transpose(1, 2).reshape(len(rows), n * len(CASES))
        D = self.top_key.shape[1]
        # The D sequences of largest max |y| (> 0), ties by lower (document, sequence): the same whatever
        # the batches; a sort by the tie key, then a stable sort by the value.
        M = cand_key.shape[1]
        place = torch.cat([self.top_doc * (1 << 20) + self.top_seq,
                           torch.from_numpy(docs[rows] * (1 << 20) + seqs).expand(M, -1)], dim=1)
        place = torch.where(torch.cat([self.top_key > 0, cand_key.T > 0], dim=1), place, torch.iinfo(torch.int64).max)
        by_place = torch.sort(place, dim=1, stable=True).indices
        key = torch.cat([self.top_key, torch.where(cand_key > 0, cand_key, -1.0).T], dim=1).gather(1, by_place)
        order = by_place.gather(1, torch.sort(-key, dim=1, stable=True).indices[:, :D])
        old = order < D
        q = (order - D).clamp(min=0)  # [M, D]: the candidate a new slot takes

        def keep(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.where(old, kept.gather(1, order.clamp(max=D - 1)), new)

        neuron = torch.arange(M)[:, None] // len(CASES)  # [M, 1]: the column's neuron, and its case
        which = torch.arange(M)[:, None] % len(CASES)
        self.top_key = keep(self.top_key, torch.where(cand_key > 0, cand_key, -1.0).T.gather(1, q))
        self.top_doc = keep(self.top_doc, torch.from_numpy(docs)[rows_t[q]])
        self.top_seq = keep(self.top_seq, seqs_t[q])
        self.top_random = keep(self.top_random, torch.from_numpy(is_random)[rows_t[q], seqs_t[q]])
        kept_y = self.top_y.gather(1, order.clamp(max=D - 1)[..., None].expand(-1, -1, SEQUENCE))
        at = (rows_t[q], seqs_t[q], slice(None), neuron)  # [M, D, S]: the new slots' sequences, the column's neuron
        new_y = torch.where(case[at] == which[..., None], post[at], 0.0)
        self.top_y = torch.where(old[..., None], kept_y, new_y)

    def scores(self, s: int, corpus: Corpus, early: int) -> dict[str, np.ndarray]:
        """Set ``s``'s scores ``[N', 4]`` (the ``explanations/`` score datasets), its top sequences
        simulated now, each column at its own."""
        sim = self.simulators[s]
        kept = (self.top_key > 0) & ~self.top_random  # [M, D]: a top sequence not counted among the random ones
        doc = self.top_doc.clamp(min=0).numpy()
        t = self.top_seq.numpy()[..., None] * SEQUENCE + np.arange(SEQUENCE)  # [M, D, S] positions in the document
        length = corpus.lengths[doc][..., None]
        inside = (t < length) & kept.numpy()[..., None]
        at = corpus.doc_offsets[doc][..., None] + np.minimum(t, length - 1)
        V = sim.V
        current = np.where(inside, corpus.tokens[at], V).astype(np.int64)
        previous = np.where(inside & (t > 0), corpus.tokens[np.maximum(at - 1, 0)], V).astype(np.int64)
        following = np.where(inside & (t + 1 < length), corpus.tokens[np.minimum(at + 1, len(corpus.tokens) - 1)], V)
        x = sim.predict_own(current, previous, following.astype(np.int64)).astype(np.float64)
        v = inside & (t >= early)
        x[~v] = 0.0
        y = np.where(v, self.top_y.double().numpy(), 0.0)  # a random sequence counts once, with the random ones
        total = self.random[s] + _sums(x, y, v, axes=(1, 2))
        counts = self.random_counts[s] + _strong(x, y, self.threshold[:, None, None], self.sign[:, None, None],
                                                 self.strong[s][:, None, None], v, axes=(1, 2))
        n, sx, sy = total[:, _N], total[:, _X], total[:, _Y]
        with np.errstate(invalid="ignore", divide="ignore"):
            var_x = n * total[:, _XX] - sx * sx
            var_y = n * total[:, _YY] - sy * sy
            corr = (n * total[:, _XY] - sx * sy) / np.sqrt(var_x * var_y)
            # Nothing predicted where the case varies: the explanation explains none of it.
            corr = np.where((var_y > 0) & (var_x <= 1e-12 * np.maximum(n * total[:, _XX], 1e-300)), 0.0, corr)
            precision = counts[:, 2] / counts[:, 0]
            recall = counts[:, 2] / counts[:, 1]
        shape = (len(self.neurons), len(CASES))
        return {"score": np.clip(corr, -1, 1).astype(np.float32).reshape(shape),
                "precision": precision.astype(np.float32).reshape(shape),
                "recall": recall.astype(np.float32).reshape(shape),
                "scored_positions": total[:, _CASE].astype(np.int64).reshape(shape),
                "strong_positions": counts[:, 1].astype(np.int64).reshape(shape)}


def _sums(x: np.ndarray, y: np.ndarray, valid: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``[M, 7]`` sums over ``axes`` (positions, x, y, xx, yy, xy, positions in the case), the
    other axis being the columns; ``x`` and ``y`` are 0 outside the scored positions ``valid``."""
    n = np.broadcast_to(valid, x.shape).sum(axis=axes)
    return np.stack([n, x.sum(axis=axes), y.sum(axis=axes), (x * x).sum(axis=axes), (y * y).sum(axis=axes),
                     (x * y).sum(axis=axes), (y != 0).sum(axis=axes)], axis=-1).astype(np.float64)


def _strong(x: np.ndarray, y: np.ndarray, threshold: np.ndarray, sign: np.ndarray, strong: np.ndarray,
            valid: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``[M, 3]`` counts of predicted strong (``x * sign >= strong``), truly strong (``|y| >= threshold``)
    and both positions over ``axes``."""
    predicted = (x * sign >= strong) & valid
    true = (np.abs(y) >= threshold) & (y != 0) & valid
    return np.stack([predicted.sum(axis=axes), true.sum(axis=axes), (predicted & true).sum(axis=axes)], -1)


def expert_windows(rows: ExpertRows, expert: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One routed expert's ``gate`` and ``in`` as the model computed them, ``[B, T, I]`` on the CPU, at
    the batch's positions routed to it and NaN elsewhere (as its examples' windows hold them)."""
    mine = rows.expert == expert
    if rows.member is not None:
        mine &= rows.member
    token = rows.token[mine].cpu()
    out = []
    for values in (rows.gate, rows.in_):
        full = torch.full((shape[0] * shape[1], values.shape[-1]), float("nan"), dtype=values.dtype)
        full[token] = values[mine].cpu()
        out.append(full.reshape(shape[0], shape[1], -1))
    return out[0], out[1]


def score_pass(loaded: LoadedModel, held_out: HeldOut, units: list[Unit], sets: dict[str, list[dict[str, np.ndarray]]],
               *, vocab: Sequence[str], early: int, batch_tokens: int, top: int = TOP_SEQUENCES,
               progress: bool = True, simulator: Callable[[dict[str, np.ndarray]], Any] | None = None
               ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Score every explanation set of every unit (``sets[unit.name]``: arrays ``[size, 4, ...]``, one
    dict per set) in one pass of the model over ``held_out``; returns each set's scores ``[N', 4]``
    for the unit's listed neurons (:meth:`_Target.scores`). ``simulator`` makes the simulator of a
    set's explanations (arrays ``[M, ...]`` and their ``sign``); default: the rule-based one."""
    from tqdm.auto import tqdm

    start, end = token_classes(vocab)
    simulator = simulator or (lambda flat: Simulator(flat, len(vocab), start, end))
    targets = {u.name: _Target.of(u, sets[u.name], simulator, top) for u in units}
    dense = {u.layer: targets[u.name] for u in units if u.expert is None}
    experts: dict[int, dict[int | str, _Target]] = {}
    for u in units:
        if u.expert is not None:
            experts.setdefault(u.layer, {})[u.expert] = targets[u.name]
    layers = sorted(set(dense) | set(experts))
    corpus = held_out.corpus
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = plan_batches(corpus.lengths, batch_tokens, bucket=SEQUENCE)
    bar = tqdm(total=int(corpus.lengths.sum()), unit="tok", unit_scale=True, desc="score", disable=not progress,
               dynamic_ncols=True)
    for batch in batches:
        lengths = corpus.lengths[batch.docs]
        tokens = np.full((len(batch.docs), batch.length), pad_id, dtype=np.int64)
        for r, doc in enumerate(batch.docs):
            tokens[r, :lengths[r]] = corpus.document(doc)
        t = np.arange(batch.length)[None, :]
        valid = torch.from_numpy((t < lengths[:, None]) & (t >= early))
        J = batch.length // SEQUENCE
        random = held_out.random[batch.docs]
        is_random = np.zeros((len(batch.docs), J), dtype=bool)
        is_random[:, :min(J, random.shape[1])] = random[:, :J]
        positions = document_positions(tokens, lengths, len(vocab))
        device_ids = torch.from_numpy(tokens).to(loaded.device)

        def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
            if layer in dense:
                dense[layer].add(gate.cpu(), in_.cpu(), batch.docs, positions, valid, is_random,
                                 loaded.mlps[layer].act_fn)

        # Experts' values are added after the forward pass: their activation modules are hooked while it runs.
        pending: list[tuple[Any, torch.Tensor, torch.Tensor, Any]] = []

        def on_moe(layer: int, rows: ExpertRows, shared: Any) -> None:
            wanted = experts.get(layer, {})
            moe = loaded.moe[layer]
            for expert, target in wanted.items():
                if expert == SHARED:
                    if shared is not None:
                        pending.append((target, shared[0].cpu(), shared[1].cpu(), moe.shared.act_fn))
                    continue
                pending.append((target, *expert_windows(rows, expert, device_ids.shape), moe.act_fn))

        run_with_mlp_hooks(loaded, device_ids, layers, on_layer, on_moe)
        for target, gate, in_, act in pending:
            target.add(gate, in_, batch.docs, positions, valid, is_random, act)
        bar.update(int(lengths.sum()))
    bar.close()
    return {name: [target.scores(s, corpus, early) for s in range(len(target.simulators))]
            for name, target in targets.items()}


class Scorer:
    """``gluscope explain --score``: loads the model, reads the held-out text, scores units."""

    def __init__(self, activations: Path, *, model: str | None = None, dataset: Sequence[str] | None = None,
                 text_column: str | None = None, split: str | None = None, tokens: int = SCORE_TOKENS,
                 dtype: str | None = None, device: str = "auto", batch_tokens: int = 4096, llm: Any = None) -> None:
        """``llm``: an :class:`mkdocs_gluscope.llm.LLMSimulator` maker, ``(labels, threshold, sign, vocab)
        -> simulator``, with a ``model`` name; None: the rule-based simulator."""
        with ActivationsFile(activations) as f:
            attrs = dict(f.attrs)
        self.model = model or attrs.get("model_path") or attrs.get("model")
        if not self.model:
            raise GluscopeError("--score needs --model: the file does not record the model it was collected with")
        self.dataset = list(dataset) if dataset else dataset_of(attrs)
        if not self.dataset:
            raise GluscopeError("--score needs --dataset: the file does not record its dataset")
        dataset_source(self.dataset)  # a mistyped path fails now, before anything runs
        self.text_column = text_column or str(attrs.get("text_column", "text"))
        self.split = split or str(attrs.get("split", "train"))
        if tokens < SEQUENCE:
            raise GluscopeError(f"--score-tokens {tokens}; expected at least {SEQUENCE}")
        self.tokens = tokens
        self.device = device
        self.dtype = dtype or str(attrs.get("dtype", "auto"))
        self.batch_tokens = batch_tokens
        self.attrs = attrs
        resolved = dtype_name(resolve_dtype(self.dtype, resolve_device(device)))
        same = self.dataset == dataset_of(attrs) or ", ".join(self.dataset) == str(attrs.get("dataset", ""))
        #: Recorded in the file (attributes of ``explanations/``) and compared when a run resumes.
        self.settings = {
            "score_model": str(self.model), "score_dataset": ", ".join(self.dataset),
            "score_held_out": "the collection's dataset, texts the file does not hold" if same else "another dataset",
            "score_tokens": tokens, "score_sequence_tokens": SEQUENCE, "score_top_sequences": TOP_SEQUENCES,
            "score_random_sequences": RANDOM_SEQUENCES, "score_seed": SEED, "score_dtype": resolved,
            "score_simulator": "rules" if llm is None else f"llm {llm.model}",
        }
        self.llm = llm

    def held_out(self, loaded: LoadedModel, f: ActivationsFile) -> HeldOut:
        used = f.file["corpus/source_index"][...] if "source_index" in f.file["corpus"] else np.zeros(0, np.int64)
        texts, description = held_out_texts(self.dataset, self.attrs, used, text_column=self.text_column,
                                            split=self.split)
        texts = _nonempty(texts, f"--dataset {', '.join(self.dataset)}: every text is in the file (the explainer "
                                 "saw them) or empty; score on text it never saw, another --dataset")
        corpus = tokenize_corpus(texts, loaded.tokenizer, max_tokens=self.tokens,
                                 max_doc_tokens=int(self.attrs.get("max_doc_tokens", 1024)),
                                 long_docs=str(self.attrs.get("long_docs", "truncate")),
                                 bos=str(self.attrs.get("bos", "auto")))
        if int(corpus.tokens.max()) >= len(f.vocab) or token_strings(loaded.tokenizer, len(f.vocab)) != f.vocab:
            raise GluscopeError(f"--model {self.model!r}: its tokenizer is not the one the file's vocabulary "
                                "(corpus/vocab) comes from; score with the model the file was collected with")
        first = early_end(self.attrs)
        return HeldOut(corpus, f"{description}: {corpus.n_docs:,} documents, {len(corpus.tokens):,} tokens",
                       random_sequences(corpus, first, RANDOM_SEQUENCES))

    def load(self, f: ActivationsFile, units: list[Unit]) -> LoadedModel:
        layers = sorted({u.layer for u in units})
        loaded, facts = load_model(str(self.model), dtype=self.dtype, device=self.device,
                                   refactor=bool(self.attrs.get("refactor_glu", True)), layers=layers)
        check_same_model(f, loaded, facts, [u.layer for u in units if u.expert is None])
        return loaded

    def __call__(self, path: Path, units: list[Unit], arrays: dict[str, dict[str, np.ndarray]], progress: bool,
                 done: Callable[[Unit, dict[str, np.ndarray]], None]) -> None:
        with ActivationsFile(path) as f:
            loaded = self.load(f, units)
            held_out = self.held_out(loaded, f)
            print(f"gluscope: scoring on {held_out.description}", file=sys.stderr, flush=True)
            simulator = None
            if self.llm is not None:
                vocab = f.vocab
                simulator = lambda flat: self.llm(flat["label"], flat["threshold"], flat["sign"], vocab)  # noqa: E731
            scores = score_pass(loaded, held_out, units, {u.name: [arrays[u.name]] for u in units}, vocab=f.vocab,
                                early=early_end(f.attrs), batch_tokens=self.batch_tokens, progress=progress,
                                simulator=simulator)
        for unit in units:
            unit_arrays = arrays[unit.name]
            for name, value in scores[unit.name][0].items():
                unit_arrays[name][unit.neurons] = value
            done(unit, unit_arrays)


def _nonempty(texts: Iterator[Text], message: str) -> Iterator[Text]:
    """``texts``, or a GluscopeError with ``message`` when there is no text to score on."""
    texts = iter(texts)
    for text in texts:
        if text.text.strip():
            yield text
            yield from texts
            return
    raise GluscopeError(message)


def check_same_model(f: ActivationsFile, loaded: LoadedModel, facts: dict[str, torch.Tensor], layers: list[int]) -> None:
    """Refuse a model whose weights are not those the file was collected from: refactor_glu's flips
    and the weight cosines of the scored layers must agree with the file's."""
    for (layer, expert), facts_e in loaded.expert_facts.items():
        if (layer, expert) in f.expert_rows:
            group, row = f.expert_rows[(layer, expert)]
            if not np.array_equal(facts_e["flipped"].numpy(), f.file[group]["weights/flipped"][row]):
                raise GluscopeError(f"--model: the weights of layer {layer}'s expert {expert} differ from those recorded "
                                    f"in {str(f.path)!r}; score with the model the file was collected with")
    dense = sorted(loaded.mlps)
    for layer in layers:
        row = f.row(layer)
        mine = dense.index(layer)
        flipped = facts["flipped"][mine].numpy()
        cos = facts["cos_gate_in"][mine].numpy()
        if not np.array_equal(flipped, f.weights("flipped")[row]) or not np.allclose(
                cos, f.weights("cos_gate_in")[row], atol=0.02):
            raise GluscopeError(f"--model: layer {layer}'s weights differ from those recorded in {str(f.path)!r} "
                                "(refactor_glu flips or cos(w_gate, w_in)); score with the model the file was collected with")


__all__ = ["HeldOut", "Scorer", "score_pass", "random_sequences", "held_out_texts", "SEQUENCE"]
