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


def assert_same_tables(kernel: LayerStats, torch_code: LayerStats, skip: tuple[str, ...] = ()) -> None:
    """Every table of the kernel's statistics equals the torch code's (but those in ``skip``): the
    windows read in list order (where a window is stored, ``top_slot``, may differ), the sums to
    rounding, the rest value for value (NaN as a value)."""
    windows = dict(zip(("win_gate", "win_in"), kernel.ordered_windows()))
    want_windows = dict(zip(("win_gate", "win_in"), torch_code.ordered_windows()))
    for name, want in torch_code.to_dict().items():
        if name == "top_slot" or name in skip:
            continue
        got = windows.get(name, getattr(kernel, name))
        want = want_windows.get(name, want)
        if name == "sum":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        else:
            assert torch.equal(got.float().nan_to_num(7.0) if got.is_floating_point() else got,
                               want.float().nan_to_num(7.0) if want.is_floating_point() else want), name


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


def test_kernel_histograms_of_values_in_every_octave():
    """Gate and in from 2**-13 to 2**13, either sign: every histogram bin of every hook (both clamped
    ends too) and every density cell in every case. The kernel folds its narrow counters into the
    tables a row of bins at a time (three vectors of eight per row of 22): each bin's count must land
    in its own place."""
    g = torch.Generator().manual_seed(11)

    def spread(shape):
        octave = torch.randint(-13, 13, shape, generator=g).float()
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        return sign * (1 + torch.rand(shape, generator=g)) * 2**octave

    docs = [(spread((40, 9)), spread((40, 9))) for _ in range(6)]
    stats = run_kernel(docs, 3, 1, 4, samples=2, band_samples=1)
    assert_distributions(stats, docs, 1, 2, 1)
    for hook in range(4):  # the values reach every bin of every hook's histogram
        assert bool((stats.hist.sum(dim=(0, 1))[hook] > 0).all()), hook


def test_kernel_examples_with_open_case_lists_and_full_band_lists():
    """A position whose priority is above every full list's and whose |post| is in a band whose
    lists are full still enters its case's list while that list is open (the kernel passes over
    positions that cannot enter any list: the case's open list must count for every band)."""
    case = dict(seed=9, n_docs=8, batch=2, first=1, samples=20, band_samples=1)
    docs = make(case, d_mlp=2, max_len=16)  # |post| near 1 and near 0.01: a low band's lists fill first
    stats = run_kernel(docs, 3, case["first"], case["batch"], case["samples"], case["band_samples"])
    assert_distributions(stats, docs, case["first"], case["samples"], case["band_samples"])


