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
        distributions = [f"{group}/{part}" for group in ("samples", "bands")
                         for part in ("doc", "pos", "value", "gate", "in")]
        for name in ("stats/count", "stats/nonfinite", "stats/min", "stats/max", "top/value", "top/doc",
                     "top/pos", "top/gate", "top/in", "stats/hist", "stats/density", "vocab/token", "vocab/score",
                     *distributions):
            assert np.array_equal(a[name][...], b[name][...], equal_nan=a[name].dtype.kind == "f"), name
        np.testing.assert_allclose(a["stats/sum"][...], b["stats/sum"][...], rtol=1e-6, atol=1e-6)
        assert "shard" not in b.attrs and b.attrs["merged_shards"] == 3
        assert list(b.attrs["layers"]) == [0, 1]
        for name in ("flipped", "cos_gate_in"):
            assert np.array_equal(a["weights"][name][...], b["weights"][name][...])
    with h5py.File(shard_files["s0"]) as f, h5py.File(shard_files["whole"]) as whole:
        assert f.attrs["shard"] == "0/3" and 0 < f.attrs["n_tokens"] < whole.attrs["n_tokens"]


# -- distributions: stats/hist, stats/density, samples/, bands/, vocab/ ------------------------------------
# Small files built here from one "world" of activations (every position's gate and in for every
# neuron), so that each file's statistics are those of its documents, and a merge of shards can be
# compared with the file of their union.

from mkdocs_gluscope.distributions import (BAND_OF_BIN, DENSITY_EDGES, N_BANDS, N_BINS, N_DENSITY, document_pieces,
                                           hist_bin, position_priority)
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsWriter

BEFORE, AFTER, TOP_K, SAMPLES_S, BANDS_S, VOCAB_K, SEED = 2, 1, 2, 3, 2, 3, 1234
#: Documents 1-3 are pieces of one source row, 5-6 of another: piece numbers matter to the priority.
SOURCE_INDEX = np.array([0, 7, 7, 7, 2, 9, 9, 4, 5])


def make_world(seed: int = 0, dense_rows: int = 2, neurons: int = 10, expert_neurons: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 13, len(SOURCE_INDEX))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(1, 30, offsets[-1]).astype(np.int32)
    tokens[offsets[:-1]] = 0  # BOS

    def neurons_of(rows: int, n: int) -> dict:
        gate = rng.normal(size=(rows, n, offsets[-1])).astype(np.float32) * 3
        in_ = rng.normal(size=(rows, n, offsets[-1])).astype(np.float32) * 3
        gate[:, 0::3] = np.abs(gate[:, 0::3])  # no gate- position at all: empty gate- cases
        in_[:, 1::3] += 7  # in- is rare: lists that are not full
        gate[:, :, 3::5] = 0  # exact zeros: positions in no case
        return {"gate": gate, "in": in_,
                "vocab_token": rng.integers(0, 30, (rows, n, 3, 2, VOCAB_K)).astype(np.int32),
                "vocab_score": rng.normal(size=(rows, n, 3, 2, VOCAB_K)).astype(np.float32),
                "weights": {"flipped": rng.random((rows, n)) < 0.5,
                            **{name: rng.random((rows, n)).astype(np.float32)
                               for name in ("cos_gate_in", "cos_gate_out", "cos_in_out")}}}

    return {"offsets": offsets, "tokens": tokens, "dense": neurons_of(dense_rows, neurons),
            "experts": neurons_of(2, expert_neurons), "expert_layer": dense_rows}


