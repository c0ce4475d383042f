"""``gluscope export``: the activations file as a Hugging Face dataset that ``load_dataset`` reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile
from synthetic import write_synthetic


def test_export_round_trips_through_load_dataset(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    path = write_synthetic(tmp_path / "act.h5", layers=2, d_mlp=5, k=4, layer_ids=[3, 7],
                           model="/home/alice/models/SmolLM2")
    with h5py.File(path, "a") as f:  # documents of a source dataset, as collect records them
        f["corpus"].create_dataset("source_index", data=np.arange(f.attrs["n_docs"], dtype=np.int64) * 10 + 5)
    assert main(["export", str(path), "--out", str(tmp_path / "ds")]) == 0
    table = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(table) == 10
    # The paper's columns, then ours.
    for case in CASES:
        assert f"{case}_freq" in table.column_names
        for hook in HOOKS:
            for suffix in ("mean", "max_values", "max_indices", "max_docs", "max_positions", "min", "max"):
                assert f"{case}_{hook}_{suffix}" in table.column_names
    row = table[6]  # layer 7, neuron 1
    with ActivationsFile(path) as f:
        n = f.neuron(7, 1, windows=False)
    assert (row["layer"], row["neuron"]) == (7, 1)
    assert row["gate-_in-_freq"] == pytest.approx(n.frequency[3])
    assert row["gate+_in-_hook_pre_mean"] == pytest.approx(n.mean[1, 2])
    assert row["gate+_in+_hook_post_max_values"] == pytest.approx(n.top_value[0, 0].tolist())
    assert row["gate+_in+_hook_post_max_docs"] == n.top_doc[0, 0].tolist()
    assert row["gate+_in+_hook_post_max_indices"] == (n.top_doc[0, 0] * 10 + 5).tolist()  # rows of the source
    assert row["gate-_in+_swish_max_positions"] == n.top_pos[2, 3].tolist()
    assert row["flipped"] == n.flipped and row["cos_gate_in"] == pytest.approx(n.cos_gate_in)
    # The distributions and vocabulary projections the file has.
    assert row["gate-_in-_hook_post_hist"] == n.hist[3, 0].tolist()
    assert sum(row["gate+_in-_swish_hist"]) == n.count[1]
    assert row["vocab_in_bottom_tokens"] == n.vocab_token[2, 1].tolist()
    assert row["vocab_out_top_scores"] == pytest.approx(n.vocab_score[0, 0].tolist())
    card = (tmp_path / "ds" / "README.md").read_text(encoding="utf-8")
    assert "SmolLM2" in card and "/home/alice" not in card  # local paths named by their last part
    assert "gluscope: wrote" in capsys.readouterr().out


def test_export_refuses_a_folder_that_holds_files(tmp_path, capsys):
    pytest.importorskip("datasets")
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=2)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    assert main(["export", str(path), "--out", str(tmp_path / "ds")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


def test_export_without_datasets_names_the_extra(tmp_path):
    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=2)
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'datasets':
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from mkdocs_gluscope.cli import main
        sys.exit(main(['export', {str(path)!r}, '--out', {str(tmp_path / 'ds')!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gluscope: error: gluscope export needs the [collect] extra (the datasets package is missing): "
        "pip install 'gluscope[collect]'"]