def test_kernel_examples_of_a_rare_band_in_a_late_batch():
    """In a run's later batches every list but the highest band's is full and the kernel passes over a
    chunk's positions at one comparison each, against the bars of the bands up to the chunk's largest
    |post| (or over the whole chunk at one, where its least priority is above them: each chunk here
    holds a position at a bar's own top bits, which must not pass it over). A position in a rare
    band, whose list filled early and keeps a high last priority, must still enter that list: below
    its band's bar, or at the bar's top bits and below the list's own limit. The kernel's
    candidates equal the torch code's (collect.stats.find_candidates)."""
    from collect.stats import EMPTY_PRIORITY, find_candidates

    n, t = 16, 80  # two groups of lanes, three chunks of positions
    gate, in_ = torch.full((1, t, n), 0.01), torch.full((1, t, n), 0.02)  # |post| in the lowest band
    rare = [(5, 3), (40, 12), (70, 6)]  # |post| about 1.8: band [1, 8)
    for pos, neuron in rare:
        gate[0, pos, neuron], in_[0, pos, neuron] = 2.0, 1.0
    gate[0, 50, 9] = -0.01  # another case in the same chunk as a rare position
    swish = torch.nn.functional.silu(gate)
    post = swish * in_
    valid = torch.ones(1, t, dtype=torch.bool)
    stats = LayerStats.empty(n, 3, W, samples=2, band_samples=1)
    stats.sample_key[...] = torch.tensor([1, 2])  # full, low limits: nothing enters them
    stats.band_key[...] = 3
    high = 5 << 40  # a multiple of 2**31: the kernel compares priorities' top bits first
    limit = high + (1 << 20)
    stats.band_key[:, 0, 3, :] = limit  # case 0's list of the band [1, 8): full early, a high limit
    stats.band_key[:, :, 4, :] = EMPTY_PRIORITY  # the highest band: no position yet, open
    prio = torch.full((1, t), 9 << 40) + torch.arange(t)  # above every limit
    prio[0, 5] = high + 1  # the bar's own top bits, below the limit: enters
    prio[0, 40] = high - (3 << 31)  # below the bar
    prio[0, 70] = limit + 1  # the bar's top bits, above the limit: enters nothing
    prio[0, 50] = high - (1 << 31)  # below the rare band's bar, but its |post| is in the lowest band
    doc_ids = torch.tensor([4])
    tables = (torch.zeros_like(stats.hist), torch.zeros_like(stats.density))
    _, got = fused.reduce_and_bin(stats, gate, in_, post, swish, valid, prio=prio, doc_ids=doc_ids, tables=tables)
    want = find_candidates(stats, (post, in_, gate, swish), valid, prio, doc_ids, capacity=t * n)
    assert not bool(want.overflow)
    for name in ("sample_key", "sample_b", "sample_t", "band_key", "band_b", "band_t"):
        assert torch.equal(getattr(got.candidates, name), getattr(want.candidates, name)), name
    entered = got.candidates.band_key[:, 0, 3, 0]
    assert (entered[3], entered[12], entered[6]) == (high + 1, high - (3 << 31), EMPTY_PRIORITY)
    assert int((got.candidates.band_key != EMPTY_PRIORITY).sum()) == 2


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


def packed_expert_batches(seed: int, n_batches: int, *, rows: int = 3, length: int = 24, n_experts: int = 5,
                          top_k: int = 2, size: int = 12, dtype: torch.dtype = torch.float32):
    """Batches of a mixture-of-experts layer's routed rows (:class:`collect.moe.ExpertRows`): ``top_k``
    distinct experts per token, documents of varied lengths, values with ties, zeros, a NaN and an inf."""
    from collect.moe import ExpertRows

    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        lengths = torch.randint(length // 3, length + 1, (rows,), generator=g)
        lengths[0] = length
        t = torch.arange(length)
        valid = (t[None, :] < lengths[:, None]) & (t[None, :] >= 1)
        expert = torch.rand(rows * length, n_experts, generator=g).argsort(dim=1)[:, :top_k].reshape(-1)
        token = torch.arange(rows * length).repeat_interleave(top_k)
        gate = torch.round(torch.randn(len(token), size, generator=g) * 4) / 4
        in_ = torch.round(torch.randn(len(token), size, generator=g) * 4) / 4
        if i == 1:
            gate[3, 2], in_[5, 7], gate[9, 0] = float("nan"), float("inf"), 0.0
        gate, in_ = gate.to(dtype), in_.to(dtype)
        yield ExpertRows(gate=gate, in_=in_, swish=torch.nn.functional.silu(gate), token=token, expert=expert), \
            valid, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [12, 16, 200],
                         ids=["experts-across-lanes", "experts-on-lane-boundaries", "more-windows-than-one-run-of-cuts"])
