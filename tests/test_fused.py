"""The CPU kernel (collect/_fused.cpp) against the brute-force references and the torch code."""

from __future__ import annotations

import pytest
import torch

from collect import fused
from collect.stats import LayerStats, reduce_batch, update_stats
from test_distributions import CASES as DIST_CASES
from test_distributions import IDS as DIST_IDS
from test_distributions import assert_distributions, batch_prio, make
from test_stats import AFTER, BEFORE, W, assert_matches, batch_tensors, make_docs

pytestmark = pytest.mark.skipif(not fused.available(), reason="collect._fused was not built (no C++ compiler)")


def run_kernel(docs, k, first_counted, batch_size, samples=0, band_samples=1, *, doc_offset=0, dtype=None):
    """Statistics of ``docs`` batch by batch through the kernel, as collection adds them on a CPU."""
    d_mlp = docs[0][0].shape[1]
    stats = LayerStats.empty(d_mlp, k, W, samples=samples, band_samples=band_samples)
    for start in range(0, len(docs), batch_size):
        gate, in_, post, swish, valid, lengths = batch_tensors(docs[start:start + batch_size], first_counted)
        if dtype is not None:
            gate, in_, post, swish = (x.to(dtype) for x in (gate, in_, post, swish))
        doc_ids = torch.arange(start, start + len(lengths)) + doc_offset
        prio = batch_prio(doc_ids, gate.shape[1], lengths)
        reduced, distributions = fused.reduce_and_bin(stats, gate, in_, post, swish, valid, prio=prio, doc_ids=doc_ids)
        assert not bool(reduced.suspect)
        update_stats(stats, reduced, doc_ids, gate, in_, lengths, BEFORE, AFTER, hooks=(post, in_, gate, swish),
                     valid=valid, prio=prio, check_finite=True, distributions=distributions, cut=fused.windows_at,
                     merge=fused.merge_top, examples=fused.add_candidates)
    return stats


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=0, n_docs=12, k=4, batch=5, first=1),
        dict(seed=1, n_docs=9, k=4, batch=4, first=0, ties=True),
        dict(seed=3, n_docs=7, k=3, batch=3, first=1, all_negative_gate=True),
        dict(seed=8, n_docs=10, k=4, batch=4, first=0, nonfinite=True, zeros=True),
    ],
    ids=["plain", "ties", "all-negative-gate", "nonfinite"],
)
def test_kernel_statistics_match_brute_force(case):
    docs = make_docs(case["seed"], case["n_docs"], d_mlp=11, max_len=7, ties=case.get("ties", False),
                     all_negative_gate=case.get("all_negative_gate", False), zeros=case.get("zeros", False),
                     nonfinite=case.get("nonfinite", False))
    assert_matches(run_kernel(docs, case["k"], case["first"], case["batch"]), docs, case["k"], case["first"])


@pytest.mark.parametrize("case", DIST_CASES, ids=DIST_IDS)
def test_kernel_distributions_match_brute_force(case):
    docs = make(case)
    stats = run_kernel(docs, 3, case["first"], case["batch"], case["samples"], case["band_samples"])
    assert_distributions(stats, docs, case["first"], case["samples"], case["band_samples"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_neuron", [False, True], ids=["valid-per-position", "valid-per-neuron"])
def test_kernel_reduction_equals_the_torch_code(dtype, per_neuron):
    """Every output of the reduction, value for value (sums to rounding), at widths that are not a
    multiple of the kernel's 8 lanes or its blocks, with NaN, inf, zeros and ties."""
    g = torch.Generator().manual_seed(5)
    for b, t, n in [(3, 11, 5), (2, 40, 37), (4, 70, 131)]:
        gate = torch.round(torch.randn(b, t, n, generator=g) * 4) / 4
        in_ = torch.round(torch.randn(b, t, n, generator=g) * 4) / 4
        gate[0, 1, 2], in_[1, 3, 4], gate[0, 2, n - 1] = float("nan"), float("inf"), float("-inf")
        gate, in_ = gate.to(dtype), in_.to(dtype)
        swish = torch.nn.functional.silu(gate)
        post = swish * in_
        valid = torch.rand(b, t, generator=g) > 0.2
        if per_neuron:
            valid = valid[:, :, None] & (torch.rand(b, t, n, generator=g) > 0.3)
            valid[0, 1, 2] = valid[1, 3, 4] = valid[0, 2, n - 1] = True
        else:
            valid[0, 1] = valid[1, 3] = valid[0, 2] = True
        want = reduce_batch(gate, in_, post, swish, valid)
        got, _ = fused.layer_batch(gate, in_, post, swish, valid)
        for name in ("count", "nonfinite", "min", "max", "doc_abs", "doc_pos", "doc_count", "doc_min_abs", "doc_value"):
            assert torch.equal(getattr(want, name).nan_to_num(7.0), getattr(got, name).nan_to_num(7.0)), name
        torch.testing.assert_close(want.sum, got.sum, rtol=1e-5, atol=1e-4)
        assert int(got.nonfinite.sum()) > 0 and not bool(got.suspect)


def test_kernel_threads_give_the_same_statistics():
    docs = make(DIST_CASES[0], d_mlp=5, max_len=7)
    one = run_kernel(docs, 3, 1, 5, 3, 2)
    torch.set_num_threads(2)
    try:
        fused.BLOCK, block = 1, fused.BLOCK  # several blocks: each thread takes some
        two = run_kernel(docs, 3, 1, 5, 3, 2)
    finally:
        fused.BLOCK = block
    for name, value in one.to_dict().items():
        assert torch.equal(value.nan_to_num(7.0) if value.is_floating_point() else value,
                           getattr(two, name).nan_to_num(7.0) if value.is_floating_point() else getattr(two, name)), name
