"""The statistics against a brute-force reference written as plain loops over positions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from collect.stats import LayerStats, add_batch, merge_stats, reduce_batch, update_stats

BEFORE, AFTER = 3, 1
W = BEFORE + 1 + AFTER


def silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x)


def make_docs(seed: int, n_docs: int, d_mlp: int, max_len: int, *, ties: bool = False,
              all_negative_gate: bool = False, zeros: bool = False, nonfinite: bool = False):
    """Random documents: list of (gate [T, N], in [T, N]) with varied lengths."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n_docs):
        length = int(torch.randint(1, max_len + 1, (1,), generator=g))
        gate = torch.randn(length, d_mlp, generator=g)
        in_ = torch.randn(length, d_mlp, generator=g)
        if ties:
            # Few distinct values: many exact ties within and across documents.
            gate = torch.round(gate * 2) / 2
            in_ = torch.round(in_ * 2) / 2
        if all_negative_gate:
            gate = -gate.abs() - 0.1
        if zeros:
            gate[::3, 0] = 0.0
        if nonfinite and length > 1:
            # float16 overflow and silu(-inf) = NaN, next to ordinary values of the same document.
            gate[1, 0] = float("nan")
            in_[length - 1, 1] = float("inf")
            gate[0, 2] = float("-inf")  # post = silu(-inf) * in = NaN, though gate and in have signs
            in_[0, 3] = 1e30  # finite in float32, but post * 1e30 overflows nothing: stays counted
        docs.append((gate, in_))
    return docs


def hook_values(gate, in_):
    """post, in, gate, swish of one document (computed once, so batches see the same bits)."""
    swish = silu(gate)
    return [swish * in_, in_, gate, swish]


def brute_force(docs, k, first_counted: int):
    """Reference statistics by loops: dicts keyed by (neuron, case, hook)."""
    d_mlp = docs[0][0].shape[1]
    count = torch.zeros(d_mlp, 4, dtype=torch.int64)
    nonfinite = torch.zeros(d_mlp, 5, dtype=torch.int64)
    total = torch.zeros(d_mlp, 4, 4, dtype=torch.float64)
    mins = torch.full((d_mlp, 4, 4), math.inf)
    maxs = torch.full((d_mlp, 4, 4), -math.inf)
    lists = {}  # (n, c, h) -> list of (abs, doc, value, pos)
    for d, (gate, in_) in enumerate(docs):
        hooks = hook_values(gate, in_)
        best = {}
        for t in range(first_counted, gate.shape[0]):
            for n in range(d_mlp):
                gv, iv = float(gate[t, n]), float(in_[t, n])
                c = None if (gv == 0 or iv == 0 or math.isnan(gv) or math.isnan(iv)) else (
                    (0 if gv > 0 else 2) + (0 if iv > 0 else 1))
                if not all(math.isfinite(float(h[t, n])) for h in hooks):
                    nonfinite[n, 4 if c is None else c] += 1
                    continue
                if c is None:
                    continue
                count[n, c] += 1
                for h in range(4):
                    v = float(hooks[h][t, n])
                    total[n, c, h] += v
                    mins[n, c, h] = min(mins[n, c, h], v)
                    maxs[n, c, h] = max(maxs[n, c, h], v)
                    if (n, c, h) not in best or abs(v) > best[n, c, h][0]:
                        best[n, c, h] = (abs(v), d, v, t)
        for key, entry in best.items():
            lists.setdefault(key, []).append(entry)
    top = {key: sorted(entries, key=lambda e: (-e[0], e[1]))[:k] for key, entries in lists.items()}
    return count, total, mins, maxs, top, nonfinite


def batch_tensors(chunk, first_counted):
    """One batch as collection builds it: [B, T, N] hooks padded past each document, and valid."""
    d_mlp = chunk[0][0].shape[1]
    lengths = torch.tensor([g.shape[0] for g, _ in chunk])
    t_max = int(lengths.max()) + 2  # padding beyond the longest document
    # Padding carries large values that must not count.
    post, in_, gate, swish = (torch.full((len(chunk), t_max, d_mlp), 5.0) for _ in range(4))
    for b, (g, i) in enumerate(chunk):
        for full, part in zip((post, in_, gate, swish), hook_values(g, i)):
            full[b, : g.shape[0]] = part
    t = torch.arange(t_max)
    valid = (t[None] < lengths[:, None]) & (t[None] >= first_counted)
    return gate, in_, post, swish, valid, lengths