def test_kernel_on_packed_experts_equals_the_torch_code(dtype, size):
    """A mixture-of-experts layer's recorded experts (some left out) packed as collection packs them, batch
    after batch, through the kernel (per-expert valid slots and sampling priorities, windows cut through
    the packing) and through the torch code: every statistic, the top-k lists with their windows and the
    random examples with theirs, value for value (sums to rounding). Expert widths that straddle the
    kernel's 8 lanes and ones that do not; and 800 neurons, whose first batch enters tens of thousands
    of windows (the kernel cuts them in runs of 4,096, each memory read requested ahead)."""
    from collect.batch import Batch, LayerPaths
    from collect.moe import pack_experts
    from mkdocs_gluscope.distributions import EMPTY_PRIORITY

    recorded = [0, 2, 3, 4]
    groups = torch.tensor([0, -1, 1, 2, 3])
    n = len(recorded) * size
    states, paths = {}, {}
    for name in ("kernel", "torch"):
        states[name] = LayerStats.empty(n, 3, W, samples=3, band_samples=2)
        paths[name] = LayerPaths(torch.device("cpu"), n, False, on_gpu_path=False)
    paths["torch"].kernel = False
    assert paths["kernel"].kernel
    for i, (rows, valid, lengths) in enumerate(packed_expert_batches(11, 4, size=size, dtype=dtype)):
        packed = pack_experts(rows, valid, lengths, groups, len(recorded), None)
        doc_ids = torch.arange(i * len(lengths), (i + 1) * len(lengths))
        prio = batch_prio(doc_ids, valid.shape[1], lengths).masked_fill(~valid, EMPTY_PRIORITY)
        batch = Batch(doc_ids, lengths, packed.packing.neuron_valid(), prio, BEFORE, AFTER)
        for name in ("kernel", "torch"):
            paths[name].add(i, states[name], (packed.gate, packed.in_, packed.post, packed.swish), batch,
                            packing=packed.packing)
    assert paths["kernel"].kernel  # its run-time check against the eager code found no difference either
    kernel, torch_code = states["kernel"], states["torch"]
    assert int(kernel.nonfinite.sum()) >= 1 and int((kernel.sample_key != EMPTY_PRIORITY).sum()) > 100
    assert_same_tables(kernel, torch_code)