def _row_stats(world: dict, part: dict, row: int, docs: set[int], distributions: bool) -> dict:
    """One row's statistics over the counted positions (BOS excluded) of documents ``docs``."""
    offsets = world["offsets"]
    doc_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pos_of = np.arange(offsets[-1]) - offsets[doc_of]
    counted = np.isin(doc_of, sorted(docs)) & (pos_of >= 1)
    gate, in_ = part["gate"][row].astype(np.float64), part["in"][row].astype(np.float64)  # [N, T]
    swish = gate / (1 + np.exp(-gate))
    hooks = np.stack([swish * in_, in_, gate, swish], axis=1).astype(np.float32)  # [N, H, T]
    case = np.where((gate != 0) & (in_ != 0), 2 * (gate < 0) + (in_ < 0), -1)  # [N, T]
    n, c_, h_, w = gate.shape[0], len(CASES), len(HOOKS), BEFORE + 1 + AFTER
    priority = position_priority(SEED, SOURCE_INDEX[doc_of], document_pieces(SOURCE_INDEX)[doc_of], pos_of)

    def window(values: np.ndarray, neuron: int, p: int) -> np.ndarray:
        d = doc_of[p]
        t = p + np.arange(-BEFORE, AFTER + 1)
        inside = (t >= offsets[d]) & (t < offsets[d + 1])
        return np.where(inside, values[neuron, np.clip(t, 0, offsets[-1] - 1)], np.nan)

    out = {"count": np.zeros((n, c_), np.int64), "nonfinite": np.zeros((n, c_ + 1), np.int64),
           "sum": np.zeros((n, c_, h_)), "min": np.full((n, c_, h_), np.nan, np.float32),
           "max": np.full((n, c_, h_), np.nan, np.float32),
           "top_value": np.full((n, c_, h_, TOP_K), np.nan, np.float32), "top_doc": np.full((n, c_, h_, TOP_K), -1, np.int32),
           "top_pos": np.full((n, c_, h_, TOP_K), -1, np.int32),
           "top_gate": np.full((n, c_, h_, TOP_K, w), np.nan, np.float32),
           "top_in": np.full((n, c_, h_, TOP_K, w), np.nan, np.float32)}
    if distributions:
        out.update(hist=np.zeros((n, c_, h_, N_BINS), np.int64), density=np.zeros((n, N_DENSITY, N_DENSITY), np.int64))
        for group, extra in (("samples", (SAMPLES_S,)), ("bands", (N_BANDS, BANDS_S))):
            out[f"{group}_doc"] = np.full((n, c_) + extra, -1, np.int32)
            out[f"{group}_pos"] = np.full((n, c_) + extra, -1, np.int32)
            out[f"{group}_value"] = np.full((n, c_, h_) + extra, np.nan, np.float32)
            for name in ("gate", "in"):
                out[f"{group}_{name}"] = np.full((n, c_) + extra + (w,), np.nan, np.float32)
    for neuron in range(n):
        for c in range(c_):
            where = np.flatnonzero(counted & (case[neuron] == c))
            out["count"][neuron, c] = len(where)
            if not len(where):
                continue
            values = hooks[neuron][:, where]
            out["sum"][neuron, c] = values.astype(np.float64).sum(axis=1)
            out["min"][neuron, c], out["max"][neuron, c] = values.min(axis=1), values.max(axis=1)
            for h in range(h_):
                # Each document's most extreme position (earliest on ties), documents by |value| then index.
                best = {}
                for p in where:
                    if doc_of[p] not in best or abs(hooks[neuron, h, p]) > abs(hooks[neuron, h, best[doc_of[p]]]):
                        best[doc_of[p]] = p
                ranked = sorted(best.items(), key=lambda item: (-abs(hooks[neuron, h, item[1]]), item[0]))[:TOP_K]
                for j, (d, p) in enumerate(ranked):
                    out["top_value"][neuron, c, h, j] = hooks[neuron, h, p]
                    out["top_doc"][neuron, c, h, j], out["top_pos"][neuron, c, h, j] = d, pos_of[p]
                    out["top_gate"][neuron, c, h, j] = window(part["gate"][row], neuron, p)
                    out["top_in"][neuron, c, h, j] = window(part["in"][row], neuron, p)
            if not distributions:
                continue
            for h in range(h_):
                out["hist"][neuron, c, h] = np.bincount(hist_bin(np.abs(values[h])), minlength=N_BINS)
            cells = [np.searchsorted(DENSITY_EDGES, gate[neuron, where], "right") - 1,
                     np.searchsorted(DENSITY_EDGES, in_[neuron, where], "right") - 1]
            np.add.at(out["density"][neuron], tuple(cells), 1)
            ordered = sorted(where, key=lambda p: (priority[p], doc_of[p], pos_of[p]))
            band = BAND_OF_BIN[hist_bin(np.abs(hooks[neuron, 0]))]
            for group, lists in (("samples", [((), ordered[:SAMPLES_S])]),
                                 ("bands", [((r,), [p for p in ordered if band[p] == r][:BANDS_S])
                                            for r in range(N_BANDS)])):
                for index, chosen in lists:
                    for j, p in enumerate(chosen):
                        slot = (neuron, c) + index + (j,)
                        out[f"{group}_doc"][slot], out[f"{group}_pos"][slot] = doc_of[p], pos_of[p]
                        out[f"{group}_value"][(neuron, c, slice(None)) + index + (j,)] = hooks[neuron, :, p]
                        out[f"{group}_gate"][slot] = window(part["gate"][row], neuron, p)
                        out[f"{group}_in"][slot] = window(part["in"][row], neuron, p)
    return out


