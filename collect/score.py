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
* ``precision`` and ``recall`` of the case's **strong** positions over every held-out position:
  true strong where ``|post|`` in the case reaches the explanation's ``threshold``, predicted strong
  where the simulation does (in the case's sign).

Positions before :func:`~mkdocs_gluscope.store.early_end` of each document are left out, as the
explainer, pages and ``gluscope pick`` leave them out (attention-sink outliers that no token
explains). One forward pass serves every layer: all statistics are streamed, per batch, as sums
per sequence.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from collect.corpus import Corpus, Text, dataset_source, plan_batches, read_texts, token_strings, tokenize_corpus
from collect.model import LoadedModel, dtype_name, load_model, resolve_device, resolve_dtype, run_with_mlp_hooks
from collect.moe import expert_batches
from mkdocs_gluscope.distributions import document_pieces, position_priority
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.explain_run import Unit
from mkdocs_gluscope.explanations import SCORES, Simulator, token_classes
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
    """One unit's explanation sets under scoring: which neurons, their simulators, and the streamed sums."""

    unit: Unit
    neurons: torch.Tensor  # [N'] listed neuron indices
    simulators: list[Simulator]  # one per explanation set
    threshold: torch.Tensor  # [M] (M = N' * 4, neuron-major)
    sign: torch.Tensor  # [M]
    random: list[torch.Tensor]  # per set [M, 7] float64
    top_key: torch.Tensor  # [M, D] max |y| of each kept top sequence, -1 when empty
    top_random: torch.Tensor  # [M, D] bool: the kept sequence is a random one too
    top: list[torch.Tensor]  # per set [M, D, 7]
    counts: list[torch.Tensor]  # per set [M, 3] int64: predicted strong, true strong, both

    @classmethod
    def of(cls, unit: Unit, sets: Sequence[dict[str, np.ndarray]], vocab_size: int, start: np.ndarray,
           end: np.ndarray, top: int) -> "_Target":
        idx = unit.neurons
        M = len(idx) * len(CASES)
        flat = [{name: np.asarray(a[name])[idx].reshape((M,) + np.asarray(a[name]).shape[2:]) for name in a
                 if name in ("token", "token_weight", "previous", "previous_weight", "next", "next_weight",
                             "kind_weight")} for a in sets]
        threshold = np.asarray(sets[0]["threshold"], dtype=np.float32)[idx].reshape(M)
        sign = np.tile(np.array([s[0] for s in HOOK_SIGNS], dtype=np.float32), len(idx))
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype)  # noqa: E731
        return cls(unit=unit, neurons=torch.from_numpy(idx), simulators=[Simulator(a, vocab_size, start, end) for a in flat],
                   threshold=torch.from_numpy(np.nan_to_num(threshold, nan=np.inf)), sign=torch.from_numpy(sign),
                   random=[zeros(M, _SUMS) for _ in sets], top_key=torch.full((M, top), -1.0),
                   top_random=torch.zeros(M, top, dtype=torch.bool), top=[zeros(M, top, _SUMS) for _ in sets],
                   counts=[zeros(M, 3, dtype=torch.int64) for _ in sets])

    def add(self, gate: torch.Tensor, in_: torch.Tensor, tokens: np.ndarray, lengths: np.ndarray,
            valid: torch.Tensor, is_random: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One batch: ``gate``/``in_`` ``[B, T, N]`` (NaN where the neuron did not run: an expert's
        unrouted tokens), ``valid`` ``[B, T]`` the scored positions, ``is_random`` ``[B, J]``."""
        g = gate[..., self.neurons].float()
        i = in_[..., self.neurons].float()
        post = act(g) * i
        B, T, n = g.shape
        cases = []
        for c in range(len(CASES)):
            gs, is_ = HOOK_SIGNS[c][2], HOOK_SIGNS[c][1]
            inside = ((g > 0) if gs > 0 else (g < 0)) & ((i > 0) if is_ > 0 else (i < 0))
            cases.append(torch.where(inside, post, 0.0))
        y = torch.stack(cases, dim=-1).reshape(B, T, n * len(CASES))
        y = torch.where(valid[..., None], torch.nan_to_num(y, nan=0.0), 0.0)
        J = T // SEQUENCE
        n_pos = valid.reshape(B, J, SEQUENCE).sum(-1).float()  # [B, J]
        y_seq = y.reshape(B, J, SEQUENCE, -1)
        key = y_seq.abs().amax(dim=2)  # [B, J, M]
        held = n_pos > 0
        true_strong = (y.abs() >= self.threshold) & (y != 0)
        # Top sequences: keep the D with the largest |y| (ties: the earlier one), merged with those kept.
        cand_key = key[held]  # [Q, M]
        Q = cand_key.shape[0]
        all_key = torch.cat([self.top_key, cand_key.T], dim=1)  # [M, D + Q]
        order = torch.sort(-all_key, dim=1, stable=True).indices[:, :self.top_key.shape[1]]
        self.top_key = all_key.gather(1, order)
        self.top_random = torch.cat([self.top_random, is_random[held][None, :].expand(len(order), Q)], 1).gather(1, order)
        y_sums = [y_seq.sum(2), (y_seq * y_seq).sum(2), (y_seq != 0).sum(2).float()]
        for s, simulate in enumerate(self.simulators):
            x = torch.from_numpy(simulate(tokens, lengths)).reshape(B, T, -1)
            x = torch.where(valid[..., None], x, 0.0)
            x_seq = x.reshape(B, J, SEQUENCE, -1)
            # Sums over a sequence's 64 positions in float32, then float64 from there on.
            sums = torch.stack([n_pos[..., None].expand(-1, -1, x.shape[-1]), x_seq.sum(2), y_sums[0],
                                (x_seq * x_seq).sum(2), y_sums[1], (x_seq * y_seq).sum(2), y_sums[2]],
                               dim=-1).double()  # [B, J, M, 7]
            self.random[s] += sums[is_random].sum(0)
            cand = sums[held].permute(1, 0, 2)  # [M, Q, 7]
            merged = torch.cat([self.top[s], cand], dim=1)
            self.top[s] = merged.gather(1, order[..., None].expand(-1, -1, _SUMS))
            pred_strong = (x * self.sign >= self.threshold) & valid[..., None]
            self.counts[s] += torch.stack([pred_strong.sum((0, 1)), true_strong.sum((0, 1)),
                                           (pred_strong & true_strong).sum((0, 1))], dim=-1)

    def scores(self, s: int) -> dict[str, np.ndarray]:
        """Set ``s``'s scores ``[N', 4]``: the ``explanations/`` score datasets."""
        top = torch.where((self.top_key >= 0) & ~self.top_random, 1.0, 0.0).double()[..., None] * self.top[s]
        t = (self.random[s] + top.sum(1)).numpy()  # [M, 7]
        n, x, y = t[:, _N], t[:, _X], t[:, _Y]
        with np.errstate(invalid="ignore", divide="ignore"):
            var_x = n * t[:, _XX] - x * x
            var_y = n * t[:, _YY] - y * y
            corr = (n * t[:, _XY] - x * y) / np.sqrt(var_x * var_y)
            # Nothing predicted where the case varies: the explanation explains none of it.
            corr = np.where((var_y > 1e-12 * np.maximum(n * t[:, _YY], 1e-300)) & (var_x <= 0), 0.0, corr)
            counts = self.counts[s].numpy().astype(np.float64)
            precision = counts[:, 2] / counts[:, 0]
            recall = counts[:, 2] / counts[:, 1]
        shape = (len(self.neurons), len(CASES))
        return {"score": np.clip(corr, -1, 1).astype(np.float32).reshape(shape),
                "precision": precision.astype(np.float32).reshape(shape),
                "recall": recall.astype(np.float32).reshape(shape),
                "scored_positions": t[:, _CASE].astype(np.int64).reshape(shape),
                "strong_positions": self.counts[s][:, 1].numpy().astype(np.int64).reshape(shape)}


def score_pass(loaded: LoadedModel, held_out: HeldOut, units: list[Unit], sets: dict[str, list[dict[str, np.ndarray]]],
               *, vocab: Sequence[str], early: int, batch_tokens: int, top: int = TOP_SEQUENCES,
               progress: bool = True) -> dict[str, list[dict[str, np.ndarray]]]:
    """Score every explanation set of every unit (``sets[unit.name]``: arrays ``[size, 4, ...]``, one
    dict per set) in one pass of the model over ``held_out``; returns each set's scores ``[N', 4]``
    for the unit's listed neurons (:meth:`_Target.scores`)."""
    from tqdm.auto import tqdm

    start, end = token_classes(vocab)
    targets = {u.name: _Target.of(u, sets[u.name], len(vocab), start, end, top) for u in units}
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
        is_random = torch.from_numpy(held_out.random[batch.docs][:, :J] if held_out.random.shape[1] >= J else
                                     np.pad(held_out.random[batch.docs], ((0, 0), (0, J - held_out.random.shape[1]))))
        device_ids = torch.from_numpy(tokens).to(loaded.device)

        def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
            if layer in dense:
                dense[layer].add(gate.cpu(), in_.cpu(), tokens, lengths, valid, is_random, loaded.mlps[layer].act_fn)

        def on_moe(layer: int, hidden: torch.Tensor, routing: torch.Tensor, shared: Any) -> None:
            wanted = experts.get(layer, {})
            moe = loaded.moe[layer]
            for part in expert_batches(moe, hidden, routing, shared, valid.to(hidden.device), list(wanted)):
                act = moe.shared.act_fn if part.expert == SHARED else moe.act_fn
                wanted[part.expert].add(part.window_gate.cpu(), part.window_in.cpu(), tokens, lengths, valid,
                                        is_random, act)

        run_with_mlp_hooks(loaded, device_ids, layers, on_layer, on_moe)
        bar.update(int(lengths.sum()))
    bar.close()
    return {name: [target.scores(s) for s in range(len(target.simulators))] for name, target in targets.items()}


