"""The file format: what the writer writes reads back exactly, through plain h5py too."""

from __future__ import annotations

import h5py
import numpy as np

from mkdocs_gluscope.store import ActivationsFile, ActivationsWriter


def test_parallel_compressed_chunks_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    L, N, k, W = 2, 21, 3, 5  # 21 neurons: the last chunk of 8 is partial
    arrays = []
    with ActivationsWriter(tmp_path / "f.h5", n_layers=L, d_mlp=N, k=k, context_before=3, context_after=1) as w:
        w.write_corpus(np.arange(10), np.array([0, 4, 10]), [f"t{i}" for i in range(10)])
        for layer in range(L):
            gate = rng.normal(size=(N, 4, 4, k, W)).astype(np.float16)
            gate[0, 0, 0, 0, :2] = np.nan
            layer_arrays = {
                # counts add up to at most n_tokens = 8, as the reader checks
                "count": rng.integers(0, 3, (N, 4)), "nonfinite": rng.integers(0, 3, (N, 5)), "sum": rng.normal(size=(N, 4, 4)),
                "min": rng.normal(size=(N, 4, 4)).astype(np.float32), "max": rng.normal(size=(N, 4, 4)).astype(np.float32),
                "top_value": rng.normal(size=(N, 4, 4, k)).astype(np.float32),
                "top_doc": rng.integers(-1, 2, (N, 4, 4, k)).astype(np.int32),
                "top_pos": rng.integers(0, 4, (N, 4, 4, k)).astype(np.int32),
                "top_gate": gate, "top_in": -gate,
            }
            w.write_layer(layer, layer_arrays)
            arrays.append(layer_arrays)
        w.write_weights({"flipped": np.zeros((L, N), bool), "cos_gate_in": np.zeros((L, N)),
                         "cos_gate_out": np.zeros((L, N)), "cos_in_out": np.zeros((L, N))})
        w.close(n_tokens=8)
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["top/gate"].compression == "gzip" and f["top/gate"].shuffle
        for layer, expected in enumerate(arrays):
            np.testing.assert_array_equal(f["stats/nonfinite"][layer], expected["nonfinite"])
            for name in ("value", "doc", "pos", "gate", "in"):
                np.testing.assert_array_equal(f["top"][name][layer], expected["top_" + name])
    with ActivationsFile(tmp_path / "f.h5") as f:
        n = f.neuron(1, 20)
        np.testing.assert_array_equal(n.top_gate, arrays[1]["top_gate"][20].astype(np.float32))
        assert f.document(1).tolist() == [4, 5, 6, 7, 8, 9]


def test_a_failed_write_leaves_no_file(tmp_path):
    try:
        with ActivationsWriter(tmp_path / "g.h5", n_layers=1, d_mlp=2, k=1, context_before=0, context_after=0):
            raise RuntimeError("the run broke")
    except RuntimeError:
        pass
    assert not (tmp_path / "g.h5").exists() and not (tmp_path / "g.h5.tmp").exists()
