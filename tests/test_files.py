"""A file from a stranger: nothing outside it is read, anything damaged is one line, a good file passes.

Every way a file can reach a reader is tried: the MkDocs plugin in both layouts, ``gluscope pages``,
``info`` and ``export``. Files are small synthetic ones (tests/synthetic.py) changed with h5py, and
real tiny collections for the files ``gluscope collect`` writes today.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from mkdocs.exceptions import Abort

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.store import ActivationsFile, FormatError
from sites import build_site
from synthetic import DEFAULT_VOCAB, write_synthetic

SECRET = "GLUSCOPE-PLANTED-SECRET-7f3a"
#: The dense neurons of the base file (the light layout does not take expert neurons yet).
DENSE = ["0.*", "1.*"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """2 layers x 4 neurons with distributions and vocabulary projections, and an expert group
    (layer 5, experts 0 and 1) built from the same arrays: every part of the format at once."""
    path = write_synthetic(tmp_path_factory.mktemp("base") / "act.h5", layers=2, d_mlp=4, k=3, before=2, after=1,
                           titles=[f"{1790 + d} · President {d}" for d in range(12)])
    with h5py.File(path, "a") as f:
        g = f.create_group("experts")
        for name in ("stats", "top", "weights", "samples", "bands", "vocab"):
            f.copy(f[name], g, name=name)
        g["layer"] = np.array([5, 5], np.int32)
        g["expert"] = np.array([0, 1], np.int32)
        g["routed"] = np.array([f.attrs["n_tokens"]] * 2, np.int64)
        f.attrs["expert_layers"] = [5]
        f.attrs["n_experts_per_layer"] = [2]
        # Effects (dense layers): every position's final-norm scale, every top-k example's next-token score.
        rng = np.random.default_rng(0)
        f["corpus"].create_dataset("final_scale", data=rng.uniform(0.5, 2, f["corpus/tokens"].shape).astype(np.float32))
        f["top"].create_dataset("next_score", data=rng.normal(size=f["top/value"].shape).astype(np.float32))
        f.attrs["effect_norm"] = "synthetic"
    add_synthetic_related(path)
    with ActivationsFile(path) as f:  # the unchanged file passes, every neuron of it
        for layer, neuron in np.ndindex(2, 4):
            f.neuron(layer, neuron)
        for expert in (0, 1):
            f.neuron(5, 0, expert=expert)
    return path


def add_synthetic_related(path: Path) -> None:
    """Both parts of ``related/``: by activation computed from the file, by weights made up (layer 0
    feeds layer 1; the last layer feeds none)."""
    from mkdocs_gluscope.related import RELATED_K, activation_part, store_related

    with ActivationsFile(path) as f:
        arrays = activation_part(f)
        L, N = f.n_layers, f.d_mlp
    K = RELATED_K
    neuron = np.broadcast_to(np.arange(K) % N, (L, N, 2, 2, K)).astype(np.int32).copy()
    layer = np.where(np.arange(L)[:, None, None, None, None] < L - 1, 1, -1) * np.ones_like(neuron)
    arrays.update(feeds_layer=layer.astype(np.int32), feeds_neuron=np.where(layer >= 0, neuron, -1).astype(np.int32),
                  feeds_score=np.where(layer >= 0, 1.0, np.nan).astype(np.float32),
                  alike_neuron=np.full((L, N, 2, K), -1, np.int32), alike_score=np.full((L, N, 2, K), np.nan, np.float32))
    arrays["alike_neuron"][..., 0] = (np.arange(N)[None, :, None] + 1) % N
    arrays["alike_score"][..., 0] = 0.5
    store_related(path, arrays, {"related_k": K, "related_weights": "synthetic"})


def cli(*args: str, capsys) -> tuple[int, str]:
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def build_failure(root: Path, plugin: dict, caplog) -> str:
    """The one error line a failing ``mkdocs build`` logs (MkDocs reports a PluginError so, no traceback)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(Abort):
        build_site(root, plugin)
    # (an error while a page is written, MkDocs first names the page itself: "Error building page ...")
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and not r.getMessage().startswith("Error building page")]
    assert len(errors) == 1 and "\n" not in errors[0] and errors[0].startswith("gluscope: "), errors
    return errors[0]