class Scorer:
    """``gluscope explain --score``: loads the model, reads the held-out text, scores units."""

    def __init__(self, activations: Path, *, model: str | None = None, dataset: Sequence[str] | None = None,
                 text_column: str | None = None, split: str | None = None, tokens: int = SCORE_TOKENS,
                 dtype: str | None = None, device: str = "auto", batch_tokens: int = 4096) -> None:
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
        }

    def held_out(self, loaded: LoadedModel, f: ActivationsFile) -> HeldOut:
        used = f.file["corpus/source_index"][...] if "source_index" in f.file["corpus"] else np.zeros(0, np.int64)
        texts, description = held_out_texts(self.dataset, self.attrs, used, text_column=self.text_column,
                                            split=self.split)
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
            scores = score_pass(loaded, held_out, units, {u.name: [arrays[u.name]] for u in units}, vocab=f.vocab,
                                early=early_end(f.attrs), batch_tokens=self.batch_tokens, progress=progress)
        for unit in units:
            unit_arrays = arrays[unit.name]
            for name, value in scores[unit.name][0].items():
                unit_arrays[name][unit.neurons] = value
            done(unit, unit_arrays)


def check_same_model(f: ActivationsFile, loaded: LoadedModel, facts: dict[str, torch.Tensor], layers: list[int]) -> None:
    """Refuse a model whose weights are not those the file was collected from: refactor_glu's flips
    and the weight cosines of the scored layers must agree with the file's."""
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