@pytest.mark.parametrize("before, after", [(0, 0), (16, 2), (40, 5)], ids=["one-value", "default", "longer-than-32"])
@pytest.mark.parametrize("dtype, window_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_kernel_windows_equal_the_torch_codes(before, after, dtype, window_dtype):
    """The windows the kernel cuts for the top-k lists and the random examples (each bucket of
    16 neurons' rows read once, in order, through a ring of the last rows) against the torch code's:
    contexts of one value, the default 19 and more than the ring's 32, documents shorter than the
    batch, hooks that are views of a wider tensor (rows of an odd width, as a fused gate and up
    projection leaves them), neurons past the last full line of 16, and a first batch in which
    every document enters every list."""
    g = torch.Generator().manual_seed(11)
    b, t, n = 6, 70, 37
    lengths = torch.tensor([70, 55, 3, 70, 41, 1])
    valid = torch.arange(t)[None, :] < lengths[:, None]
    states = {name: LayerStats.empty(n, 8, before + 1 + after, window_dtype=window_dtype, samples=3, band_samples=2)
              for name in ("kernel", "torch")}
    for batch in range(2):
        wide = torch.randn(b, t, 2 * n + 3, generator=g).to(dtype)
        gate, in_ = wide[..., :n], wide[..., n + 3:]
        swish = torch.nn.functional.silu(gate)
        post = swish * in_
        doc_ids = torch.arange(batch * b, (batch + 1) * b)
        prio = batch_prio(doc_ids, t, lengths)
        hooks = (post, in_, gate, swish)
        reduced, distributions = fused.reduce_and_bin(states["kernel"], gate, in_, post, swish, valid, prio=prio,
                                                      doc_ids=doc_ids)
        update_stats(states["kernel"], reduced, doc_ids, gate, in_, lengths, before, after, hooks=hooks, valid=valid,
                     prio=prio, check_finite=True, distributions=distributions, merge=fused.merge_top,
                     examples=fused.add_candidates)
        update_stats(states["torch"], reduce_batch(gate, in_, post, swish, valid), doc_ids, gate, in_, lengths, before,
                     after, hooks=hooks, valid=valid, prio=prio, check_finite=True)
    kernel, torch_code = states["kernel"], states["torch"]
    assert int(kernel.top_key[..., -1].ge(0).sum()) > 0.9 * kernel.top_key[..., -1].numel()  # lists full: many cuts
    assert_same_tables(kernel, torch_code, skip=("sum", "hist", "density"))  # the windows and the lists they go with


def test_kernel_float16_windows_round_as_torch_does():
    """The merge's float32-to-float16 conversion of window values (by F16C where the CPU has it)
    gives torch's halves: ties to even, subnormals, overflow to infinity, signed zeros, NaN."""
    edges = torch.tensor([0x00000000, 0x80000000, 0x33000000, 0x33000001, 0x337fffff, 0x38800000, 0x387fe000,
                          0x387ff000, 0x387ff001, 0x3f801000, 0x3f803000, 0x477fefff, 0x477ff000, 0x7f7fffff,
                          0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001, 0x7f800001, 0x00000001],
                         dtype=torch.int64).to(torch.int32)
    random_bits = torch.randint(-2**31, 2**31, (100_003,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    values = torch.cat([edges, random_bits.to(torch.int32)]).view(torch.float32)
    for count in (values.numel(), 19, 7):  # the vector loop, one window, its scalar tail alone
        part = values[:count].contiguous()
        out = torch.empty(count, dtype=torch.float16)
        fused._fused.convert(part.data_ptr(), out.data_ptr(), count, 2)
        want = part.half()
        same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
        assert same.all(), [(hex(v), hex(g), hex(w)) for v, g, w in zip(
            part.view(torch.int32)[~same].tolist(), out.view(torch.int16)[~same].tolist(),
            want.view(torch.int16)[~same].tolist())][:5]
        # A NaN is stored as one quiet NaN of its sign (the torch code's windows hold the same).
        nan = part.isnan()
        assert ((out.view(torch.int16)[nan] & 0x7fff) == 0x7e00).all()


def test_kernel_histograms_of_a_call_longer_than_the_narrow_counters_hold():
    """One call of 90,000 positions (beyond the 65,535 a narrow 16-bit counter holds), most of them
    in one bin, over 72 neurons (a superblock of 64 and one of 8; groups of 8 lanes): the kernel
    counts a group's positions in runs, folding its counters into that group's stored tables after
    each run. Every neuron's histograms and density equal the torch tables (collect.stats.histogram_batch)."""
    from collect.stats import histogram_batch

    g = torch.Generator().manual_seed(5)
    b, t, n = 3, 30000, 72
    gate = torch.full((b, t, n), 1.5)  # one (gate, in) cell and one (post, act) cell for most positions
    in_ = torch.full((b, t, n), -0.75)
    spread = torch.rand(b, t, n, generator=g) < 0.2
    gate[spread] = torch.randn(int(spread.sum()), generator=g) * 3
    in_[spread] = torch.randn(int(spread.sum()), generator=g)
    gate[:, :, 5] *= 100  # neurons of their own ranges, so that a table folded into the wrong neuron shows
    in_[:, :, 66] /= 1000
    swish = torch.nn.functional.silu(gate)
    post = swish * in_
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 29000:] = False  # a shorter document: its tail counts nowhere
    stats = LayerStats.empty(n, 3, W, samples=2, band_samples=1)
    hist, density = torch.zeros_like(stats.hist), torch.zeros_like(stats.density)
    fused.layer_batch(gate, in_, post, swish, valid, hist=hist, density=density, threads=1)
    want_hist, want_density = torch.zeros_like(hist), torch.zeros_like(density)
    histogram_batch(gate, in_, post, swish, valid, torch.tensor(1, dtype=torch.int32), want_hist, want_density)
    assert int(want_hist[0].max()) > 65535  # the test's premise: one bin's count overflows a narrow counter
    assert torch.equal(hist, want_hist)
    assert torch.equal(density, want_density)
