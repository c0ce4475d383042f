"""Explanations (issue 19): the explainer that reads only the file, scoring by simulation against the
model, the ``explanations/`` group (written safely, resumable, in shards), and where labels show."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.explanations import (KINDS, Simulator, empty_arrays, neuron_explanations, position_kinds,
                                          read_arrays, token_classes, write_explanations)
from mkdocs_gluscope.explain_run import explain_file
from mkdocs_gluscope.store import CASES, ActivationsFile
from synthetic import write_synthetic

WORD = " again"
PLANTED = (0, 5)  # layer, neuron: fires in gate+_in+ on WORD, nowhere else
# Texts where WORD comes after the first positions of the document (those are left out as attention sinks).
COLLECTED = [
    "The committee of the house met in the morning and then it met again to vote on the budget.",
    "We have said it before, and we will say it again: the union is strong and the states are free.",
    "In the spring the rivers rose, the farmers planted their fields, and the rain came again and again.",
    "Numbers like 42, 1999 and 3.14 appear in text; so do symbols and the words of the law.",
    "The cat sat on the mat. The dog sat on the log. Later the cat sat on the mat again.",
    "Meanwhile, the market rose; later it fell, and then it rose once more, as markets do.",
    "Zebras, yaks and quokkas: rare words split into several tokens each, in every page of the site.",
    "The president spoke of peace and of war, of the union and of the states, and spoke of peace again.",
]
HELD_OUT = [
    "After the long recess the senators returned to the chamber and argued again about taxes.",
    "The ship left the harbor at dawn, turned in the storm, and sailed again toward the coast.",
    "Prices of wheat and corn fell in the autumn but never rose again before the winter came.",
    "The governor signed the bill, the courts struck it down, and the legislature passed it again.",
    "Children played in the square while their parents talked about the weather and the harvest.",
    "The treaty was read aloud in the hall, and then the delegates read every article again in silence.",
    "Once the bridge was finished the town grew quickly, with new shops and schools along the river.",
    "The army marched north through the hills, rested for a week, and then marched north again.",
]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Llama whose neuron 0.5 fires (gate+_in+) on WORD only, its activations file, and held-out text."""
    import torch
    import transformers

    import tiny
    from collect.run import CollectConfig, collect

    root = tmp_path_factory.mktemp("planted")
    folder = tiny.make_model_dir(root / "model", "llama", layers=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(WORD, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    word = ids[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    layer, neuron = PLANTED
    with torch.no_grad():
        # The word alone has embedding direction 0; layer 0's attention writes nothing, so its MLP reads the
        # token's own embedding; only the planted neuron reads direction 0, and it reads little else.
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[word, 0] = 4.0
        block = model.model.layers[layer]
        block.self_attn.o_proj.weight.zero_()
        for weight in (block.mlp.gate_proj.weight, block.mlp.up_proj.weight):
            weight[:, 0] = 0.0
            weight[neuron] *= 0.05
            weight[neuron, 0] = 2.0
    model.save_pretrained(folder)
    out = collect(CollectConfig(model=str(folder), dataset=[str(_jsonl(root / "corpus.jsonl", COLLECTED))],
                                out=root / "act.h5", k=4, compile=False, progress=False, device="cpu"))
    return {"model": folder, "file": out, "word": word, "held_out": _jsonl(root / "held_out.jsonl", HELD_OUT)}


def test_planted_word_is_named_and_scores_near_one(planted, tmp_path, capsys):
    import shutil

    path = tmp_path / "act.h5"
    shutil.copy(planted["file"], path)
    code = main(["explain", str(path), "--score", "--model", str(planted["model"]), "--dataset",
                 str(planted["held_out"]), "--no-progress", "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    layer, neuron = PLANTED
    word = planted["word"]
    with ActivationsFile(path) as f:
        cases = neuron_explanations(f, layer, neuron)
        arrays = read_arrays(f, "", f.row(layer))
        attrs = dict(f.file["explanations"].attrs)
    fires = cases[CASES.index("gate+_in+")]
    assert "again" in fires.label and fires.method == "tokens", fires
    assert word in arrays["token"][neuron, 0]
    assert fires.score > 0.95 and fires.precision > 0.9 and fires.recall > 0.9, fires
    # The other cases do not claim the word: not as the token, nor as context.
    for c in range(1, len(CASES)):
        for name in ("token", "previous", "next"):
            assert word not in arrays[name][neuron, c], (CASES[c], name, cases[c])
    assert attrs["score_held_out"] == "another dataset" and attrs["score_tokens"] == 32000


def test_shuffled_explanation_scores_near_zero(planted):
    """Bench baseline on the planted neuron: another neuron's explanation of the same case predicts nothing."""
    from collect.score import Scorer, score_pass
    from mkdocs_gluscope.explain import shuffled_arrays
    from mkdocs_gluscope.explain_run import explain_units, plan_units

    layer, neuron = PLANTED
    with ActivationsFile(planted["file"]) as f:
        units = plan_units(f, [f"{layer}.*"])
        early = f.attrs
    explained = {}
    explain_units(planted["file"], units, workers=1, progress=False, done=lambda u, a: explained.update({u.name: a}))
    ours = explained[units[0].name]
    shuffled = shuffled_arrays(ours, seed=1)
    assert planted["word"] not in shuffled["token"][neuron, 0]
    scorer = Scorer(planted["file"], model=str(planted["model"]), dataset=[str(planted["held_out"])])
    with ActivationsFile(planted["file"]) as f:
        loaded = scorer.load(f, units)
        held_out = scorer.held_out(loaded, f)
        from mkdocs_gluscope.store import early_end

        scores = score_pass(loaded, held_out, units, {units[0].name: [ours, shuffled]}, vocab=f.vocab,
                            early=early_end(early), batch_tokens=1024, progress=False)[units[0].name]
    assert scores[0]["score"][neuron, 0] > 0.95
    assert abs(scores[1]["score"][neuron, 0]) < 0.2, scores[1]["score"][neuron]


@pytest.mark.slow
def test_scores_are_bills_correlation_over_top_and_random_sequences(planted):
    """The streamed scores equal the correlation computed directly, document by document: over each
    case's top sequences (largest |post|, ties by document) and the random ones, each sequence once."""
    import torch

    from collect.model import run_with_mlp_hooks
    from collect.score import SEQUENCE, HeldOut, Scorer, random_sequences, score_pass
    from mkdocs_gluscope.explain_run import explain_units, plan_units
    from mkdocs_gluscope.explanations import Simulator
    from mkdocs_gluscope.store import HOOK_SIGNS, early_end

    layer = 1  # a layer of random weights: every case occurs, at many strengths
    with ActivationsFile(planted["file"]) as f:
        units = plan_units(f, [f"{layer}.{n}" for n in range(0, 48, 5)])
        early = early_end(f.attrs)
        vocab = f.vocab
    explained = {}
    explain_units(planted["file"], units, workers=1, progress=False, done=lambda u, a: explained.update({u.name: a}))
    arrays = explained[units[0].name]
    scorer = Scorer(planted["file"], model=str(planted["model"]), dataset=[str(planted["held_out"])])
    top, n_random = 2, 3
    with ActivationsFile(planted["file"]) as f:
        loaded = scorer.load(f, units)
        corpus = scorer.held_out(loaded, f).corpus
    held_out = HeldOut(corpus, "", random_sequences(corpus, early, n_random))
    got = score_pass(loaded, held_out, units, {units[0].name: [arrays]}, vocab=vocab, early=early, batch_tokens=256,
                     top=top, progress=False)[units[0].name][0]
    neurons = units[0].neurons
    flat = {name: arrays[name][neurons].reshape((len(neurons) * 4,) + arrays[name].shape[2:]) for name in
            ("token", "token_weight", "previous", "previous_weight", "next", "next_weight", "kind_weight")}
    from mkdocs_gluscope.explanations import token_classes

    simulate = Simulator(flat, len(vocab), *token_classes(vocab))
    sequences = []  # (document, sequence, y [S, M], x [S, M])
    for d in range(corpus.n_docs):
        tokens = corpus.document(d).astype(np.int64)
        seen = {}
        run_with_mlp_hooks(loaded, torch.from_numpy(tokens)[None], [layer],
                           lambda _, g, i, p: seen.update(g=g[0][:, neurons].double(), i=i[0][:, neurons].double()))
        post = (torch.nn.functional.silu(seen["g"]) * seen["i"]).numpy()
        y = np.stack([np.where((np.sign(seen["g"].numpy()) == HOOK_SIGNS[c][2]) &
                               (np.sign(seen["i"].numpy()) == HOOK_SIGNS[c][1]), post, 0.0) for c in range(4)], -1)
        y = y.reshape(len(tokens), -1)
        x = simulate(tokens[None], np.array([len(tokens)]))[0].astype(np.float64)
        y[:early], x[:early] = 0.0, 0.0
        for j in range(-(-len(tokens) // SEQUENCE)):
            part = slice(j * SEQUENCE, (j + 1) * SEQUENCE)
            if j * SEQUENCE + SEQUENCE > early:
                n = int(np.clip(len(tokens), 0, (j + 1) * SEQUENCE) - max(j * SEQUENCE, early))
                sequences.append((d, j, y[part], x[part], n))
    checked = 0
    for m in range(len(neurons) * 4):
        keys = [np.abs(s[2][:, m]).max() for s in sequences]
        tops = [i for i in sorted(range(len(sequences)), key=lambda i: (-keys[i], sequences[i][0], sequences[i][1]))[:top]
                if keys[i] > 0]
        chosen = sorted(set(tops) | {i for i, s in enumerate(sequences) if held_out.random[s[0], s[1]]})
        xs = np.concatenate([np.pad(sequences[i][3][:, m], (0, 0))[max(0, early - sequences[i][1] * SEQUENCE):]
                             [:sequences[i][4]] for i in chosen])
        ys = np.concatenate([sequences[i][2][:, m][max(0, early - sequences[i][1] * SEQUENCE):][:sequences[i][4]]
                             for i in chosen])
        n, c = divmod(m, 4)
        if xs.std() > 0 and ys.std() > 0:
            assert got["score"][n, c] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-4), (m, chosen)
            assert got["scored_positions"][n, c] == int((ys != 0).sum())
            checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_expert_neurons_are_explained_and_scored(model_factory, corpus_files, tmp_path, capsys):
    from collect.run import CollectConfig, collect

    model = model_factory("qwen2moe", 2)
    out = collect(CollectConfig(model=str(model), dataset=[str(p) for p in corpus_files], out=tmp_path / "moe.h5", k=4,
                                compile=False, progress=False, device="cpu"))
    args = ["explain", str(out), "--neurons", "1.e2.*", "1.s.*", "--score", "--model", str(model), "--no-progress",
            "--workers", "1"]
    # The collection's own dataset: every text is in the file, so nothing is left to score on.
    assert main(args) == 2 and "every text is in the file" in capsys.readouterr().err
    held_out = _jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    assert main(args + ["--dataset", str(held_out)]) == 0, capsys.readouterr().err
    with ActivationsFile(out) as f:
        assert "explanations" not in f.file  # no dense layer was listed
        for expert in (2, "s"):
            cases = [e for n in range(f.expert_neurons(expert)) for e in neuron_explanations(f, 1, n, expert=expert)]
            scored = [e for e in cases if e.scored]
            assert len(scored) > len(cases) / 2 and all(e.method == "tokens" for e in scored)
            assert all(-1 <= e.score <= 1 and 0 < e.scored_positions for e in scored)
        assert not any(e.label for e in neuron_explanations(f, 1, 0, expert=1))  # not listed


# -- the explainer and the simulator, without a model --------------------------------------------------

def test_token_kinds_follow_the_display_strings():
    vocab = ["<s>", " the", " The", "4", " 19", "ause", ",", "\n", "  ", "Appl"]
    start, end = token_classes(vocab)
    kinds = lambda tokens, previous: [KINDS[k] for k in position_kinds(np.array(tokens), np.array(previous), start, end)]  # noqa: E731
    assert kinds([3, 3, 5, 5, 2, 1, 6, 7, 4], [4, 6, 9, 6, -1, 6, 3, 6, 1]) == [
        "digit inside a number", "number start", "word piece inside a word", "lowercase word", "capitalized word",
        "lowercase word", "punctuation", "line break", "number start"]


def test_simulator_adds_token_context_and_kind_weights():
    vocab = ["<s>", " once", " again", " the", "5", "0"]
    start, end = token_classes(vocab)
    arrays = {name: value[:1, 0] for name, value in empty_arrays(1).items()}
    arrays["token"][0, :2] = [2, 4]
    arrays["token_weight"][0, :2] = [3.0, 1.0]
    arrays["previous"][0, 0] = 1
    arrays["previous_weight"][0, 0] = 0.5
    arrays["next"][0, 0] = 3
    arrays["next_weight"][0, 0] = 0.25
    arrays["kind_weight"][0, KINDS.index("digit inside a number")] = 2.0
    sim = Simulator(arrays, len(vocab), start, end)
    tokens = np.array([[0, 1, 2, 3, 4, 5, 5], [2, 1, 0, 0, 0, 0, 0]])
    pred = sim(tokens, np.array([7, 2]))[..., 0]
    # <s>, once, again (after once, before the), the, 5, 0 (a digit after a digit), 0 (again), then padding
    assert pred[0].tolist() == [0.0, 0.25 * 0, 3.5 + 0.25, 0.0, 1.0, 2.0, 2.0]
    assert pred[1].tolist() == [3.0, 0.0, 0, 0, 0, 0, 0]


def test_simulator_predicts_each_explanation_at_its_own_positions_alike():
    rng = np.random.default_rng(0)
    vocab = [" a", "b", "1", ",", "\n", "Cd", " 2"] * 7 + [" x"]
    start, end = token_classes(vocab)
    M, V = 7, len(vocab)
    arrays = {name: value[:, 0] for name, value in empty_arrays(M).items()}
    for name, n in (("token", 8), ("previous", 4), ("next", 4)):
        ids = np.stack([rng.choice(V, n, replace=False) for _ in range(M)])
        ids[:, -1] = -1
        arrays[name][...] = ids
        arrays[name + "_weight"][...] = rng.normal(size=(M, n))
    arrays["kind_weight"][...] = rng.normal(size=arrays["kind_weight"].shape)
    sim = Simulator(arrays, V, start, end)
    tokens, lengths = rng.integers(0, V, size=(3, 20)), np.array([20, 15, 3])
    positions = sim.positions(tokens, lengths)
    every = sim.predict(*positions)  # [3, 20, M]
    own = sim.predict_own(*(np.broadcast_to(p, (M,) + p.shape) for p in positions))  # [M, 3, 20]
    assert np.array_equal(every.transpose(2, 0, 1), own)
    # The rule in words (explanations.Simulator), one position and explanation at a time.
    for b in range(3):
        for t in range(lengths[b]):
            x, p = tokens[b, t], tokens[b, t - 1] if t else -1
            q = tokens[b, t + 1] if t + 1 < lengths[b] else -1
            kind = position_kinds(np.array([x]), np.array([p]), start, end)[0]
            for m in range(M):
                want = (sum(w for i, w in zip(arrays["token"][m], arrays["token_weight"][m]) if i == x)
                        + sum(w for i, w in zip(arrays["previous"][m], arrays["previous_weight"][m]) if i == p >= 0)
                        + sum(w for i, w in zip(arrays["next"][m], arrays["next_weight"][m]) if i == q >= 0)
                        + arrays["kind_weight"][m, kind])
                assert every[b, t, m] == pytest.approx(want, abs=1e-5)
    assert (every[1, 15:] == 0).all() and (every[2, 3:] == 0).all()  # padding


def _explained_synthetic(tmp_path: Path, **kwargs) -> Path:
    path = write_synthetic(tmp_path / "act.h5", layers=3, d_mlp=10, k=4, before=3, after=1, seed=2)
    explain_file(path, "all", workers=1, progress=False, log=lambda m: None, **kwargs)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _labels(path: Path) -> np.ndarray:
    with ActivationsFile(path) as f:
        return f.file["explanations/label"].asstr()[...]


def test_explaining_is_deterministic_and_leaves_the_statistics(tmp_path):
    path = write_synthetic(tmp_path / "act.h5", layers=3, d_mlp=10, k=4, before=3, after=1, seed=2)
    with ActivationsFile(path) as f:
        count = f.stat("count")
    explain_file(path, "all", workers=2, progress=False, log=lambda m: None)
    once = _labels(path)
    explain_file(path, ["0.*", "1.*", "2.*"], workers=1, progress=False, log=lambda m: None)
    assert (once == _labels(path)).all() and (once != "").any()
    with ActivationsFile(path) as f:
        assert (f.stat("count") == count).all()
        e = neuron_explanations(f, 1, 3)
        assert [x.case for x in e] == list(CASES) and all(np.isnan(x.score) for x in e)
    assert not (tmp_path / "act.h5.explain").exists()  # the work folder goes once the file has everything


def test_a_crash_while_writing_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import mkdocs_gluscope.explanations as explanations

    path = write_synthetic(tmp_path / "act.h5", layers=2, d_mlp=8, k=4, before=3, after=1, seed=2)
    before = _digest(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(explanations, "_write_group", crash)
    with pytest.raises(OSError, match="disk full"):
        explain_file(path, "all", workers=1, progress=False, log=lambda m: None)
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["act.h5", "act.h5.explain"]  # no half-written copy
    monkeypatch.undo()
    # The units were kept: the next run only writes them in.
    import mkdocs_gluscope.explain_run as run

    monkeypatch.setattr(run, "explain_units", lambda *a, **k: pytest.fail("explained again"))
    assert explain_file(path, "all", workers=1, progress=False, log=lambda m: None)
    assert (_labels(path) != "").any()


def test_an_interrupted_run_resumes_and_shards_add_up(tmp_path, monkeypatch):
    import mkdocs_gluscope.explain_run as run

    whole = _explained_synthetic(tmp_path / "whole")
    path = write_synthetic(tmp_path / "act.h5", layers=3, d_mlp=10, k=4, before=3, after=1, seed=2)
    saved = []
    original = run.WorkFolder.save

    def save_then_stop(self, unit, arrays, settings):
        original(self, unit, arrays, settings)
        saved.append(unit.name)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run.WorkFolder, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        explain_file(path, "all", workers=1, progress=False, log=lambda m: None)
    monkeypatch.undo()
    explained = []
    real = run.explain_units
    monkeypatch.setattr(run, "explain_units", lambda p, units, **k: (explained.extend(u.name for u in units),
                                                                    real(p, units, **k)))
    # The rest as two shards: the first leaves its unit in the work folder, the second writes all three.
    assert not explain_file(path, "all", shard="0/2", workers=1, progress=False, log=lambda m: None)
    assert "explanations" not in ActivationsFile(path).file
    assert explain_file(path, "all", shard="1/2", workers=1, progress=False, log=lambda m: None)
    assert sorted(explained) == ["L1", "L2"]  # L0 was done before the interruption
    assert (_labels(path) == _labels(whole)).all()


def test_explaining_some_neurons_keeps_the_others(tmp_path):
    path = _explained_synthetic(tmp_path)
    with ActivationsFile(path) as f:
        arrays = read_arrays(f, "", 1)
    arrays["label"][4, 0] = "`changed`"
    arrays["listed"] = np.zeros(10, dtype=bool)
    arrays["listed"][4] = True
    write_explanations(path, {("", 1): arrays}, {})
    explain_file(path, ["2.0"], workers=1, progress=False, log=lambda m: None)
    with ActivationsFile(path) as f:
        assert neuron_explanations(f, 1, 4)[0].label == "`changed`"


def test_explain_errors_are_one_line(tmp_path, capsys):
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=4, k=4, before=3, after=1)
    path.chmod(0o444)
    if not os.access(path, os.W_OK):  # root may write anyway
        assert main(["explain", str(path), "--no-progress"]) == 2
        assert "read-only" in capsys.readouterr().err
    path.chmod(0o644)
    for args, message in ((["--neurons", "5.1"], "layer 5 is out of range"),
                          (["--shard", "3/2"], "expected 0 <= I < N"),
                          (["--model", "m"], "add --score"),
                          (["--score", "--dataset", str(tmp_path / "nothing.jsonl")], "no such file")):
        assert main(["explain", str(path), "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gluscope: error: ") and message in err and err.count("\n") == 1, err


# -- where explanations show ---------------------------------------------------------------------------

def _scored(tmp_path: Path) -> Path:
    """A synthetic file with explanations and made-up scores (neuron 1.2's gate-_in- the best explained)."""
    path = _explained_synthetic(tmp_path)
    with ActivationsFile(path) as f:
        rows = {row: read_arrays(f, "", row) for row in range(3)}
    rng = np.random.default_rng(0)
    for row, arrays in rows.items():
        arrays["score"][...] = rng.uniform(-0.1, 0.6, arrays["score"].shape)
        arrays["precision"][...] = 0.5
        arrays["recall"][...] = 0.25
        arrays["scored_positions"][...] = 100
        arrays["listed"] = np.ones(10, dtype=bool)
    rows[1]["score"][2, 3] = 0.93
    rows[1]["label"][2, 3] = "`<b>` after `quokka`"
    rows[1]["scored_positions"][7, 1] = 5  # too few positions to count
    rows[1]["score"][7, 1] = 0.99
    write_explanations(path, {("", row): a for row, a in rows.items()},
                       {"score_model": "tiny", "score_tokens": 1000})
    return path


def test_pages_show_labels_and_scores(tmp_path):
    from mkdocs_gluscope.pages import write_markdown_pages

    path = _scored(tmp_path)
    write_markdown_pages(path, ["1.2", "1.3"], tmp_path / "pages")
    page = (tmp_path / "pages/neurons/L1/N2.md").read_text(encoding="utf-8")
    section = page[page.index("## Explanations"):page.index("## Summary")]
    assert "<code>&#60;b&#62;</code> after <code>quokka</code>" in section and "<b>`" not in section
    assert "score 0.93" in section and "precision 0.5, recall 0.25" in section and "100 positions" in section
    # The case's section of the examples opens with its label and score too.
    examples = page[page.index('<div class="gs-examples"'):]
    block = examples[examples.index('<b>gate-_in-</b> · '):]
    assert block.index("quokka") < block.index("</summary>") and "score 0.93" in block[:block.index("</summary>")]
    layer_page = (tmp_path / "pages/neurons/L1/index.md").read_text(encoding="utf-8")
    assert "label of each case (score)" in layer_page and "<code>quokka</code>" in layer_page


def test_info_counts_explanations_and_merge_refuses_them(tmp_path, capsys):
    path = _scored(tmp_path)
    assert main(["info", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "explanations" in x)
    with ActivationsFile(path) as f:
        labelled = int((f.file["explanations/method"].asstr()[...] != "").sum())
    assert f"{labelled:,} cases labelled, 120 scored" in line and "gluscope tokens explainer" in line
    other = write_synthetic(tmp_path / "other.h5", layers=3, d_mlp=10, k=4, before=3, after=1, seed=2)
    assert main(["merge", str(other), str(path), "--out", str(tmp_path / "m.h5")]) == 2
    assert "holds explanations" in capsys.readouterr().err


def test_pick_ranks_neurons_by_score(tmp_path, capsys):
    path = _scored(tmp_path)
    assert main(["pick", str(path), "--by-score", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith('        - "1.2"  # gate-_in- explained as `<b>` after `quokka`')
    assert "score 0.93" in lines[0] and '"1.7"' not in "".join(lines)  # 5 scored positions: below --min-positions
    assert main(["pick", str(path), "--by-score", "1", "--min-positions", "1"]) == 0
    assert capsys.readouterr().out.startswith('        - "1.7"')
    bare = write_synthetic(tmp_path / "bare.h5", layers=1, d_mlp=4, k=4, before=3, after=1)
    assert main(["pick", str(bare), "--by-score", "3"]) == 2
    assert "no scored explanations" in capsys.readouterr().err


def test_export_carries_the_explanations(tmp_path):
    pytest.importorskip("datasets")
    from datasets import load_dataset

    from mkdocs_gluscope.export import export_dataset

    path = _scored(tmp_path)
    rows = load_dataset(str(export_dataset(path, tmp_path / "dataset")), split="train")
    row = rows[1 * 10 + 2]
    assert row["gate-_in-_explanation"] == "`<b>` after `quokka`"
    assert row["gate-_in-_explanation_score"] == pytest.approx(0.93)
    assert row["gate-_in-_explanation_method"] == "tokens" and row["gate-_in-_explanation_scored_positions"] == 100


def test_an_explained_file_passes_the_schema_and_builds_both_layouts(tmp_path, capsys):
    """schema.py checks explanations/ when present: a file gluscope explain wrote opens, `gluscope info`
    reads it, both layouts build from it; an incomplete group or a bad `kinds` is one error line."""
    import h5py

    from sites import build_site

    path = _scored(tmp_path)
    assert main(["info", str(path)]) == 0
    for layout in ("full", "light"):
        site = build_site(tmp_path / layout, {"activations": str(path), "neurons": ["1.2", "0.1"], "layout": layout})
        assert (site / "neurons/L1/N2/index.html").exists()
    capsys.readouterr()
    for damage, expected in ((lambda g: g.__delitem__("recall"), "explanations/recall: missing while"),
                             (lambda g: g.attrs.__setitem__("kinds", ["one"]), "attribute kinds: ['one']; expected 8")):
        broken = tmp_path / "broken.h5"
        broken.write_bytes(path.read_bytes())
        with h5py.File(broken, "a") as h:
            damage(h["explanations"])
        assert main(["info", str(broken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gluscope: error: ") and expected in err and len(err.splitlines()) == 1, err
