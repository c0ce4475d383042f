"""``gluscope pick`` and the pages agree on which examples count: start-of-document ones do not."""

from __future__ import annotations

import h5py
import numpy as np

from mkdocs_gluscope.pick import pick_neurons
from mkdocs_gluscope.store import EARLY_POSITIONS, ActivationsFile
from synthetic import stage_early_list, write_synthetic


def test_pick_scores_leave_out_start_of_document_examples(tmp_path):
    docs = [[0] + [(d + t) % 50 + 1 for t in range(40)] for d in range(12)]
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=4, k=4, before=3, after=1, docs=docs)
    # Neuron 0.2's rare case gate-_in-: huge hook_post at positions 3 and 5 (attention sinks), then -496 at 20.
    stage_early_list(path, positions=[3, 5, 20, 30], values=[-66400, -8990, -496, -100], neuron=2, case=3)
    with h5py.File(path, "a") as f:
        f["stats/count"][0, 2, 3] = 100  # enough positions for k examples
    with ActivationsFile(path) as f:
        picks = pick_neurons(f, per_layer=4, mix=0, rare=1.0)
    reasons = {p.id: p.reason for p in picks}
    assert 5 < 1 + EARLY_POSITIONS <= 20  # positions 3 and 5 are "start of document" on the page
    assert "reaches hook_post -496" in reasons["0.2"], reasons
    assert np.isfinite([p.score for p in picks]).all()


SIGNS = np.array([1, -1, -1, 1])  # sign of hook_post in each case


def staged_scales(tmp_path, scales, outliers, *, layers=1, d_mlp=200, seed=1):
    """A file whose every case is rare (10 positions in 480) and whose hook_post extremes are, per
    case, uniform in [0.5, 1] x ``scales[case]`` (after the start of the document), except
    ``outliers`` {(layer, neuron): case}: 5 x the case's scale."""
    docs = [[0] + [(d + t) % 50 + 1 for t in range(40)] for d in range(12)]
    path = write_synthetic(tmp_path / "act.h5", layers=layers, d_mlp=d_mlp, k=4, docs=docs)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "a") as f:
        magnitude = -np.sort(-rng.uniform(0.5, 1.0, (layers, d_mlp, 4, 4)), axis=-1) * np.asarray(scales)[:, None]
        for (layer, neuron), case in outliers.items():
            magnitude[layer, neuron, case] *= 5
        for name, new in (("top/value", magnitude * SIGNS[:, None]), ("top/pos", 20)):
            data = f[name][...]
            data[:, :, :, 0] = new
            f[name][...] = data
        f["stats/count"][...] = 10
    return path


def test_pick_scores_each_case_against_its_own_scale(tmp_path):
    # gate-_in- reaches |hook_post| 0.01..0.02 (SiLU of a negative gate is small); neuron 7's 0.05..0.1.
    path = staged_scales(tmp_path, [2.0, 1.0, 0.05, 0.02], {(0, 7): 3})
    with ActivationsFile(path) as f:
        post = f.file["top/value"][0, :, :, 0, 0]
        # One scale for the whole layer would not pick it: every neuron's gate+_in+ is larger.
        assert abs(post[7, 3]) < np.abs(post[:, 0]).min()
        picks = pick_neurons(f, per_layer=1, mix=0, per_case=0)
    assert [p.id for p in picks] == ["0.7"], picks
    assert picks[0].reason == f"rare gate-_in- (2.1% of tokens) reaches hook_post {post[7, 3]:.3g}", picks[0].reason
    assert picks[0].score > 2.5  # at least 5 x 0.5 of the case's scale


def test_picks_cover_all_four_cases_when_their_scales_differ(tmp_path):
    outliers = {(0, 3): 3, (1, 11): 2, (2, 5): 1, (3, 42): 0}
    path = staged_scales(tmp_path, [30.0, 3.0, 0.1, 0.01], outliers, layers=4)
    with ActivationsFile(path) as f:
        picks = pick_neurons(f, per_layer=1, mix=0, per_case=0)
    assert {(p.layer, p.neuron) for p in picks} == set(outliers)
    cases = {p.reason.split()[1] for p in picks}
    assert cases == {"gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"}, picks


def test_every_case_gets_its_standouts_when_the_layers_best_are_all_one_case(tmp_path):
    """Each layer's standout is a gate+_in+ neuron; --per-case still brings the best of the others."""
    outliers = {(0, 3): 0, (1, 11): 0, (1, 50): 3, (0, 60): 2}
    path = staged_scales(tmp_path, [1.0, 1.0, 1.0, 1.0], outliers, layers=2)
    with h5py.File(path, "a") as f:  # the gate+_in+ outliers stand out most of all
        data = f["top/value"][...]
        data[0, 3, 0, 0] *= 4
        data[1, 11, 0, 0] *= 4
        f["top/value"][...] = data
    with ActivationsFile(path) as f:
        per_layer = pick_neurons(f, per_layer=1, mix=0, per_case=0)
        assert {p.reason.split()[1] for p in per_layer} == {"gate+_in+"}
        picks = pick_neurons(f, per_layer=1, mix=0, per_case=1)
    cases = {p.reason.split()[1] for p in picks}
    assert cases == {"gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"}, picks
    assert {(1, 50), (0, 60)} <= {(p.layer, p.neuron) for p in picks}
