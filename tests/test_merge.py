"""gluscope merge accepts exactly a complete, disjoint set of shards of one run."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from collect.run import collect
from mkdocs_gluscope.cli import main
from test_collect import small_config


@pytest.fixture(scope="module")
def shard_files(model_factory, corpus_files, tmp_path_factory):
    """Shards of a 3-shard run, a 2-shard run, a 3-shard run with another batch plan, and the
    whole run, of one tiny model and corpus."""
    folder = tmp_path_factory.mktemp("shards")
    model = model_factory("llama")

    def run(name: str, **options):
        return collect(small_config(model, corpus_files, folder / f"{name}.h5", **{"batch_tokens": 64, **options}))

    return {
        "whole": run("whole"),
        **{f"s{i}": run(f"s{i}", shard=f"{i}/3") for i in range(3)},
        "two0": run("two0", shard="0/2"),
        "plan1": run("plan1", shard="1/3", batch_tokens=128),
        "k3": run("k3", shard="1/3", k=3),
        "layer0": run("layer0", layers=[0]),
        "layer1_0": run("layer1_0", layers=[1], shard="0/2"),
        "layer1_1": run("layer1_1", layers=[1], shard="1/2"),
    }


def merge(*paths, out) -> int:
    return main(["merge", *map(str, paths), "--out", str(out)])


@pytest.mark.parametrize("inputs, message", [
    (("s0", "s0", "s1", "s2"), "is given twice"),  # counts would double, documents appear twice
    (("s0", "s1"), "shard 2/3 missing"),
    (("s0", "two0", "s2"), "one of 3 shards"),
    (("whole", "s0"), "is not a shard"),
    (("s0", "plan1", "s2"), "batch_tokens=128"),  # another batch plan: shards would overlap
    (("s0", "k3", "s2"), "k=3"),
    (("whole", "layer1_0", "layer1_1"), "both hold layer 1"),
    (("layer0", "layer1_0"), "shard 1/2 missing"),
], ids=["same-file-twice", "incomplete", "shard-counts-differ", "not-a-shard", "other-batch-plan", "other-k",
        "overlapping-layers", "incomplete-layer-group"])
def test_merge_refuses_anything_but_one_complete_set_of_shards(inputs, message, shard_files, tmp_path, capsys):
    out = tmp_path / "merged.h5"
    assert merge(*(shard_files[name] for name in inputs), out=out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gluscope: error: ") and message in err, err
    assert not out.exists()


def test_merge_refuses_a_copy_of_a_shard_under_another_name(shard_files, tmp_path, capsys):
    copy = tmp_path / "copy-of-s1.h5"
    shutil.copy(shard_files["s1"], copy)
    assert merge(shard_files["s0"], shard_files["s1"], copy, shard_files["s2"], out=tmp_path / "m.h5") == 2
    assert "are both shard 1/3" in capsys.readouterr().err


@pytest.mark.parametrize("inputs", [("s2", "s0", "s1"), ("layer1_1", "layer0", "layer1_0")],
                         ids=["shards-in-any-order", "layer-groups-with-shards"])
def test_merge_equals_the_whole_run(inputs, shard_files, tmp_path, monkeypatch):
    import mkdocs_gluscope.merge

    monkeypatch.setattr(mkdocs_gluscope.merge, "NEURON_BLOCK", 16)  # stream 48 neurons in 3 blocks
    out = tmp_path / "merged.h5"
    assert merge(*(shard_files[name] for name in inputs), out=out) == 0
    with h5py.File(shard_files["whole"]) as a, h5py.File(out) as b:
        assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
        for name in ("stats/count", "stats/nonfinite", "stats/min", "stats/max", "top/value", "top/doc",
                     "top/pos", "top/gate", "top/in"):
            assert np.array_equal(a[name][...], b[name][...], equal_nan=a[name].dtype.kind == "f"), name
        np.testing.assert_allclose(a["stats/sum"][...], b["stats/sum"][...], rtol=1e-6, atol=1e-6)
        assert "shard" not in b.attrs and b.attrs["merged_shards"] == 3
        assert list(b.attrs["layers"]) == [0, 1]
        for name in ("flipped", "cos_gate_in"):
            assert np.array_equal(a["weights"][name][...], b["weights"][name][...])
    with h5py.File(shard_files["s0"]) as f, h5py.File(shard_files["whole"]) as whole:
        assert f.attrs["shard"] == "0/3" and 0 < f.attrs["n_tokens"] < whole.attrs["n_tokens"]