def one_error_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gluscope: error: ") and "Traceback" not in text, text
    return lines[0]


def site_bytes(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


# -- nothing outside the file -----------------------------------------------------------------------
def outside_vocab(folder: Path) -> Path:
    """An HDF5 file whose vocabulary is the planted secret: what a link or a virtual dataset would read."""
    with h5py.File(folder / "outside.h5", "w") as o:
        o["vocab"] = np.array([SECRET] * len(DEFAULT_VOCAB), dtype=h5py.string_dtype())
    return folder / "outside.h5"


def external_storage(f: h5py.File, folder: Path) -> None:
    (folder / "notes.txt").write_text(SECRET * len(DEFAULT_VOCAB))  # a local file, say a CI token
    del f["corpus/vocab"]
    f.create_dataset("corpus/vocab", shape=(len(DEFAULT_VOCAB),), dtype=f"S{len(SECRET)}",
                     external=[(str(folder / "notes.txt"), 0, len(SECRET) * len(DEFAULT_VOCAB))])


def external_link(f: h5py.File, folder: Path) -> None:
    del f["corpus/vocab"]
    f["corpus/vocab"] = h5py.ExternalLink(str(outside_vocab(folder)), "/vocab")


def soft_link_out(f: h5py.File, folder: Path) -> None:
    del f["corpus/vocab"]
    f["corpus/elsewhere"] = h5py.ExternalLink(str(outside_vocab(folder)), "/")
    f["corpus/vocab"] = h5py.SoftLink("/corpus/elsewhere/vocab")


def dangling_soft_link(f: h5py.File, folder: Path) -> None:
    del f["corpus/vocab"]
    f["corpus/vocab"] = h5py.SoftLink("/nowhere/vocab")


def virtual_dataset(f: h5py.File, folder: Path) -> None:
    del f["corpus/vocab"]
    layout = h5py.VirtualLayout(shape=(len(DEFAULT_VOCAB),), dtype=h5py.string_dtype())
    layout[:] = h5py.VirtualSource(str(outside_vocab(folder)), "vocab", shape=(len(DEFAULT_VOCAB),))
    f.create_virtual_dataset("corpus/vocab", layout)


OUTSIDE = {
    "external-storage": (external_storage, "corpus/vocab: stored in an outside file"),
    "external-link": (external_link, "corpus/vocab: an external link to '/vocab'"),
    "soft-link-out": (soft_link_out, "corpus/elsewhere: an external link"),
    "dangling-soft-link": (dangling_soft_link, "corpus/vocab: a soft link to '/nowhere/vocab', which is not in the file"),
    "virtual-dataset": (virtual_dataset, "corpus/vocab: a virtual dataset"),
}


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_a_file_that_would_read_outside_itself_is_refused_everywhere(kind, base, tmp_path, capsys, caplog):
    change, message = OUTSIDE[kind]
    path = tmp_path / "data" / "act.h5"
    path.parent.mkdir()
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        change(f, tmp_path)
    where = repr(str(path))
    for layout in ("full", "light"):
        error = build_failure(tmp_path / layout, {"activations": str(path), "neurons": DENSE, "layout": layout,
                                                  "workers": 1}, caplog)
        assert message in error and where in error, error
    for command in (("pages", path, "--neurons", *DENSE, "--out", tmp_path / "md"), ("info", path), ("pick", path),
                    ("merge", path, base, "--out", tmp_path / "merged.h5")):
        code, text = cli(*command, capsys=capsys)
        assert code == 2 and message in one_error_line(text), command
    pytest.importorskip("datasets")
    code, text = cli("export", path, "--out", tmp_path / "dataset", capsys=capsys)
    assert code == 2 and message in one_error_line(text)
    built = site_bytes(tmp_path / "full", tmp_path / "light", tmp_path / "md", tmp_path / "dataset")
    assert SECRET.encode() not in built and SECRET not in caplog.text
    if kind != "dangling-soft-link":  # the control: the planted bytes are there to be read
        assert SECRET.encode() in b"".join(p.read_bytes() for p in tmp_path.glob("*.*") if p.is_file())


# -- damaged or inconsistent files ------------------------------------------------------------------
def rewrite(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def edit(name: str, change: Callable[[np.ndarray], None]) -> Callable[[h5py.File], None]:
    def apply(f: h5py.File) -> None:
        data = f[name][...]
        change(data)
        f[name][...] = data
    return apply


def corrupt_chunk(name: str) -> Callable[[h5py.File], None]:
    """Overwrite the compressed bytes of the dataset's first chunk (a bad sector, a broken download)."""
    def apply(f: h5py.File) -> None:
        info = f[name].id.get_chunk_info(0)
        f.attrs["_corrupt_at"] = (info.byte_offset + 4, info.size - 8)
    return apply


def _set(data: np.ndarray, index: tuple, value) -> None:
    data[index] = value


# (change, the error line's telling part, found: when the file opens or when the neuron is read)
DAMAGED: dict[str, tuple[Callable[[h5py.File], None], str, str]] = {
    "no-n_tokens": (lambda f: f.attrs.__delitem__("n_tokens"),
                    "attribute n_tokens: missing; expected the number of counted positions", "open"),
    "zero-n_tokens": (lambda f: f.attrs.__setitem__("n_tokens", 0), "attribute n_tokens: 0; expected", "open"),
    "k-disagrees": (lambda f: f.attrs.__setitem__("k", 5),
                    "top/value: shape (2, 4, 4, 4, 3); expected (2, 4, 4, 4, 5)", "open"),
    "window-disagrees": (lambda f: f.attrs.__setitem__("context_before", 7), "top/gate: shape", "open"),
    "count-for-fewer-neurons": (lambda f: rewrite(f, "stats/count", f["stats/count"][:, :3]),
                                "neurons = 3 from stats/count", "open"),
    "token-beyond-vocab": (edit("corpus/tokens", lambda t: _set(t, 5, len(DEFAULT_VOCAB))),
                           f"corpus/tokens: token id {len(DEFAULT_VOCAB)} at position 5", "open"),
    "no-top-doc": (lambda f: f.__delitem__("top/doc"), "top/doc: missing; expected int32", "open"),
    "doc-as-float": (lambda f: rewrite(f, "top/doc", f["top/doc"][...].astype(np.float32)),
                     "top/doc: dtype float32; expected int32", "open"),
    "vocab-as-bytes": (lambda f: rewrite(f, "corpus/vocab", np.array(DEFAULT_VOCAB, dtype="S8")),
                       "corpus/vocab: dtype |S8; expected variable-length UTF-8 strings", "open"),
    "offsets-go-back": (edit("corpus/doc_offsets", lambda o: _set(o, 3, o[1])),
                        "corpus/doc_offsets: goes back at document 2", "open"),
    "offsets-short": (edit("corpus/doc_offsets", lambda o: _set(o, -1, o[-1] - 1)),
                      "corpus/doc_offsets: runs from 0 to", "open"),
    "cases-reordered": (lambda f: f.attrs.__setitem__("cases", np.array(["gate-_in-", "gate+_in+", "gate+_in-", "gate-_in+"],
                                                                        dtype=h5py.string_dtype())),
                        "attribute cases:", "open"),
    "layers-attribute": (lambda f: f.attrs.__setitem__("layers", [0]), "attribute layers: [0]; expected 2", "open"),
    "half-the-distributions": (lambda f: f.__delitem__("samples/gate"),
                               "samples/gate: missing while stats/hist is there", "open"),
    "half-the-vocab": (lambda f: f.__delitem__("vocab/score"), "vocab/score: missing while vocab/token is there", "open"),
    "edges-one-short": (lambda f: rewrite(f, "stats/hist_edges", f["stats/hist_edges"][:-1]),
                        "stats/hist_edges: shape (22,); expected (23,)", "open"),
    "titles-one-short": (lambda f: rewrite(f, "corpus/doc_title", np.array(["t"] * 11, dtype=h5py.string_dtype())),
                         "corpus/doc_title: shape (11,); expected (12,)", "open"),
    "edges-backwards": (edit("stats/hist_edges", lambda e: e.__setitem__(slice(None), e[::-1].copy())),
                        "stats/hist_edges:", "open"),
    "expert-rows-mismatch": (lambda f: rewrite(f, "experts/routed", np.array([1, 1, 1], np.int64)),
                             "experts/routed: shape (3,); expected (2,)", "open"),
    "expert-in-a-dense-layer": (edit("experts/layer", lambda x: _set(x, 0, 1)), "experts/layer: row 0 is layer 1", "open"),
    "too-few-experts": (lambda f: f.attrs.__setitem__("n_experts_per_layer", [1]),
                        "experts/expert: expert 1 at layer 5", "open"),
    "half-the-effects": (lambda f: f.__delitem__("top/next_score"),
                         "top/next_score: missing while corpus/final_scale is there", "open"),
    "final-scale-one-short": (lambda f: rewrite(f, "corpus/final_scale", f["corpus/final_scale"][:-1]),
                              "corpus/final_scale: shape", "open"),
    "half-a-related-part": (lambda f: f.__delitem__("related/alike_score"),
                            "related/alike_score: missing while related/feeds_layer is there", "open"),
    "related-lists-disagree": (lambda f: rewrite(f, "related/shared_docs", f["related/shared_docs"][..., :-1]),
                               "related/shared_docs: shape", "open"),
    "related_k-disagrees": (lambda f: f.attrs.__setitem__("related_k", 3), "attribute related_k: 3; expected 10", "open"),
    "related-case-as-int32": (lambda f: rewrite(f, "related/shared_case", f["related/shared_case"][...].astype(np.int32)),
                              "related/shared_case: dtype int32; expected int8", "open"),
    "related-neuron-beyond": (edit("related/feeds_neuron", lambda x: _set(x, (0, 2, 0, 0, 0), 99)),
                              "related/feeds_neuron of neuron 0.2: 99; expected -1 (none) or 0..3", "read"),
    "related-layer-not-in-file": (edit("related/shared_layer", lambda x: _set(x, (1, 1, 0, 0), 7)),
                                  "related/shared_layer of neuron 1.1: 7; expected -1 (none) or a dense layer", "read"),
    "truncated": (None, "is not an HDF5 file, or a damaged one (", "open"),
    "corrupt-chunk": (corrupt_chunk("stats/count"), "stats/count", "open+read"),
    "doc-beyond-the-corpus": (edit("top/doc", lambda d: _set(d, (0, 0, 0, 0, 0), 99)),
                              "top/doc of neuron 0.0: document 99; expected -1 (an empty slot) or a document 0..", "read"),
    "pos-beyond-the-document": (edit("top/pos", lambda p: _set(p, (0, 0, 0, 0, 0), 500)),
                                "top/pos of neuron 0.0: position 500 in document", "read"),
    "sample-beyond-the-corpus": (edit("samples/doc", lambda d: _set(d, (1, 2, 0, 0), -7)),
                                 "samples/doc of neuron 1.2: document -7", "read"),
    "counts-beyond-n_tokens": (edit("stats/count", lambda c: _set(c, (0, 1, 0), 10**6)),
                               "stats/count of neuron 0.1:", "read"),
    "vocab-id-beyond": (edit("vocab/token", lambda t: _set(t, (1, 3, 0, 0, 0), 10**5)),
                        "vocab/token of neuron 1.3: token id 100000", "read"),
}


def damage(base: Path, path: Path, kind: str) -> None:
    change = DAMAGED[kind][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(base, path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) * 2 // 3])
        return
    with h5py.File(path, "a") as f:
        change(f)
        corrupt = f.attrs.pop("_corrupt_at", None)
    if corrupt is not None:
        offset, size = (int(x) for x in corrupt)
        with open(path, "r+b") as raw:
            raw.seek(offset)
            raw.write(b"\xff" * size)


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_file_is_one_line_in_both_layouts_pages_and_info(kind, base, tmp_path, capsys, caplog):
    path = tmp_path / "data" / "act.h5"
    damage(base, path, kind)
    message, found = DAMAGED[kind][1:]
    if found == "open":  # pick reads the whole model's statistics: it meets what opening finds
        code, text = cli("pick", path, capsys=capsys)
        assert code == 2 and message in one_error_line(text)
    for layout in ("full", "light"):
        error = build_failure(tmp_path / layout, {"activations": str(path), "neurons": DENSE, "layout": layout,
                                                  "workers": 1}, caplog)
        assert message in error and repr(str(path)) in error, error
    code, text = cli("pages", path, "--neurons", *DENSE, "--out", tmp_path / "md", capsys=capsys)
    assert code == 2 and message in one_error_line(text)
    code, text = cli("info", path, capsys=capsys)
    if found == "read":  # info reads no neuron's examples: the file opens, and only those are wrong
        assert code == 0, text
    else:
        assert code == 2 and message in one_error_line(text)


def test_a_corrupt_chunk_of_windows_names_the_neuron_being_written(base, tmp_path, capsys, caplog):
    """The windows are read only when a page is written: by the light layout's page writers (forked
    processes), the full layout's on_post_page, and gluscope pages."""
    path = tmp_path / "data" / "act.h5"
    path.parent.mkdir()
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        corrupt_chunk("top/gate")(f)
        offset, size = (int(x) for x in f.attrs.pop("_corrupt_at"))
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(b"\x00" * size)
    error = build_failure(tmp_path, {"activations": str(path), "neurons": DENSE, "layout": "light", "workers": 2},
                          caplog)
    # The chunk holds neurons 0.0-0.3; the first worker to reach one of them reports it.
    damaged = re.compile(r"top/gate of neuron 0\.[0-3] cannot be read \(.*\); the file is damaged$")
    assert damaged.search(error), error
    error = build_failure(tmp_path / "full", {"activations": str(path), "neurons": DENSE, "layout": "full"}, caplog)
    assert damaged.search(error), error
    code, text = cli("pages", path, "--neurons", *DENSE, "--out", tmp_path / "md", capsys=capsys)
    assert code == 2 and damaged.search(one_error_line(text))


def test_merge_and_export_name_a_damaged_block(base, tmp_path, capsys):
    pytest.importorskip("datasets")
    path = tmp_path / "act.h5"
    damage(base, path, "doc-beyond-the-corpus")
    code, text = cli("export", path, "--out", tmp_path / "dataset", capsys=capsys)
    assert code == 2 and "top/doc of layer 0: document 99" in one_error_line(text)
    assert not (tmp_path / "dataset").exists()
    shards = [tmp_path / "s0.h5", path]  # two shards of one run, the second damaged
    shutil.copy(base, shards[0])
    for i, shard in enumerate(shards):
        with h5py.File(shard, "a") as f:
            f.attrs["shard"] = f"{i}/2"
    code, text = cli("merge", *shards, "--out", tmp_path / "m.h5", capsys=capsys)
    assert code == 2 and "top/doc of layer row 0, neurons 0..3: document 99" in one_error_line(text)


def test_the_attributes_info_prints_cannot_act_on_the_terminal(base, tmp_path, capsys):
    path = tmp_path / "act.h5"
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        f.attrs["model"] = "evil\x1b]0;owned\x07\x1b[2J\nfake: line\u202eesrever"
    code, text = cli("info", path, capsys=capsys)
    assert code == 0 and "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    model = next(line for line in text.splitlines() if line.strip().startswith("model:"))
    assert model.endswith(r"evil\x1b]0;owned\x07\x1b[2J\nfake: line\u202eesrever")
    assert not any(line.startswith("fake") for line in text.splitlines())


def test_opening_reads_no_neurons_data(base, tmp_path):
    """The whole-file check reads metadata and the corpus, never the per-neuron arrays (bench/open_check.py
    times it on large files): with every chunk of those arrays destroyed, the file still opens."""
    path = tmp_path / "act.h5"
    shutil.copy(base, path)
    damaged = []
    with h5py.File(path, "r") as f:
        def chunks(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and obj.chunks and name.split("/")[0] in ("top", "samples", "bands",
                                                                                     "stats", "vocab"):
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    damaged.append((name, info.byte_offset, info.size))
        f.visititems(chunks)
    assert {name.split("/")[0] for name, _, _ in damaged} >= {"top", "stats"}
    with open(path, "r+b") as raw:
        for _, offset, size in damaged:
            raw.seek(offset)
            raw.write(b"\xff" * size)
    with ActivationsFile(path) as f:
        assert f.layers
        with pytest.raises(Exception):
            f.neuron(f.layers[0], 0)


# -- what today's collection writes passes ------------------------------------------------------------
def read_every_neuron(path: Path) -> ActivationsFile:
    with ActivationsFile(path) as f:
        for layer in f.layers:
            for n in range(f.d_mlp):
                f.neuron(layer, n)
        for (layer, expert) in f.expert_rows:
            for n in range(f.expert_neurons(expert)):
                f.neuron(layer, n, expert=expert)
    return f


def assert_lists_as_documented(path: Path) -> None:
    """The data-format page's *Lists* rules on a real file: filled slots first, empty ones with doc and pos
    -1 and NaN values and windows, top-k lists by |value| then lower document, bands [lo, hi)."""
    with h5py.File(path) as f:
        for group in ("", "experts/", "shared_experts/"):
            if group and group[:-1] not in f:
                continue
            for kind in ("top", "samples", "bands"):
                if group + kind not in f:
                    continue
                doc, pos = f[group + kind + "/doc"][...], f[group + kind + "/pos"][...]
                value = f[group + kind + "/value"][...]
                if kind != "top":  # samples and bands have every hook's value: the hook axis last
                    value = np.moveaxis(value, 3, -1)
                filled = doc >= 0
                assert (np.diff(filled.astype(int), axis=-1) <= 0).all(), (path, group, kind)  # filled first
                assert (pos[~filled] == -1).all() and np.isnan(value[~filled]).all()
                for name in ("gate", "in"):
                    assert np.isnan(f[group + kind + "/" + name][...][~filled]).all()
            doc, value = f[group + "top/doc"][...], np.abs(f[group + "top/value"][...])
            both = (doc[..., 1:] >= 0) & (doc[..., :-1] >= 0)
            ordered = (value[..., :-1] > value[..., 1:]) | ((value[..., :-1] == value[..., 1:])
                                                             & (doc[..., :-1] < doc[..., 1:]))
            assert ordered[both].all()
            count = f[group + "stats/count"][...]
            assert np.isnan(f[group + "stats/min"][...][count == 0]).all()
            if group + "bands" in f:
                edges = f["bands/edges"][...]  # the root's, shared by every group
                post, band_doc = np.abs(f[group + "bands/value"][...][:, :, :, 0]), f[group + "bands/doc"][...]
                for r in range(len(edges) - 1):
                    inside = post[:, :, :, r][band_doc[:, :, :, r] >= 0]
                    assert ((edges[r] <= inside) & (inside < edges[r + 1])).all(), r


def test_every_file_todays_collect_writes_passes(model_factory, corpus_files, tmp_path):
    """Dense with distributions, --samples 0 with --layers, two shards and their merge, and a model with
    dense, routed and shared experts: each opens, and every neuron of it reads."""
    from collect.run import collect
    from mkdocs_gluscope.merge import merge_files
    from test_collect import small_config

    llama = model_factory("llama")
    files = [collect(small_config(llama, corpus_files, tmp_path / "dense.h5")),
             collect(small_config(llama, corpus_files, tmp_path / "bare.h5", samples=0, layers=[1]))]
    shards = [collect(small_config(llama, corpus_files, tmp_path / f"s{i}.h5", shard=f"{i}/2", batch_tokens=64))
              for i in range(2)]
    files += shards + [merge_files(shards, tmp_path / "merged.h5")]
    assert main(["related", str(files[0]), "--model", str(llama)]) == 0  # related/ added in place, both parts
    assert main(["related", str(files[-1])]) == 0  # the merged file (effects merged): by activation
    moe = collect(small_config(model_factory("deepseek2", 3), corpus_files, tmp_path / "moe.h5",
                               experts=[1, 2, "s"]))
    files.append(moe)
    for path in files:
        read_every_neuron(path)
        assert_lists_as_documented(path)
    with ActivationsFile(files[0]) as f, ActivationsFile(files[-2]) as merged:
        assert f.has_effects and merged.has_effects and {"feeds_layer", "shared_layer"} <= set(f.file["related"])
        assert f.neuron(0, 1).related.feeds is not None and merged.neuron(1, 1).related.shared is not None
    with ActivationsFile(moe) as f:
        assert f.attrs["expert_layers"] == [1, 2] and f.attrs["n_experts_per_layer"] == [4, 4]
        for group in ("experts", "shared_experts"):  # expert groups hold samples, bands and vocab too
            assert {"samples", "bands", "vocab"} <= set(f.file[group]) and "hist" in f.file[group]["stats"]
        # Windows: a shared expert has a value at every token of the document, the BOS included; a
        # routed expert only at the tokens routed to it.
        inside = {}
        for group in ("experts", "shared_experts"):
            doc, pos = f.file[group + "/top/doc"][...], f.file[group + "/top/pos"][...]
            t = pos[..., None] + np.arange(-f.context_before, f.context_after + 1)
            length = np.diff(f.doc_offsets)[np.clip(doc, 0, None)][..., None]
            inside[group] = (doc[..., None] >= 0) & (t >= 0) & (t < length)
            window = f.file[group + "/top/gate"][...]
            finite = np.isfinite(window[inside[group]])
            assert finite.all() if group == "shared_experts" else (finite.any() and not finite.all()), group
            bos = inside[group] & (t == 0)
            assert bos.any() and (np.isfinite(window[bos]).all() if group == "shared_experts" else True)


def test_layer_groups_of_an_moe_run_merge_with_one_expert_count_per_layer(model_factory, corpus_files, tmp_path):
    from collect.run import collect
    from mkdocs_gluscope.merge import merge_files
    from test_collect import small_config

    model = model_factory("olmoe", 2)
    groups = [collect(small_config(model, corpus_files, tmp_path / f"l{i}.h5", layers=[i], samples=0))
              for i in range(2)]
    with ActivationsFile(merge_files(groups, tmp_path / "merged.h5")) as f:
        assert f.attrs["expert_layers"] == [0, 1] and f.attrs["n_experts_per_layer"] == [4, 4]
    # A file from before n_experts_per_layer (only the distinct counts) still opens.
    with h5py.File(groups[0], "a") as g:
        del g.attrs["n_experts_per_layer"]
    read_every_neuron(groups[0])


def test_a_wrong_count_of_experts_per_layer_is_refused(base, tmp_path):
    path = tmp_path / "act.h5"
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        f.attrs["n_experts_per_layer"] = [2, 2]  # two counts for one expert layer
    with pytest.raises(FormatError, match=r"attribute n_experts_per_layer: \[2, 2\]; expected one count"):
        ActivationsFile(path)


@pytest.mark.parametrize("attrs, message", [
    ({"skipped_layers": [1, 7]}, r"attribute skipped_layers: \[1, 7\]; expected distinct model layers .* none of the "
                                 r"recorded layers \[0, 1, 5\]"),
    ({"n_model_layers": 5}, r"attribute n_model_layers: 5; expected more than the highest recorded layer, 5"),
    ({"hook_definition": ""}, r"attribute hook_definition: ''; expected a text"),
    ({"expert_hook_definition": 3}, r"attribute expert_hook_definition: 3; expected a text"),
])
def test_the_families_layer_and_hook_attributes_are_checked_on_opening(base, tmp_path, attrs, message):
    """A hybrid stack's skipped layers are none of the recorded ones, and a family's definition of its
    hooks (shown on every page of its neurons) is a text; a file that says otherwise does not open."""
    path = tmp_path / "act.h5"
    shutil.copy(base, path)
    with h5py.File(path, "a") as f:
        f.attrs["n_model_layers"], f.attrs["skipped_layers"] = 8, [2, 3]  # what collect writes: opens
    ActivationsFile(path).close()
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    with pytest.raises(FormatError, match=message):
        ActivationsFile(path)


# -- the corpus cannot write markup ------------------------------------------------------------------
#: Every placeholder the layouts use (the full layout's HTML comments, the light layout's theme markers
#: that stub.js replaces; and former ones), as corpus words.
PLACEHOLDERS = ["GLUSCOPEBLOCK0X", "\ue0000\ue000", "GLUSCOPE:TITLE", "GLUSCOPE:CONTENT", "<!-- gluscope:examples -->",
                "<!-- gluscope:distributions -->", "<!-- gluscope:samples -->", "<!-- gluscope:bands -->",
                "GLUSCOPE-SHELL-TITLE", "GLUSCOPE-SHELL-CONTENT", "gluscope-shell-title", "<!--gluscope-block-0-->"]


def shown_words(page: str) -> list[str]:
    """The top words a neuron page lists, as a reader sees them."""
    import html

    found = re.findall(r"<bdi>(.*?)</bdi>", page)
    return [html.unescape(re.sub(r"<[^>]+>", "", word)) for word in found]


def test_corpus_words_spelling_placeholders_show_as_words_in_both_layouts(tmp_path):
    import html

    from mkdocs_gluscope import render
    from mkdocs_gluscope.light import theme

    assert render.EXAMPLES_PLACEHOLDER in PLACEHOLDERS and set(theme.MARKERS) <= set(PLACEHOLDERS)
    vocab = ["<s>", " ;"] + PLACEHOLDERS  # a spacer that joins no word
    docs = [[0] + [t for i in range(len(PLACEHOLDERS)) for t in (2 + (i + d) % len(PLACEHOLDERS), 1)] for d in range(12)]
    path = write_synthetic(tmp_path / "data" / "act.h5", layers=2, d_mlp=6, k=4, before=2, after=1, vocab=vocab,
                           docs=docs, seed=5)
    seen: set[str] = set()
    for layout in ("full", "light"):
        site = build_site(tmp_path / layout, {"activations": str(path), "neurons": "all", "layout": layout})
        pages = sorted(site.glob("neurons/L*/N*/index.html"))
        assert len(pages) == 12
        for page_path in pages:
            page = page_path.read_text(encoding="utf-8")
            words = shown_words(page)
            assert words and set(words) <= set(PLACEHOLDERS) | {";"}, (page_path, words)
            seen.update(words)
            # The page's own parts are there once each, and no placeholder is left unreplaced.
            if layout == "full":
                assert page.count('class="gs-provenance"') == 1 and page.count('<h2 id="examples"') == 1
            else:  # a stub: title, links, top words, where its data is (stub.js puts it in the theme's page)
                assert page.count('class="gs-light"') == 1 and page.count('<h1 id="neuron"') == 1
                assert page.count("GLUSCOPE:") == 0  # the words are escaped: no marker a split could find
            for placeholder in PLACEHOLDERS[4:8]:
                assert placeholder not in page, (page_path, placeholder)
            assert "GLUSCOPE-SHELL" not in page.split("<h1", 1)[0]  # the shell's title was replaced
        if layout == "full":
            tokens = " ".join(html.unescape(t) for t in re.findall(r'<span class="gs-toks">(.*?)</span></span>',
                                                                     (pages[0]).read_text(encoding="utf-8")))
            assert any(p in tokens for p in PLACEHOLDERS[1:]), tokens  # example tokens show them as text too
    assert set(PLACEHOLDERS) <= seen  # every placeholder was a word on some page


def test_a_nan_in_the_search_index_keeps_every_json_file_valid(tmp_path):
    """A top value of NaN (a stranger's file) must not write ``NaN`` into JSON, which browsers refuse:
    such an example ranks no neuron in search."""
    import json

    path = write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=3, k=3)
    with h5py.File(path, "a") as f:
        value = f["top/value"][...]
        value[0, :, :, 0, 0] = np.nan  # each case's first hook_post example of neuron 0.0..0.2
        value[0, 1, 0, 0, :] = np.inf
        f["top/value"][...] = value
    site = build_site(tmp_path, {"activations": str(path), "neurons": "all", "layout": "light"})
    files = list((site / "neurons/gluscope").rglob("*.json")) + [site / "neurons/site.js"]
    assert len(files) > 3

    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON")

    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".js":  # ...push(Object.assign({base: ...}, JSON));
            text = text[text.index(".href}, ") + len(".href}, "):text.rindex("));")]
        json.loads(text, parse_constant=refuse)