def tables(stats: LayerStats) -> dict[str, torch.Tensor]:
    """A copy of every table of ``stats`` as it is (window writes on their way to the host left there)."""
    return {f.name: t.clone() for f in dataclasses.fields(stats) if isinstance(t := getattr(stats, f.name), torch.Tensor)}


def run_batches(docs, k, first_counted, batch_size, doc_offset=0, capacity=None, flush_every=None, on_flush=None):
    """Statistics of ``docs`` in batches; with ``capacity``, through the path without host syncs
    (``nonzero_static``), growing the capacity and adding a batch again where it overflowed, as
    collection does. ``flush_every``: the GPU's path's windows in host memory, their writes applied
    every that many batches (``on_flush(stats)`` first); until then the window tables must not change."""
    d_mlp = docs[0][0].shape[1]
    stats = LayerStats.empty(d_mlp, k, W, windows_on_host=flush_every is not None)
    flushed = tables(stats)
    if capacity is not None:
        for number, start in enumerate(range(0, len(docs), batch_size), 1):
            gate, in_, post, swish, valid, lengths = batch_tensors(docs[start:start + batch_size], first_counted)
            red = reduce_batch(gate, in_, post, swish, valid, assume_finite=True)
            doc_ids = torch.arange(start, start + len(lengths)) + doc_offset
            before = tables(stats)
            applied, active = update_stats(stats, red, doc_ids, gate, in_, lengths, BEFORE, AFTER,
                                           capacity=capacity, accept=~red.suspect)
            if not bool(applied):  # overflow or NaN: nothing changed; add it again exactly
                assert int(active) > capacity or bool(red.suspect)
                for name, t in tables(stats).items():
                    assert torch.equal(t, before[name]) or (t.isnan() == before[name].isnan()).all() and torch.equal(
                        t.nan_to_num(), before[name].nan_to_num()), name
                update_stats(stats, reduce_batch(gate, in_, post, swish, valid), doc_ids, gate, in_, lengths,
                             BEFORE, AFTER)
            if flush_every is not None:
                for name in ("win_gate", "win_in"):  # still as last applied: the writes wait
                    assert torch.equal(getattr(stats, name).nan_to_num(99.0), flushed[name].nan_to_num(99.0))
                if number % flush_every == 0 or start + batch_size >= len(docs):
                    if on_flush is not None:
                        on_flush(stats)
                    stats.flush_windows()
                    flushed = tables(stats)
        return stats
    for start in range(0, len(docs), batch_size):
        gate, in_, post, swish, valid, lengths = batch_tensors(docs[start:start + batch_size], first_counted)
        red = reduce_batch(gate, in_, post, swish, valid)
        doc_ids = torch.arange(start, start + len(lengths)) + doc_offset
        stats = add_batch(stats, red, doc_ids, gate, in_, lengths, BEFORE, AFTER)
    return stats