def write_world(path, world: dict, *, docs=None, layers=None, experts: bool = True, shard: str = "",
                distributions: bool = True, vocab: bool = True):
    """The file a run over documents ``docs`` (all by default) and model ``layers`` would write."""
    n_docs = len(world["offsets"]) - 1
    docs = set(range(n_docs)) if docs is None else set(docs)
    dense = world["dense"]
    layers = list(range(dense["gate"].shape[0])) if layers is None else list(layers)
    attrs = {"model": "world", "seed": SEED, "has_bos": True, "layers": layers,
             **({"shard": shard} if shard else {})}
    n_tokens = sum(int(world["offsets"][d + 1] - world["offsets"][d] - 1) for d in docs)
    with ActivationsWriter(path, n_layers=len(layers), d_mlp=dense["gate"].shape[1], k=TOP_K, context_before=BEFORE,
                           context_after=AFTER, window_dtype="float32", attrs=attrs,
                           samples=SAMPLES_S if distributions else 0, band_samples=BANDS_S) as writer:
        writer.write_corpus(world["tokens"], world["offsets"], [f"t{i}" for i in range(30)], source_index=SOURCE_INDEX)
        for out_row, layer in enumerate(layers):
            writer.write_layer(out_row, _row_stats(world, dense, layer, docs, distributions))
        writer.write_weights({name: value[layers] for name, value in dense["weights"].items()})
        if vocab:
            writer.write_vocab(dense["vocab_token"][layers], dense["vocab_score"][layers])
        if experts:
            part = world["experts"]
            rows = part["gate"].shape[0]
            writer.add_experts("experts", [world["expert_layer"]] * rows, list(range(rows)), [n_tokens] * rows,
                               part["gate"].shape[1])
            for row in range(rows):
                writer.write_neurons(row, 0, _row_stats(world, part, row, docs, distributions), group="experts")
            writer.write_weights(part["weights"], group="experts")
            if vocab:
                writer.write_vocab(part["vocab_token"], part["vocab_score"], group="experts")
        return writer.close(n_tokens=n_tokens)


