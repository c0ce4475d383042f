"""Histograms, density and random examples against brute-force references (plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from collect.stats import (LayerStats, add_batch, find_candidates, hist_and_density, merge_stats, reduce_batch,
                           update_stats)
from mkdocs_gluscope.distributions import (BAND_EDGES, DENSITY_EDGES, EMPTY_PRIORITY, N_BANDS, N_BINS, N_DENSITY,
                                           hist_bin, position_priority)
from test_stats import AFTER, BEFORE, W, batch_tensors, hook_values, make_docs

SEED = 7


def priorities(doc: int, length: int, seed: int = SEED) -> np.ndarray:
    """The sampling priority of every position of document ``doc`` (its own source row, piece 0)."""
    return position_priority(seed, np.int64(doc), np.int64(0), np.arange(length, dtype=np.int64))


def batch_prio(doc_ids: torch.Tensor, t_max: int, lengths: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    prio = torch.full((len(doc_ids), t_max), EMPTY_PRIORITY, dtype=torch.int64)
    for row, (doc, length) in enumerate(zip(doc_ids.tolist(), lengths.tolist())):
        prio[row, :length] = torch.from_numpy(priorities(doc, length, seed))
    return prio


def run(docs, k, first_counted, batch_size, samples, band_samples, *, seed=SEED, capacity=None, candidates=None,
        exact=False, doc_offset=0):
    """Statistics with distributions, batch by batch, as collection adds them: the GPU's path
    (finite values assumed, lists under ``capacity``, example candidates found under
    ``candidates``, default all positions), a batch redone exactly where it was not applied; or
    ``exact`` (the examples' own staged search, :func:`collect.stats.update_examples`)."""
    d_mlp = docs[0][0].shape[1]
    stats = LayerStats.empty(d_mlp, k, W, samples=samples, band_samples=band_samples)
    for start in range(0, len(docs), batch_size):
        gate, in_, post, swish, valid, lengths = batch_tensors(docs[start:start + batch_size], first_counted)
        doc_ids = torch.arange(start, start + len(lengths)) + doc_offset
        prio = batch_prio(doc_ids, gate.shape[1], lengths, seed)
        extra = dict(hooks=(post, in_, gate, swish), valid=valid, prio=prio)
        if not exact:
            red = reduce_batch(gate, in_, post, swish, valid, assume_finite=True)
            found = find_candidates(stats, extra["hooks"], valid, prio, doc_ids, candidates or gate.numel(),
                                    filling=start == 0)
            applied, _ = update_stats(stats, red, doc_ids, gate, in_, lengths, BEFORE, AFTER, capacity=capacity,
                                      accept=~red.suspect & ~found.overflow, distributions=found, **extra)
            if bool(applied):
                continue
        red = reduce_batch(gate, in_, post, swish, valid)
        add_batch(stats, red, doc_ids, gate, in_, lengths, BEFORE, AFTER, check_finite=True, **extra)
    return stats


def reference(docs, first_counted, samples, band_samples, seed=SEED):
    """hist [N,C,H,B], density [N,G,G], and per (neuron, case) / (neuron, case, band) the chosen
    (priority, doc, pos) lists, by loops over positions with the edges' own rule."""
    d_mlp = docs[0][0].shape[1]
    hist = np.zeros((d_mlp, 4, 4, N_BINS), dtype=np.int64)
    density = np.zeros((d_mlp, N_DENSITY, N_DENSITY), dtype=np.int64)
    pool_s, pool_b = {}, {}
    for d, (gate, in_) in enumerate(docs):
        hooks = hook_values(gate, in_)
        prio = priorities(d, gate.shape[0], seed)
        for t in range(first_counted, gate.shape[0]):
            for n in range(d_mlp):
                values = [float(h[t, n]) for h in hooks]
                gv, iv = float(gate[t, n]), float(in_[t, n])
                if not all(math.isfinite(v) for v in values) or gv == 0 or iv == 0:
                    continue
                c = (0 if gv > 0 else 2) + (0 if iv > 0 else 1)
                for h, v in enumerate(values):
                    hist[n, c, h, hist_bin(abs(v))] += 1
                cell = [int(np.searchsorted(DENSITY_EDGES, np.float32(v), side="right" if v > 0 else "left")) - 1
                        for v in (gv, iv)]
                density[n, cell[0], cell[1]] += 1
                band = int(np.searchsorted(BAND_EDGES, np.float32(abs(values[0])), side="right")) - 1
                pool_s.setdefault((n, c), []).append((int(prio[t]), d, t, values))
                pool_b.setdefault((n, c, band), []).append((int(prio[t]), d, t, values))
    chosen_s = {key: sorted(v)[:samples] for key, v in pool_s.items()}
    chosen_b = {key: sorted(v)[:band_samples] for key, v in pool_b.items()}
    return hist, density, chosen_s, chosen_b




def assert_distributions(stats, docs, first_counted, samples, band_samples, seed=SEED):
    hist, density, chosen_s, chosen_b = reference(docs, first_counted, samples, band_samples, seed)
    got_hist, got_density = hist_and_density(stats)
    np.testing.assert_array_equal(got_hist.numpy(), hist)
    np.testing.assert_array_equal(got_density.numpy(), density)
    # Every (case, hook) histogram sums to the case's count; the density to all four.
    np.testing.assert_array_equal(got_hist.sum(-1).numpy(), stats.count[:, :, None].expand(-1, -1, 4).numpy())
    np.testing.assert_array_equal(got_density.sum((1, 2)).numpy(), stats.count.sum(1).numpy())
    d_mlp = stats.count.shape[0]
    for n in range(d_mlp):
        for c in range(4):
            lists = [("sample", (n, c), chosen_s.get((n, c), []))]
            lists += [("band", (n, c, r), chosen_b.get((n, c, r), [])) for r in range(N_BANDS)]
            for prefix, index, expected in lists:
                key, doc, pos, value, gate_w, in_w = (getattr(stats, f"{prefix}_{name}")[index]
                                                      for name in ("key", "doc", "pos", "value", "gate", "in"))
                assert [(d, p) for d, p in zip(doc.tolist(), pos.tolist()) if d >= 0] == \
                    [(e[1], e[2]) for e in expected], (prefix, index)
                assert key[:len(expected)].tolist() == [e[0] for e in expected]
                assert (key[len(expected):] == EMPTY_PRIORITY).all() and (doc[len(expected):] == -1).all()
                for j, (_, d, t, values) in enumerate(expected):
                    torch.testing.assert_close(value[j], torch.tensor(values, dtype=torch.float32))
                    g, i = docs[d]
                    for w, u in enumerate(range(t - BEFORE, t + AFTER + 1)):
                        for window, full in ((gate_w, g), (in_w, i)):
                            got = float(window[j, w])
                            want = float(full[u, n]) if 0 <= u < g.shape[0] else math.nan
                            assert got == want or (math.isnan(got) and math.isnan(want)), (prefix, index, j, w)


CASES = [
    dict(seed=0, n_docs=12, batch=5, first=1, samples=3, band_samples=2),
    dict(seed=1, n_docs=9, batch=4, first=0, samples=4, band_samples=1, ties=True),
    dict(seed=3, n_docs=7, batch=3, first=1, samples=2, band_samples=2, all_negative_gate=True),
    dict(seed=4, n_docs=8, batch=8, first=0, samples=5, band_samples=2, zeros=True),
    dict(seed=8, n_docs=10, batch=4, first=0, samples=3, band_samples=2, nonfinite=True, zeros=True),
    dict(seed=9, n_docs=6, batch=2, first=1, samples=40, band_samples=9),  # lists larger than their cases
]
IDS = ["plain", "ties", "all-negative-gate", "zeros", "nonfinite", "lists-not-full"]


def make(case, d_mlp=5, max_len=7):
    docs = make_docs(case["seed"], case["n_docs"], d_mlp=d_mlp, max_len=max_len, ties=case.get("ties", False),
                     all_negative_gate=case.get("all_negative_gate", False), zeros=case.get("zeros", False),
                     nonfinite=case.get("nonfinite", False))
    # Spread |post| over every band: scale some neurons up and down.
    scale = torch.tensor([1.0, 0.01, 12.0, 0.2, 3.0])[:d_mlp]
    return [(g * scale.sqrt(), i * scale.sqrt()) for g, i in docs]


@pytest.mark.parametrize("stage", [None, "never", "always-3", "prefix-0", "prefix-2"],
                         ids=["default", "no-first-stage", "first-stage-of-3", "documents-only", "prefix-of-2"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_distributions_match_brute_force(case, stage, monkeypatch):
    """Whichever way positions are offered (the lowest-priority ones first while lists fill, a
    prefix of the lowest priorities, or only the documents that can hold an entry of a list still
    open), the lists are the brute-force ones."""
    import collect.stats as stats_module

    if stage == "never":
        monkeypatch.setattr(stats_module, "FILLING_SHARE", 1.1)
    elif stage == "always-3":
        monkeypatch.setattr(stats_module, "FILLING_SHARE", -1.0)
        monkeypatch.setattr(stats_module, "FIRST_STAGE", 3)
    elif stage is not None:  # a prefix, then only the documents that hold a position of an open list
        monkeypatch.setattr(stats_module, "FILLING_SHARE", 1.1)
        monkeypatch.setattr(stats_module, "PREFIX", int(stage.split("-")[1]))
    docs = make(case)
    for exact in (False, True):  # the stages are the exact path's; the GPU's path finds candidates
        stats = run(docs, 3, case["first"], case["batch"], case["samples"], case["band_samples"], exact=exact)
        assert_distributions(stats, docs, case["first"], case["samples"], case["band_samples"])


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:5], ids=IDS[:2] + IDS[4:5])
def test_distributions_through_the_path_without_host_syncs_and_the_exact_path(case):
    docs = make(case)
    for kwargs in (dict(capacity=7), dict(capacity=7, candidates=5), dict(exact=True)):
        stats = run(docs, 3, case["first"], case["batch"], case["samples"], case["band_samples"], **kwargs)
        assert_distributions(stats, docs, case["first"], case["samples"], case["band_samples"])


def test_merge_of_two_halves_equals_whole_with_distributions():
    docs = make(CASES[4])
    whole = run(docs, 3, 0, 4, 3, 2)
    first = run(docs[:6], 3, 0, 4, 3, 2)
    second = run(docs[6:], 3, 0, 4, 3, 2, doc_offset=6)
    merged = merge_stats(first, second)
    for name in ("hist", "density", "sample_key", "sample_doc", "sample_pos", "band_key",
                 "band_doc", "band_pos"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    for name in ("sample_value", "sample_gate", "band_value", "band_in"):
        assert torch.equal(getattr(merged, name).nan_to_num(), getattr(whole, name).nan_to_num()), name


def test_samples_are_uniform_over_a_cases_positions():
    """Over many seeds, every position of a case is sampled equally often (S / positions)."""
    lengths, samples, seeds = [5, 3, 9, 1, 6], 3, 3000
    positions = [(d, t) for d, n in enumerate(lengths) for t in range(n)]
    hits = dict.fromkeys(positions, 0)
    for seed in range(seeds):
        prio = {(d, t): int(p) for d, n in enumerate(lengths) for t, p in enumerate(priorities(d, n, seed))}
        for pos in sorted(positions, key=prio.get)[:samples]:
            hits[pos] += 1
    expected = seeds * samples / len(positions)
    counts = np.array(list(hits.values()))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 23 degrees of freedom: chi2 above 49 has probability below 0.001 for a uniform sampler.
    assert chi2 < 49, (chi2, counts)


def test_the_collection_draws_what_the_priorities_say_for_many_seeds():
    docs = make(CASES[0], d_mlp=2, max_len=5)
    for seed in range(6):
        stats = run(docs, 2, 1, 4, 2, 1, seed=seed)
        assert_distributions(stats, docs, 1, 2, 1, seed=seed)


def test_histogram_bins_follow_the_edges_at_every_edge():
    from collect.stats import value_bins
    from mkdocs_gluscope.distributions import HIST_EDGES

    finite = HIST_EDGES[1:-1]
    values = np.concatenate([[0.0, 1e-30, 1e30], finite, np.nextafter(finite, 0), np.nextafter(finite, np.inf)])
    values = values.astype(np.float32)
    for sign in (1, -1):
        got = value_bins(torch.from_numpy(sign * values)).numpy()
        np.testing.assert_array_equal(got, hist_bin(values))


def _priority_in_words(seed: int, source: int, piece: int, position: int) -> int:
    """The data-format page's description of the hash, step by step, on Python integers."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    h = mix((mix(seed & mask) + (source & mask)) & mask)
    h = mix((h + (piece & mask)) & mask)
    h = mix((h + (position & mask)) & mask)
    return h >> 2


def test_the_sampling_priority_is_what_the_data_format_page_says():
    """The page's test vectors, read from the page itself: the code, the words and the numbers agree."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "site_src" / "data-format.md").read_text(encoding="utf-8")
    table = page.split("| seed | source | piece | position | priority |", 1)[1].split("\n\n", 1)[0]
    vectors = [tuple(int(x) for x in row) for row in re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                                                              table, re.MULTILINE)]
    assert len(vectors) >= 4
    for seed, source, piece, position, expected in vectors:
        assert _priority_in_words(seed, source, piece, position) == expected
        numpy = position_priority(seed, np.int64(source), np.int64(piece), np.int64(position))
        torch_ = position_priority(seed, torch.tensor(source), torch.tensor(piece), torch.tensor(position))
        assert int(numpy) == int(torch_) == expected and 0 <= expected < 2**62
    # Negative inputs enter as their 64-bit patterns (a seed of -1 is 2^64 - 1).
    assert int(position_priority(-1, np.int64(3), np.int64(0), np.int64(5))) == _priority_in_words(-1, 3, 0, 5)