def assert_matches(stats: LayerStats, docs, k, first_counted):
    count, total, mins, maxs, top, nonfinite = brute_force(docs, k, first_counted)
    assert torch.equal(stats.count, count)
    assert torch.equal(stats.nonfinite, nonfinite)
    torch.testing.assert_close(stats.sum, total, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.min, mins.float())
    assert torch.equal(stats.max, maxs.float())
    d_mlp = count.shape[0]
    for n in range(d_mlp):
        for c in range(4):
            for h in range(4):
                expected = top.get((n, c, h), [])
                docs_got = stats.top_doc[n, c, h].tolist()
                assert docs_got[: len(expected)] == [e[1] for e in expected], (n, c, h)
                assert all(d == -1 for d in docs_got[len(expected):])
                assert stats.top_pos[n, c, h, : len(expected)].tolist() == [e[3] for e in expected]
                torch.testing.assert_close(
                    stats.top_value[n, c, h, : len(expected)],
                    torch.tensor([e[2] for e in expected], dtype=torch.float32))
                assert stats.top_value[n, c, h, len(expected):].isnan().all()
                win_gate, win_in = stats.ordered_windows()
                for j, (_, d, _, p) in enumerate(expected):
                    gate, in_ = docs[d]
                    for w, t in enumerate(range(p - BEFORE, p + AFTER + 1)):
                        got_g = float(win_gate[n, c, h, j, w])
                        got_i = float(win_in[n, c, h, j, w])
                        if 0 <= t < gate.shape[0]:
                            # a window keeps a neighbour's NaN or inf as it was
                            for got, want in ((got_g, float(gate[t, n])), (got_i, float(in_[t, n]))):
                                assert got == want or (math.isnan(got) and math.isnan(want))
                        else:
                            assert math.isnan(got_g) and math.isnan(got_i)


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=0, n_docs=12, k=4, batch=5, first=1),  # BOS excluded
        dict(seed=1, n_docs=9, k=4, batch=4, first=0, ties=True),  # exact ties everywhere
        dict(seed=2, n_docs=3, k=8, batch=2, first=1),  # k larger than the number of documents
        dict(seed=3, n_docs=7, k=3, batch=3, first=1, all_negative_gate=True),  # empty gate+ cases
        dict(seed=4, n_docs=8, k=3, batch=8, first=0, zeros=True),  # zeros belong to no case
        # NaN and inf are counted apart and never push a document's finite values out of a list
        dict(seed=8, n_docs=10, k=4, batch=4, first=0, nonfinite=True, zeros=True),
    ],
    ids=["plain", "ties", "k>docs", "all-negative-gate", "zeros", "nonfinite"],
)
def test_statistics_match_brute_force(case):
    docs = make_docs(case["seed"], case["n_docs"], d_mlp=5, max_len=7, ties=case.get("ties", False),
                     all_negative_gate=case.get("all_negative_gate", False),
                     zeros=case.get("zeros", False), nonfinite=case.get("nonfinite", False))
    stats = run_batches(docs, case["k"], case["first"], case["batch"])
    assert_matches(stats, docs, case["k"], case["first"])


def test_documents_shorter_than_window_and_single_token():
    docs = make_docs(5, 6, d_mlp=4, max_len=2)
    stats = run_batches(docs, 4, 0, 3)
    assert_matches(stats, docs, 4, 0)
    # Each filled slot has NaN before the document's start.
    filled = stats.top_doc >= 0
    assert stats.ordered_windows()[0][..., 0][filled].isnan().all()


def test_all_negative_gate_leaves_gate_plus_cases_empty():
    docs = make_docs(6, 5, d_mlp=3, max_len=6, all_negative_gate=True)
    stats = run_batches(docs, 4, 0, 5)
    assert (stats.count[:, :2] == 0).all()
    assert (stats.top_doc[:, :2] == -1).all()
    assert torch.isinf(stats.min[:, :2]).all() and (stats.min[:, :2] > 0).all()


def test_nan_never_removes_a_documents_finite_values():
    """Finding: a NaN won the per-document maximum, so its document dropped out of the list."""
    gate = torch.tensor([[[2.0], [float("nan")], [1.0]]])
    in_ = torch.ones_like(gate)
    swish = silu(gate)
    valid = torch.ones(1, 3, dtype=torch.bool)
    stats = add_batch(LayerStats.empty(1, 2, W), reduce_batch(gate, in_, swish * in_, swish, valid),
                      torch.tensor([0]), gate, in_, torch.tensor([3]), BEFORE, AFTER)
    assert stats.top_doc[0, 0, 2].tolist() == [0, -1]  # gate+_in+, hook gate: document 0 at its 2.0
    assert stats.top_pos[0, 0, 2, 0] == 0 and stats.top_value[0, 0, 2, 0] == 2.0
    assert stats.max[0, 0, 2] == 2.0 and stats.min[0, 0, 2] == 1.0
    assert stats.count[0].tolist() == [2, 0, 0, 0]
    assert stats.nonfinite[0].tolist() == [0, 0, 0, 0, 1]  # NaN gate: no sign, so no case