SHARD_DOCS = ([0, 3, 4, 8], [1, 2, 5, 6, 7])  # a split source row's pieces in both shards


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    world = make_world()
    files = {"whole": write_world(folder / "whole.h5", world),
             "plain": write_world(folder / "plain.h5", world, distributions=False, vocab=False),
             "layer0": write_world(folder / "layer0.h5", world, layers=[0])}
    for i, docs in enumerate(SHARD_DOCS):
        files[f"s{i}"] = write_world(folder / f"s{i}.h5", world, docs=docs, shard=f"{i}/2")
        files[f"plain{i}"] = write_world(folder / f"plain{i}.h5", world, docs=docs, shard=f"{i}/2",
                                         distributions=False, vocab=False)
        files[f"layer1_{i}"] = write_world(folder / f"layer1_{i}.h5", world, docs=docs, layers=[1], shard=f"{i}/2",
                                           experts=False)
    return files


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found = {}
    f.visititems(lambda name, obj: found.setdefault(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same_file(expected, actual) -> None:
    with h5py.File(expected) as a, h5py.File(actual) as b:
        assert a.attrs["n_tokens"] == b.attrs["n_tokens"]
        assert sorted(_datasets(a)) == sorted(_datasets(b))
        for name, dataset in _datasets(a).items():
            x, y = dataset[...], b[name][...]
            if name.endswith("stats/sum"):
                np.testing.assert_allclose(x, y, rtol=1e-6)
            else:
                assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


@pytest.mark.parametrize("inputs, whole", [(("s1", "s0"), "whole"), (("plain0", "plain1"), "plain"),
                                           (("layer1_1", "layer0", "layer1_0"), "whole")],
                         ids=["shards", "without-distributions", "layer-groups-with-shards"])
def test_merge_of_shards_with_distributions_equals_the_file_of_their_union(inputs, whole, world_files, tmp_path,
                                                                          monkeypatch):
    import mkdocs_gluscope.merge

    monkeypatch.setattr(mkdocs_gluscope.merge, "NEURON_BLOCK", 8)  # 10 neurons in 2 blocks
    out = tmp_path / "merged.h5"
    assert merge(*(world_files[name] for name in inputs), out=out) == 0
    assert_same_file(world_files[whole], out)
    with h5py.File(out) as f:
        assert ("vocab" in f) == (whole == "whole") and ("samples" in f) == (whole == "whole")


def _brute_force_lists(shards, root: str, group: str, size: int) -> dict[str, np.ndarray]:
    """Every list's entries from every shard, sorted by priority recomputed from (doc, pos), the first ``size``."""
    parts = []
    for path in shards:
        with h5py.File(path) as f:
            source = f["corpus/source_index"][...]
            piece = document_pieces(source)
            g = f[root + group] if root else f[group]
            parts.append({name: g[name][...] for name in ("doc", "pos", "value", "gate", "in")})
    doc = np.concatenate([p["doc"] for p in parts], axis=-1)
    lists = {"doc": [], "pos": [], "value": [], "gate": [], "in": []}
    shape = doc.shape[:-1]
    for index in np.ndindex(shape):
        entries = []
        for p in parts:
            for j in range(p["doc"].shape[-1]):
                d = int(p["doc"][index + (j,)])
                if d >= 0:
                    pos = int(p["pos"][index + (j,)])
                    prio = int(position_priority(SEED, np.int64(source[d]), np.int64(piece[d]), np.int64(pos)))
                    value = p["value"][index[:3] + (slice(None),) + index[3:] + (j,)]
                    entries.append((prio, d, pos, value, p["gate"][index + (j,)], p["in"][index + (j,)]))
        entries.sort(key=lambda e: e[:3])
        lists["doc"].append([e[1] for e in entries[:size]] + [-1] * (size - len(entries[:size])))
        lists["pos"].append([e[2] for e in entries[:size]])
        lists["value"].append([e[3] for e in entries[:size]])
        lists["gate"].append([e[4] for e in entries[:size]])
        lists["in"].append([e[5] for e in entries[:size]])
    lists["index"] = list(np.ndindex(shape))
    return lists


@pytest.mark.parametrize("root", ["", "experts/"], ids=["dense", "experts"])
@pytest.mark.parametrize("group, size", [("samples", SAMPLES_S), ("bands", BANDS_S)])
def test_merged_samples_and_bands_are_the_lowest_priority_entries_of_all_shards(root, group, size, world_files,
                                                                                 tmp_path):
    out = tmp_path / "merged.h5"
    shards = [world_files["s0"], world_files["s1"]]
    assert merge(*shards, out=out) == 0
    expected = _brute_force_lists(shards, root, group, size)
    full = short = 0
    with h5py.File(out) as f:
        g = f[root + group]
        doc, pos, value, gate, in_ = (g[name][...] for name in ("doc", "pos", "value", "gate", "in"))
    for i, index in enumerate(expected["index"]):
        n = len(expected["pos"][i])
        assert list(doc[index]) == expected["doc"][i], index
        assert list(pos[index][:n]) == expected["pos"][i], index
        for j in range(n):
            assert np.array_equal(value[index[:3] + (slice(None),) + index[3:] + (j,)], expected["value"][i][j])
            assert np.array_equal(gate[index + (j,)], expected["gate"][i][j], equal_nan=True)
            assert np.array_equal(in_[index + (j,)], expected["in"][i][j], equal_nan=True)
        full += n == size
        short += 0 < n < size
    # The world has full lists, lists that are not full, and empty ones (gate- cases of neurons 0, 3, ...).
    assert full and short and (doc < 0).all(axis=-1).any()
    assert (doc[:, 0::3, 2:] < 0).all()  # neurons with gate > 0 everywhere have no gate- example


def test_merged_histograms_and_density_add(world_files, tmp_path):
    out = tmp_path / "merged.h5"
    assert merge(world_files["s0"], world_files["s1"], out=out) == 0
    with h5py.File(world_files["s0"]) as a, h5py.File(world_files["s1"]) as b, h5py.File(out) as m:
        for root in ("", "experts/"):
            for name in ("stats/hist", "stats/density"):
                assert np.array_equal(m[root + name][...], a[root + name][...] + b[root + name][...])
            assert (m[root + "stats/hist"][...].sum(axis=-1) == m[root + "stats/count"][...][..., None]).all()
        assert np.array_equal(m["stats/hist_edges"][...], a["stats/hist_edges"][...])
        assert m.attrs["samples"] == SAMPLES_S and m.attrs["band_samples"] == BANDS_S


@pytest.mark.parametrize("group", ["", "experts/"], ids=["dense", "experts"])
def test_merge_refuses_shards_with_different_vocab(group, world_files, tmp_path, capsys):
    changed = tmp_path / "s1.h5"
    shutil.copy(world_files["s1"], changed)
    with h5py.File(changed, "a") as f:
        f[group + "vocab/score"][0, 3, 1, 0, 2] += 1
    out = tmp_path / "merged.h5"
    assert merge(world_files["s0"], changed, out=out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"different {group}vocab/score" in err and "not shards of one run" in err, err
    assert not out.exists() and not (tmp_path / "merged.h5.tmp").exists()


@pytest.mark.parametrize("change, message", [("distributions", "has distributions (stats/hist, samples/, bands/) but"),
                                             ("samples", "samples=2")], ids=["with-and-without", "other-samples"])
def test_merge_refuses_mixing_files_with_and_without_distributions(change, message, world_files, tmp_path, capsys):
    other = world_files["plain1"] if change == "distributions" else tmp_path / "s1.h5"
    if change == "samples":
        shutil.copy(world_files["s1"], other)
        with h5py.File(other, "a") as f:  # a shard that kept 2 samples per case, consistent in itself
            f.attrs["samples"] = 2
            for root in ("", "experts/"):
                for name, axis in (("doc", 3), ("pos", 3), ("value", 4), ("gate", 3), ("in", 3)):
                    kept = np.take(f[f"{root}samples/{name}"][...], [0, 1], axis=axis)
                    del f[f"{root}samples/{name}"]
                    f.create_dataset(f"{root}samples/{name}", data=kept)
    assert merge(world_files["s0"], other, out=tmp_path / "m.h5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
