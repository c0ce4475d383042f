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