def test_merge_of_two_halves_equals_whole():
    docs = make_docs(7, 14, d_mlp=6, max_len=9, ties=True, nonfinite=True)
    whole = run_batches(docs, 5, 1, 4)
    first = run_batches(docs[:6], 5, 1, 4)
    second = run_batches(docs[6:], 5, 1, 4, doc_offset=6)
    merged = merge_stats(first, second)
    assert torch.equal(merged.count, whole.count)
    assert torch.equal(merged.nonfinite, whole.nonfinite) and merged.nonfinite.sum() > 0
    for name in ("min", "max", "top_key", "top_doc", "top_pos"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    pairs = [(merged.top_value, whole.top_value)]
    pairs += list(zip(merged.ordered_windows(), whole.ordered_windows()))
    for a, b in pairs:
        assert ((a == b) | (a.isnan() & b.isnan())).all()
    # Sums are added per batch in float32, so batch boundaries move the last bits only.
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("poison", [None, ("gate", float("nan")), ("in", float("-inf")), ("gate", float("-inf")),
                                    ("in_zero_gate", float("inf"))],
                         ids=["finite", "nan-gate", "inf-in", "silu(-inf)", "inf-in-at-zero-gate"])
def test_compiled_reduction_equals_eager(poison):
    """The compiled path assumes finite values and must notice when they are not."""
    from collect.stats import compiled_reduce_batch

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 11, 8, generator=g)
    in_ = torch.randn(3, 11, 8, generator=g)
    if poison is not None:
        where, value = poison
        if where == "in_zero_gate":
            gate[1, 4, 5], in_[1, 4, 5] = 0.0, value  # no case, but post = silu(0) * inf = NaN
        else:
            (gate if where == "gate" else in_)[1, 4, 5] = value
    valid = torch.rand(3, 11, generator=g) > 0.2
    valid[1, 4] = True
    swish = silu(gate)
    eager = reduce_batch(gate, in_, swish * in_, swish, valid)
    assert int(eager.nonfinite.sum()) == (poison is not None)
    assert bool(reduce_batch(gate, in_, swish * in_, swish, valid, assume_finite=True).suspect) == (poison is not None)
    fused = compiled_reduce_batch(True)(gate, in_, swish * in_, swish, valid)
    for name in ("count", "nonfinite", "min", "max", "doc_abs", "doc_pos"):
        assert torch.equal(getattr(eager, name), getattr(fused, name)), name
    assert torch.allclose(eager.doc_value, fused.doc_value, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(eager.sum, fused.sum)


def test_compiled_histograms_equal_eager():
    """The histograms' compiled scatter counts what the eager one counts, values at bin edges included."""
    from collect.stats import N_BINS, compiled_histogram_batch, histogram_batch
    from mkdocs_gluscope.distributions import DENSITY_HALF

    g = torch.Generator().manual_seed(1)
    gate = torch.randn(3, 13, 6, generator=g) * 8
    in_ = torch.randn(3, 13, 6, generator=g) ** 3
    gate[0, :4, 0] = torch.tensor([0.0, 2.0**-10, 1024.0, -0.5])  # a zero (no case) and exact edges
    swish = silu(gate)
    valid = torch.rand(3, 13, generator=g) > 0.3
    results = []
    for fn in (histogram_batch, compiled_histogram_batch(True)):
        hist = torch.zeros(6, 4, 4, N_BINS, dtype=torch.int32)
        density = torch.zeros(6, 4, DENSITY_HALF, DENSITY_HALF, dtype=torch.int32)
        for weight in (1, 0, 1):  # a batch with weight 0 (not applied) adds nothing
            fn(gate, in_, swish * in_, swish, valid, torch.tensor(weight, dtype=torch.int32), hist, density)
        results.append((hist, density))
    for eager, fused in zip(*results):
        assert torch.equal(eager, fused)
    counted = (valid[:, :, None] & (gate != 0) & (in_ != 0)).sum()
    assert int(results[0][1].sum()) == 2 * int(counted) and int(results[0][0].sum()) == 4 * 2 * int(counted)


@pytest.mark.parametrize("capacity", [1, 7, 1000], ids=["overflows", "some-overflow", "ample"])
@pytest.mark.parametrize("kind", ["plain", "ties", "nonfinite"])
def test_statistics_without_host_syncs_match_brute_force(capacity, kind):
    """The GPU path: a fixed number of lists per batch (``nonzero_static``); a batch that changes
    more lists, or has a NaN, leaves the statistics unchanged and is added again exactly."""
    docs = make_docs(11, 13, d_mlp=5, max_len=8, ties=kind == "ties", nonfinite=kind == "nonfinite",
                     zeros=kind == "nonfinite")
    stats = run_batches(docs, 4, 1, 3, capacity=capacity)
    assert_matches(stats, docs, 4, 1)


@pytest.mark.parametrize("capacity", [7, 1000], ids=["some-overflow", "ample"])
def test_window_writes_on_their_way_to_host_memory_apply_in_order(capacity):
    """The GPU's path keeps the top-k windows in host memory: a batch's window writes leave the device
    as one update each and wait; the tables do not change until the writes are applied, then in the
    order they were made. Here three batches' writes at a time, with entries evicted and their slots
    reused in between (so that the order matters: applied backwards, some window differs), and the
    lists and windows equal brute force."""
    from collect.stats import WindowWrites

    docs = make_docs(11, 17, d_mlp=5, max_len=8, ties=True)
    order_mattered = []

    def backwards(stats):  # the same writes applied in the reverse order, to a copy
        gate, in_ = stats.win_gate.clone(), stats.win_in.clone()
        reverse = WindowWrites()
        reverse._pending = list(reversed(stats.writes._pending))
        reverse.apply(gate, in_)
        stats.flush_windows()
        order_mattered.append(not (torch.equal(gate.nan_to_num(99.0), stats.win_gate.nan_to_num(99.0))
                                   and torch.equal(in_.nan_to_num(99.0), stats.win_in.nan_to_num(99.0))))

    stats = run_batches(docs, 4, 1, 2, capacity=capacity, flush_every=3, on_flush=backwards)
    assert stats.writes is not None and len(stats.writes) == 0
    assert any(order_mattered), order_mattered
    assert_matches(stats, docs, 4, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_window_writes_in_host_memory_equal_the_devices_in_every_window_dtype(dtype):
    """The host writes only the rows that changed, as bytes (numpy has no bfloat16: the windows of a
    bfloat16 model for a float32 file): every window equals the fixed-shape write's, bit for bit."""
    from collect.stats import _host_write, _write_windows

    g = torch.Generator().manual_seed(5)
    device_tables = [torch.full((6, 4, 4, 3, W), float("nan"), dtype=dtype) for _ in range(2)]
    host_tables = [t.clone() for t in device_tables]
    for _ in range(3):
        rows = torch.randperm(6 * 16 * 3, generator=g)[:40]
        cuts = [torch.randn(40, W, generator=g).to(dtype) for _ in range(2)]
        keep = torch.rand(40, 1, generator=g) < 0.5
        _write_windows(device_tables, rows, cuts, keep)
        _host_write(host_tables, rows, cuts, keep)
    for a, b in zip(device_tables, host_tables):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and not a.isnan().all()


def test_windows_cut_by_either_path_agree():
    """Many windows are cut from a neuron-major copy of the batch, few by direct gathers."""
    from collect.stats import windows_at

    g = torch.Generator().manual_seed(3)
    values = torch.randn(3, 7, 5, generator=g)
    rows, pos = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 3, 6, 2, 0])
    neurons, lengths = torch.tensor([4, 0, 2, 1, 3]), torch.tensor([7, 4, 7])
    many = windows_at(values, rows, pos, neurons, lengths, BEFORE, AFTER)  # 5 x 5 x 4 >= 105 values
    wide = torch.cat([values, torch.zeros(3, 7, 200)], dim=2)  # the same values among many more
    few = windows_at(wide, rows, pos, neurons, lengths, BEFORE, AFTER)
    for window, (r, p, n) in zip(many, zip(rows.tolist(), pos.tolist(), neurons.tolist())):
        expected = [float(values[r, t, n]) if 0 <= t < int(lengths[r]) else math.nan
                    for t in range(p - BEFORE, p + AFTER + 1)]
        assert window.nan_to_num(99.0).tolist() == torch.tensor(expected).nan_to_num(99.0).tolist()
    assert torch.equal(many.nan_to_num(99.0), few.nan_to_num(99.0))
