"""The activations file: one HDF5 file per collection run (format_version 1).

The layout is a contract (see ``ARCHITECTURE.md`` and the site's *Data format* page): axis order is
always ``[layer, neuron, case, hook, ...]`` with :data:`CASES` and :data:`HOOKS` in the order given
here. :class:`ActivationsWriter` writes a file atomically; :class:`ActivationsFile` reads one and
hands out numpy arrays.

Example -- the paper's section 5.1 analysis, across every neuron of the model::

    import numpy as np
    from mkdocs_gluscope.store import ActivationsFile

    with ActivationsFile("demo.h5") as f:
        freq = f.frequency()                      # [layer, neuron, case]
        cos = f.weights("cos_gate_in")            # [layer, neuron]
        rare = freq[..., f.case_index("gate-_in-")]
        print(np.corrcoef(cos.ravel(), rare.ravel())[0, 1])
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from mkdocs_gluscope import schema
from mkdocs_gluscope.distributions import (BAND_EDGES, BAND_SAMPLES, DENSITY_EDGES, HIST_EDGES, N_BANDS, N_BINS,
                                           N_DENSITY)
# The format's names are defined with its schema; readers import them from here as well.
from mkdocs_gluscope.schema import (CASES, EXAMPLE_PARTS, EXPERT_GROUPS, FORMAT, FORMAT_VERSION, HOOKS,  # noqa: F401
                                    SHARED, STAT_NAMES, VOCAB_DIRECTIONS, VOCAB_WEIGHTS, WEIGHT_NAMES, FormatError)

#: Sign of each hook's values within each case, ``[case][hook]``: gate and act(gate) have the sign
#: of gate, in the sign of in, post = act(gate)·in their product (a value may also be 0).
HOOK_SIGNS: tuple[tuple[int, ...], ...] = ((1, 1, 1, 1), (-1, -1, 1, 1), (-1, 1, -1, -1), (1, -1, -1, -1))
#: ``stats/nonfinite`` [L, N, 5]: positions with a NaN or infinite value, by case, then "no case"
#: (gate or in NaN, so no sign); they are left out of every other statistic.
NONFINITE_COLUMNS: tuple[str, ...] = CASES + ("no case",)
#: Tokens per vocabulary list (the last axis of ``vocab/``), as ``gluscope collect`` writes it.
VOCAB_K = 10


#: Examples within this many counted positions of their document's start are marked on pages and
#: left out of ``gluscope pick``'s scores: many models put attention-sink outliers there.
EARLY_POSITIONS = 8


def first_counted_position(attrs: Mapping[str, Any]) -> int:
    """The first position of every document that the statistics count: after the BOS (unless
    ``include_bos``) and after the ``skip_positions`` a run was told to leave out."""
    bos = 1 if attrs.get("has_bos", False) and not attrs.get("include_bos", False) else 0
    return bos + int(attrs.get("skip_positions", 0))


def early_end(attrs: Mapping[str, Any]) -> int:
    """Examples at positions below this are "start of document" examples: the first
    :data:`EARLY_POSITIONS` counted positions, unless the run skipped positions itself."""
    first = first_counted_position(attrs)
    return first if int(attrs.get("skip_positions", 0)) > 0 else first + EARLY_POSITIONS


def _to_attr(value: Any) -> Any:
    """HDF5 attributes take numbers, strings and arrays; lists of strings need a string dtype."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype("utf-8"))
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # str subclasses (torch's version string) have no HDF5 type
    return value


GZIP_LEVEL = 1
#: Neurons per chunk of the ``stats/`` datasets; ``top/`` chunks (8 neurons) divide it, so any
#: multiple of it is a valid start for :meth:`ActivationsWriter.write_neurons`.
NEURON_BLOCK = 1024


def _compressed(chunks: tuple[int, ...]) -> dict[str, Any]:
    # gzip level 1 with byte shuffling halves float16 windows; higher levels cost more and gain ~1%.
    return {"chunks": chunks, "compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}


def _shuffle_deflate(block: np.ndarray) -> bytes:
    """One chunk through HDF5's shuffle then deflate filters, as the library would apply them."""
    raw = np.ascontiguousarray(block).view(np.uint8).reshape(-1, block.dtype.itemsize)
    return zlib.compress(np.ascontiguousarray(raw.T).tobytes(), GZIP_LEVEL)


def write_layer_chunks(dataset: h5py.Dataset, layer: int, values: np.ndarray, pool: ThreadPoolExecutor,
                       start: int = 0) -> None:
    """``dataset[layer, start:start + len(values)] = values`` with the chunks compressed in parallel
    (zlib releases the GIL), then written as they are; readers see an ordinary shuffle+gzip dataset.
    ``start`` must be a multiple of the chunk's neuron count (:data:`NEURON_BLOCK` is one for every
    dataset)."""
    chunk = dataset.chunks
    step = chunk[1]
    if start % step:
        raise ValueError(f"start={start} is not a multiple of the {step}-neuron chunks of {dataset.name}")
    values = np.asarray(values, dtype=dataset.dtype)
    offsets = range(0, values.shape[0], step)

    def block(offset: int) -> np.ndarray:
        part = values[offset:offset + step]
        if part.shape[0] < step:  # HDF5 stores edge chunks at full size
            part = np.concatenate([part, np.zeros((step - part.shape[0],) + part.shape[1:], part.dtype)])
        return part

    for offset, data in zip(offsets, pool.map(lambda o: _shuffle_deflate(block(o)), offsets)):
        dataset.id.write_direct_chunk((layer, start + offset) + (0,) * (len(chunk) - 2), data, filter_mask=0)


def _create_neuron_datasets(root: h5py.Group, L: int, N: int, k: int, W: int, window_dtype: str,
                            samples: int = 0, band_samples: int = 0) -> None:
    """``stats/``, ``top/`` and ``weights/`` for ``L`` rows of ``N`` neurons under ``root``; with
    ``samples`` > 0 also the distributions: ``stats/hist``, ``stats/density``, ``samples/`` (that
    many per case) and ``bands/`` (``band_samples`` per case and band)."""
    C, H = len(CASES), len(HOOKS)
    cn = max(1, min(N, NEURON_BLOCK))
    tn = max(1, min(N, 8))

    def compressed(shape: tuple[int, ...], chunks: tuple[int, ...]) -> dict[str, Any]:
        options = _compressed(chunks)
        if 0 in shape:  # no rows (a run of expert layers only): chunks may exceed an empty shape
            options["maxshape"] = (None,) * len(shape)
        return options

    stats = root.create_group("stats")
    stats.create_dataset("count", (L, N, C), "int64", **compressed((L, N, C), (1, cn, C)))
    stats.create_dataset("nonfinite", (L, N, C + 1), "int64", **compressed((L, N, C + 1), (1, cn, C + 1)))
    stats.create_dataset("sum", (L, N, C, H), "float64", **compressed((L, N, C, H), (1, cn, C, H)))
    for name in ("min", "max"):
        stats.create_dataset(name, (L, N, C, H), "float32", **compressed((L, N, C, H), (1, cn, C, H)))
    # Chunks of 8 neurons: a page reads ~80 KB (under a millisecond) and compression gets
    # enough data per chunk; one neuron per chunk was 8% larger and no faster to write.
    top = root.create_group("top")
    for name, dtype in (("value", "float32"), ("doc", "int32"), ("pos", "int32")):
        top.create_dataset(name, (L, N, C, H, k), dtype, **compressed((L, N, C, H, k), (1, tn, C, H, k)))
    for name in ("gate", "in"):
        top.create_dataset(name, (L, N, C, H, k, W), window_dtype,
                           **compressed((L, N, C, H, k, W), (1, tn, C, H, k, W)))
    if samples > 0:
        B, G = N_BINS, N_DENSITY
        stats.create_dataset("hist", (L, N, C, H, B), "int64", **compressed((L, N, C, H, B), (1, tn, C, H, B)))
        stats.create_dataset("density", (L, N, G, G), "int64", **compressed((L, N, G, G), (1, tn, G, G)))
        for group_name, extra in (("samples", (samples,)), ("bands", (N_BANDS, band_samples))):
            group = root.create_group(group_name)
            for name, dtype, shape in (("doc", "int32", (C,) + extra), ("pos", "int32", (C,) + extra),
                                       ("value", "float32", (C, H) + extra),
                                       ("gate", window_dtype, (C,) + extra + (W,)),
                                       ("in", window_dtype, (C,) + extra + (W,))):
                group.create_dataset(name, (L, N) + shape, dtype, **compressed((L, N) + shape, (1, tn) + shape))
    weights = root.create_group("weights")
    weights.create_dataset("flipped", (L, N), "bool")
    for name in WEIGHT_NAMES[1:]:
        weights.create_dataset(name, (L, N), "float32")


class ActivationsWriter:
    """Writes an activations file to ``PATH.tmp`` and renames it to ``PATH`` on :meth:`close`.

    A run that fails before ``close`` leaves no file at ``PATH``, so a file that exists is complete.
    Use it as a context manager; leaving the block by an exception deletes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_layers: int,
        d_mlp: int,
        k: int,
        context_before: int,
        context_after: int,
        window_dtype: str = "float16",
        attrs: Mapping[str, Any] | None = None,
        samples: int = 0,
        band_samples: int = BAND_SAMPLES,
    ) -> None:
        """``samples`` > 0 adds the distributions (histograms, density, ``samples`` random examples
        per case, ``band_samples`` per case and band); 0 writes a file without them."""
        if window_dtype not in ("float16", "float32"):
            raise ValueError(f"window_dtype={window_dtype!r}; expected 'float16' or 'float32'")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp_path, "w")
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        L, N = n_layers, d_mlp
        W = context_before + 1 + context_after
        root = self.file.attrs
        root["format"] = FORMAT
        root["format_version"] = FORMAT_VERSION
        root["cases"] = _to_attr(CASES)
        root["hooks"] = _to_attr(HOOKS)
        root["k"] = k
        root["context_before"] = context_before
        root["context_after"] = context_after
        for key, value in (attrs or {}).items():
            root[key] = _to_attr(value)
        self.window_dtype = window_dtype
        self.k, self.window = k, W
        self.samples, self.band_samples = samples, band_samples if samples > 0 else 0
        _create_neuron_datasets(self.file, L, N, k, W, window_dtype, self.samples, self.band_samples)
        if samples > 0:
            root["samples"] = samples
            root["band_samples"] = band_samples
            self.file["stats"].create_dataset("hist_edges", data=HIST_EDGES)
            self.file["stats"].create_dataset("density_edges", data=DENSITY_EDGES)
            self.file["bands"].create_dataset("edges", data=BAND_EDGES)

    def add_experts(self, group: str, layers: Sequence[int], experts: Sequence[int], routed: Sequence[int],
                    d_mlp: int) -> None:
        """An expert group (``experts`` or ``shared_experts``): one row per (layer, expert) with the
        same ``stats/``, ``top/`` and ``weights/`` datasets as the root has per layer, ``d_mlp``
        neurons per expert; ``routed`` is each row's number of counted positions routed to it."""
        if group not in EXPERT_GROUPS:
            raise ValueError(f"expert group {group!r}; expected one of {', '.join(EXPERT_GROUPS)}")
        g = self.file.create_group(group)
        g.create_dataset("layer", data=np.asarray(layers, dtype=np.int32))
        g.create_dataset("expert", data=np.asarray(experts, dtype=np.int32))
        g.create_dataset("routed", data=np.asarray(routed, dtype=np.int64))
        _create_neuron_datasets(g, len(layers), d_mlp, self.k, self.window, self.window_dtype, self.samples,
                                self.band_samples)

    def write_corpus(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        vocab: Sequence[str],
        *,
        source_index: np.ndarray | None = None,
        doc_title: Sequence[str] | None = None,
    ) -> None:
        """Token ids of all documents, their offsets, and each token id's display string."""
        corpus = self.file.create_group("corpus")
        tokens = np.asarray(tokens, dtype=np.int32)
        corpus.create_dataset("tokens", data=tokens, **_compressed((min(len(tokens), 1 << 16) or 1,)))
        corpus.create_dataset("doc_offsets", data=np.asarray(doc_offsets, dtype=np.int64))
        corpus.create_dataset("vocab", data=list(vocab), dtype=h5py.string_dtype("utf-8"))
        if source_index is not None:
            corpus.create_dataset("source_index", data=np.asarray(source_index, dtype=np.int64))
        if doc_title is not None:
            corpus.create_dataset("doc_title", data=list(doc_title), dtype=h5py.string_dtype("utf-8"))

    def write_layer(self, layer: int, arrays: Mapping[str, np.ndarray]) -> None:
        """One layer's statistics: keys ``count nonfinite sum min max`` and ``top_value top_doc
        top_pos top_gate top_in``, each shaped as its dataset without the layer axis; in a file
        with distributions also ``hist density`` and ``samples_``/``bands_`` + each of
        :data:`EXAMPLE_PARTS`."""
        self.write_neurons(layer, 0, arrays)

    def write_neurons(self, layer: int, start: int, arrays: Mapping[str, np.ndarray], group: str = "") -> None:
        """Like :meth:`write_layer` for the neurons ``start .. start + n`` of a layer (arrays with
        ``n`` on their first axis); ``start`` is a multiple of :data:`NEURON_BLOCK`. With ``group``
        (see :meth:`add_experts`), ``layer`` is a row of that group."""
        root = self.file[group] if group else self.file
        n = len(arrays["count"])
        for name in STAT_NAMES + ("nonfinite",):
            root["stats"][name][layer, start:start + n] = arrays[name]
        for name in ("value", "doc", "pos", "gate", "in"):
            write_layer_chunks(root["top"][name], layer, arrays["top_" + name], self._pool, start)
        if "top_next_score" in arrays:
            write_layer_chunks(root["top"]["next_score"], layer, arrays["top_next_score"], self._pool, start)
        if self.samples > 0:
            for name in ("hist", "density"):
                write_layer_chunks(root["stats"][name], layer, arrays[name], self._pool, start)
            for group in ("samples", "bands"):
                for name in EXAMPLE_PARTS:
                    write_layer_chunks(root[group][name], layer, arrays[f"{group}_{name}"], self._pool, start)

    def write_vocab(self, token: np.ndarray, score: np.ndarray, group: str = "") -> None:
        """``vocab/token`` (int32) and ``vocab/score`` (float32), ``[layer, neuron, 3, 2, K]``: see
        :data:`VOCAB_WEIGHTS` and :data:`VOCAB_DIRECTIONS`."""
        root = self.file[group] if group else self.file
        vocab = root.require_group("vocab")
        token, score = np.asarray(token, dtype=np.int32), np.asarray(score, dtype=np.float32)
        chunks = (1, max(1, min(token.shape[1], 8))) + token.shape[2:]
        vocab.create_dataset("token", data=token, **_compressed(chunks))
        vocab.create_dataset("score", data=score, **_compressed(chunks))

    def add_effects(self, final_scale: np.ndarray, effect_norm: str) -> None:
        """Each example's direct effect on the output (:mod:`mkdocs_gluscope.effects`): ``corpus/final_scale``
        (float32 per corpus position, NaN where not recorded), the root attribute ``effect_norm``, and
        an empty ``top/next_score`` that :meth:`write_neurons` fills from ``top_next_score`` (float32
        ``[N, C, H, k]``, the dense rows only)."""
        self.file["corpus"].create_dataset("final_scale", data=np.asarray(final_scale, dtype=np.float32),
                                           **_compressed((min(len(final_scale), 1 << 16) or 1,)))
        self.file.attrs["effect_norm"] = effect_norm
        value = self.file["top/value"]
        options = _compressed(value.chunks)
        if not value.shape[0]:  # no dense rows: chunks may exceed the empty shape
            options["maxshape"] = (None,) * value.ndim
        self.file["top"].create_dataset("next_score", value.shape, "float32", fillvalue=np.nan, **options)

    def write_weights(self, arrays: Mapping[str, np.ndarray], group: str = "") -> None:
        """``flipped`` and the three cosines, each ``[layer, neuron]`` (``[row, neuron]`` of ``group``)."""
        root = self.file[group] if group else self.file
        for name in WEIGHT_NAMES:
            root["weights"][name][...] = arrays[name]

    def close(self, **final_attrs: Any) -> Path:
        """Write the last attributes (e.g. ``n_tokens``) and move the file into place."""
        for key, value in final_attrs.items():
            self.file.attrs[key] = _to_attr(value)
        self.file.close()
        self._pool.shutdown()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self._pool.shutdown()
        if self.file.id.valid:
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ActivationsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class Examples:
    """Examples of one neuron that are not top-k lists (``samples/`` or ``bands/``), as numpy arrays:
    ``doc``/``pos`` ``[C, *E]`` (``*E``: ``[S]`` for samples, ``[R, S]`` for bands; doc -1 where
    a slot is empty), ``value`` ``[C, H, *E]`` every hook's value at the example, ``gate``/``in_``
    ``[C, *E, W]`` float32 windows (NaN outside the document), ``tokens`` ``[C, *E, W]`` ids (-1 outside).
    Within a list examples are in sampling order (random), not by value."""

    doc: np.ndarray
    pos: np.ndarray
    value: np.ndarray
    gate: np.ndarray
    in_: np.ndarray
    tokens: np.ndarray


@dataclass
class NeuronData:
    """Everything one neuron page shows, as plain numpy arrays.

    Shapes use C = 4 cases, H = 4 hooks, k examples per list, W window tokens.
    """

    layer: int
    neuron: int
    n_tokens: int
    count: np.ndarray  # [C] int64
    sum: np.ndarray  # [C, H] float64
    min: np.ndarray  # [C, H]
    max: np.ndarray  # [C, H]
    top_value: np.ndarray  # [C, H, k]
    top_doc: np.ndarray  # [C, H, k], -1 for an empty slot
    top_pos: np.ndarray  # [C, H, k]
    top_gate: np.ndarray | None  # [C, H, k, W] float32, NaN outside the document (None: not read)
    top_in: np.ndarray | None  # [C, H, k, W]
    window_tokens: np.ndarray  # [C, H, k, W] token ids, -1 outside the document
    flipped: bool
    cos_gate_in: float
    cos_gate_out: float
    cos_in_out: float
    context_before: int
    context_after: int
    attrs: dict[str, Any] = field(default_factory=dict)
    nonfinite: np.ndarray | None = None  # [5] int64 (NONFINITE_COLUMNS); None in files without it
    expert: int | str | None = None  # a routed expert's index, SHARED, or None for a dense layer's neuron
    routed: int | None = None  # counted positions routed to the expert (every one for a shared expert)
    # Distributions (None in files without them); edges as the file records them.
    hist: np.ndarray | None = None  # [C, H, B] int64: bins of |value| (hist_edges), summing to count per case
    hist_edges: np.ndarray | None = None  # [B + 1]
    density: np.ndarray | None = None  # [G, G] int64: (gate cell, in cell) on density_edges
    density_edges: np.ndarray | None = None  # [G + 1], signed
    samples: Examples | None = None  # uniform random examples per case: [C, S]
    bands: Examples | None = None  # random examples per case and band of |hook_post|: [C, R, S]
    band_edges: np.ndarray | None = None  # [R + 1]
    vocab_token: np.ndarray | None = None  # [3, 2, K] (VOCAB_WEIGHTS x VOCAB_DIRECTIONS x K) token ids
    vocab_score: np.ndarray | None = None  # [3, 2, K] float32
    #: Each case's explanation (``explanations.CaseExplanation``, CASES order); None in files without them.
    explanations: list[Any] | None = None
    # Direct effects (None in files without them): see mkdocs_gluscope.effects.
    top_next_score: np.ndarray | None = None  # [C, H, k] float32: out score of the token after each example
    top_final_scale: np.ndarray | None = None  # [C, H, k] float32: the final norm's scale at each example
    related: Any = None  # mkdocs_gluscope.related.Related: related neurons (None: the file has none)

    @property
    def frequency(self) -> np.ndarray:
        """Share of counted positions in each case, in [0, 1]; for an expert's neuron, share of the
        positions routed to the expert (the positions its statistics are over)."""
        total = self.n_tokens if self.routed is None else self.routed
        return self.count / max(total, 1)

    @property
    def routing_frequency(self) -> float | None:
        """Share of all counted positions routed to this neuron's expert (None outside experts)."""
        return None if self.routed is None else self.routed / max(self.n_tokens, 1)

    @property
    def mean(self) -> np.ndarray:
        """Mean of each hook within each case (NaN for an empty case)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count[:, None]

    @property
    def id(self) -> str:
        return neuron_id(self.layer, self.neuron, self.expert)


def expert_label(expert: int | str) -> str:
    """``e3`` for routed expert 3, ``s`` for the shared expert: the middle part of an expert neuron's id."""
    return SHARED if expert == SHARED else f"e{int(expert)}"


def neuron_id(layer: int, neuron: int, expert: int | str | None = None) -> str:
    """``LAYER.NEURON``, or ``LAYER.eEXPERT.NEURON`` / ``LAYER.s.NEURON`` for an expert's neuron."""
    if expert is None:
        return f"{layer}.{neuron}"
    return f"{layer}.{expert_label(expert)}.{neuron}"


class ActivationsFile:
    """Read access to an activations file.

    Opening one checks the whole file first (:func:`mkdocs_gluscope.schema.check_file`: nothing stored
    outside it, the documented schema); anything wrong is a :class:`FormatError` of one line. Whole-model
    arrays (:meth:`stat`, :meth:`frequency`, :meth:`mean`, :meth:`weights`) are read on demand;
    :meth:`neuron` reads one neuron's chunks only, in about a millisecond, and checks what only they
    can show (each example inside its document, the counts, the vocabulary ids). A chunk that cannot
    be read (a damaged file) is a :class:`FormatError` naming the dataset and the neuron.
    """

    def __init__(self, path: str | os.PathLike, checked: schema.Checked | None = None) -> None:
        """``checked``: what opening this same file found before (:attr:`checked` of an open one, e.g.
        in the process that forked this one); the file is not checked again."""
        self.path = Path(path)
        #: How errors name the file.
        self.where = repr(str(self.path))
        if not self.path.is_file():
            raise FileNotFoundError(f"no activations file at {self.where}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise FormatError(f"{self.where} is not an HDF5 file, or a damaged one ({e})") from None
        if checked is None:
            try:
                checked = schema.check_file(self.file, self.where)
            except BaseException:
                self.file.close()
                raise
        #: What the check on opening found (the attributes, the corpus arrays).
        self.checked = checked
        self.attrs: dict[str, Any] = checked.attrs
        self._offsets: np.ndarray = checked.doc_offsets
        self._tokens: np.ndarray = checked.tokens
        self._lengths: np.ndarray = np.diff(checked.doc_offsets)
        self.n_vocab = checked.n_vocab
        n_rows, self.d_mlp = self.file["stats/count"].shape[:2]
        #: Model layer of each row of the layer axis (a run may cover some layers only).
        self.layers: list[int] = [int(x) for x in self.attrs.get("layers", range(n_rows))]
        self.n_layers = n_rows
        self.k = int(self.attrs["k"])
        self.context_before = int(self.attrs["context_before"])
        self.context_after = int(self.attrs["context_after"])
        self.n_tokens = int(self.attrs["n_tokens"])
        #: Whether the file counts non-finite values (``stats/nonfinite``; files before it do not).
        self.has_nonfinite = "nonfinite" in self.file["stats"]
        #: Expert rows: ``{(layer, expert): (group, row)}`` with ``expert`` an int or SHARED.
        self.expert_rows: dict[tuple[int, int | str], tuple[str, int]] = {}
        #: Tokens routed to each expert row, and neurons per expert, by group.
        self.routed: dict[tuple[int, int | str], int] = {}
        self.expert_d_mlp: dict[str, int] = {}
        for group in EXPERT_GROUPS:
            if group in self.file:
                g = self.file[group]
                self.expert_d_mlp[group] = int(g["stats/count"].shape[1])
                for row, (layer, expert, routed) in enumerate(zip(g["layer"][...], g["expert"][...], g["routed"][...])):
                    key = (int(layer), SHARED if group == "shared_experts" else int(expert))
                    self.expert_rows[key] = (group, row)
                    self.routed[key] = int(routed)
        self._datasets: dict[str, h5py.Dataset] = {}
        self._weight_cache: dict[str, np.ndarray] = {}
        self._vocab: list[str] | None = None
        self._final_scale: np.ndarray | None = None

    def read(self, name: str, index: Any = Ellipsis, label: str = "") -> np.ndarray:
        """``file[name][index]``; a chunk that cannot be read (a damaged file) is a one-line
        :class:`FormatError` naming the dataset (and ``label``: what was being read, e.g. a neuron)."""
        try:
            return self._dataset(name)[index]
        except OSError as e:
            what = f" of {label}" if label else ""
            raise FormatError(f"{self.where}: {name}{what} cannot be read ({e}); the file is damaged") from None

    # -- whole-model arrays -------------------------------------------------------------------
    @staticmethod
    def case_index(case: str) -> int:
        if case not in CASES:
            raise KeyError(f"case {case!r}; expected one of {', '.join(CASES)}")
        return CASES.index(case)

    @staticmethod
    def hook_index(hook: str) -> int:
        if hook not in HOOKS:
            raise KeyError(f"hook {hook!r}; expected one of {', '.join(HOOKS)}")
        return HOOKS.index(hook)

    def stat(self, name: str) -> np.ndarray:
        """``count`` [L,N,C], or ``sum``/``min``/``max`` [L,N,C,H]."""
        if name not in STAT_NAMES:
            raise KeyError(f"statistic {name!r}; expected one of {', '.join(STAT_NAMES)}")
        return self.read("stats/" + name)

    def frequency(self) -> np.ndarray:
        """Share of counted positions in each case: ``count / n_tokens``, [L,N,C]."""
        return self.stat("count") / max(self.n_tokens, 1)

    def mean(self) -> np.ndarray:
        """Mean of each hook within each case, [L,N,C,H]; NaN where a case never occurs."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.stat("sum") / self.stat("count")[..., None]

    def hist(self, case: str, hook: str = "hook_post") -> np.ndarray:
        """``stats/hist`` of one (case, hook) for every neuron, ``[L, N, B]`` counts of ``|value|``
        in the bins :attr:`hist_edges`; a KeyError in files without distributions."""
        if not self.has_distributions:
            raise KeyError(f"{str(self.path)!r} has no histograms (collected with --samples 0, or before them)")
        return self.read("stats/hist", (slice(None), slice(None), self.case_index(case), self.hook_index(hook)))

    @property
    def hist_edges(self) -> np.ndarray:
        """The histogram's ``|value|`` bin edges, ``[B + 1]``."""
        return self._edges("stats/hist_edges")

    def weights(self, name: str) -> np.ndarray:
        """``flipped``, ``cos_gate_in``, ``cos_gate_out`` or ``cos_in_out``, [L,N]."""
        if name not in WEIGHT_NAMES:
            raise KeyError(f"weight property {name!r}; expected one of {', '.join(WEIGHT_NAMES)}")
        return self.read("weights/" + name)

    # -- corpus -------------------------------------------------------------------------------
    @property
    def vocab(self) -> list[str]:
        """Display string of each token id."""
        if self._vocab is None:
            self._vocab = [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.read("corpus/vocab")]
        return self._vocab

    @property
    def doc_offsets(self) -> np.ndarray:
        """``corpus/doc_offsets`` (read, and checked, when the file was opened)."""
        return self._offsets

    @property
    def tokens(self) -> np.ndarray:
        """``corpus/tokens`` (read, and checked, when the file was opened)."""
        return self._tokens

    @property
    def doc_lengths(self) -> np.ndarray:
        """Tokens of each document (``np.diff(doc_offsets)``)."""
        return self._lengths

    @property
    def has_effects(self) -> bool:
        """Whether the file records each example's direct effect on the output (``corpus/final_scale``
        and ``top/next_score``; files collected before them, or with ``--no-effects``, do not)."""
        return "final_scale" in self.file["corpus"] and "next_score" in self.file["top"]

    def final_scale_at(self, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """``corpus/final_scale`` at each (doc, pos), NaN for an empty slot (doc -1); the whole array is
        read once (4 bytes a token)."""
        if self._final_scale is None:
            self._final_scale = self.read("corpus/final_scale")
        doc, pos = np.asarray(doc), np.asarray(pos)
        at = self.doc_offsets[np.clip(doc, 0, self.n_docs - 1)] + np.clip(pos, 0, None)
        return np.where(doc >= 0, self._final_scale[np.clip(at, 0, len(self._final_scale) - 1)], np.nan)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, doc: int) -> np.ndarray:
        """Token ids of document ``doc`` (BOS included where the model uses one)."""
        if not 0 <= doc < self.n_docs:
            raise IndexError(f"document {doc}; this file has documents 0..{self.n_docs - 1}")
        start, stop = self.doc_offsets[doc], self.doc_offsets[doc + 1]
        return self.tokens[start:stop]

    def doc_title(self, doc: int) -> str | None:
        """A short provenance label of the document (e.g. year and speaker), if recorded."""
        if "doc_title" not in self.file["corpus"]:
            return None
        title = self.read("corpus/doc_title", doc)
        return title.decode("utf-8") if isinstance(title, bytes) else title

    def doc_titles(self, start: int, stop: int) -> list[str | None]:
        """:meth:`doc_title` of the documents ``start .. stop - 1``, read at once."""
        if "doc_title" not in self.file["corpus"]:
            return [None] * (stop - start)
        return [t.decode("utf-8") if isinstance(t, bytes) else t for t in self.read("corpus/doc_title", slice(start, stop))]

    # -- one neuron ---------------------------------------------------------------------------
    def experts_index(self) -> dict[int, dict[int | str, int]]:
        """layer -> {expert: neurons per expert}, as :func:`mkdocs_gluscope.neurons.parse_neuron_ids` takes it."""
        return {layer: {e: self.expert_neurons(e) for e in self.experts_of(layer)} for layer in self.expert_layers}

    @property
    def expert_layers(self) -> list[int]:
        """Model layers with expert neurons in this file."""
        return sorted({layer for layer, _ in self.expert_rows})

    def experts_of(self, layer: int) -> list[int | str]:
        """The experts recorded at ``layer``: routed ones by index, then SHARED if recorded."""
        found = [e for lay, e in self.expert_rows if lay == layer]
        return sorted(e for e in found if e != SHARED) + ([SHARED] if SHARED in found else [])

    def expert_neurons(self, expert: int | str) -> int:
        """Neurons per expert: routed experts share one size, the shared expert has its own."""
        return self.expert_d_mlp["shared_experts" if expert == SHARED else "experts"]

    def describe_layers(self) -> str:
        if not self.layers:
            return "none"
        first, last = self.layers[0], self.layers[-1]
        if self.layers == list(range(first, last + 1)):
            return f"{first}..{last}"
        return ", ".join(map(str, self.layers))

    def row(self, layer: int) -> int:
        """Row of model layer ``layer`` on the file's layer axis."""
        if layer not in self.layers:
            raise IndexError(f"layer {layer}; this file has layers {self.describe_layers()}")
        return self.layers.index(layer)

    def check_neuron(self, layer: int, neuron: int) -> None:
        self.row(layer)
        if not 0 <= neuron < self.d_mlp:
            raise IndexError(f"neuron {neuron}; this file has neurons 0..{self.d_mlp - 1}")

    def _weight(self, name: str) -> np.ndarray:
        # [L, N] each, a few MB even for a 7B model: read once, then index in memory.
        if name not in self._weight_cache:
            self._weight_cache[name] = self.weights(name)
        return self._weight_cache[name]

    def _dataset(self, name: str) -> h5py.Dataset:
        # Looking a dataset up by path costs more than reading one neuron's chunk: keep handles.
        handle = self._datasets.get(name)
        if handle is None:
            handle = self._datasets[name] = self.file[name]
        return handle

    def check_expert_neuron(self, layer: int, expert: int | str, neuron: int) -> tuple[str, int]:
        """The (group, row) of an expert neuron; an IndexError naming what the file has."""
        if (layer, expert) not in self.expert_rows:
            has = ", ".join(expert_label(e) for e in self.experts_of(layer)) or "none"
            raise IndexError(f"expert {expert_label(expert)} of layer {layer}; this file has experts {has} there")
        n = self.expert_neurons(expert)
        if not 0 <= neuron < n:
            raise IndexError(f"neuron {neuron}; experts have neurons 0..{n - 1}")
        return self.expert_rows[(layer, expert)]

    def neuron(self, layer: int, neuron: int, *, windows: bool = True, expert: int | str | None = None) -> NeuronData:
        """All data of one neuron's page (``layer`` is the model's layer index; ``expert`` a routed
        expert's index or SHARED for an expert's neuron). With ``windows=False`` the gate/in windows
        are not read (``top_gate``/``top_in`` are None).

        Checks what only the neuron's data can show: every example an empty slot or a position inside
        its document, counts that are shares of the positions they count, vocabulary ids inside the
        vocabulary; a :class:`FormatError` names the dataset and the neuron otherwise."""
        if expert is None:
            self.check_neuron(layer, neuron)
        else:
            self.check_expert_neuron(layer, expert, neuron)
        return self.neurons(layer, neuron, neuron + 1, windows=windows, expert=expert)[0]

    def neurons(self, layer: int, start: int, stop: int, *, windows: bool = True,
                expert: int | str | None = None, tokens: bool = True) -> list[NeuronData]:
        """:meth:`neuron` of the neurons ``start .. stop - 1`` of a layer (or expert), each dataset
        read once for all of them (a whole-model site reads its neurons so). ``tokens=False`` leaves the
        windows' token ids out (``window_tokens`` and the examples' ``tokens`` are None)."""
        if expert is None:
            self.check_neuron(layer, start)
            self.check_neuron(layer, stop - 1)
            prefix, row, routed = "", self.row(layer), None
        else:
            group, row = self.check_expert_neuron(layer, expert, start)
            self.check_expert_neuron(layer, expert, stop - 1)
            prefix, routed = group + "/", self.routed[(layer, expert)]
        part = slice(start, stop)
        label = lambda i: "neuron " + neuron_id(layer, start + i, expert)  # noqa: E731
        f = lambda name: self._read_block(prefix + name, row, part, label)  # noqa: E731
        top_doc, top_pos = f("top/doc"), f("top/pos")
        self._check_block(lambda doc, pos, name: schema.check_places(self.where, prefix + "top", doc, pos,
                                                                     self.doc_lengths, name), label, top_doc, top_pos)
        ids = self.window_tokens(top_doc, top_pos) if tokens else None
        if expert is None:
            weights = {name: self._weight(name)[row, part] for name in WEIGHT_NAMES}
        else:
            weights = {name: f("weights/" + name) for name in WEIGHT_NAMES}
        stats = {name: f("stats/" + name) for name in STAT_NAMES}
        total, of = (self.n_tokens, "the attribute n_tokens") if routed is None else (routed, f"{prefix}routed")
        counts = stats["count"]
        for i in np.flatnonzero((counts < 0).any(axis=-1) | (counts.sum(axis=-1) > total))[:1]:  # the first at fault
            schema.check_counts(self.where, prefix + "stats/count", counts[i], total, label(i), of)
        nonfinite = f("stats/nonfinite") if "nonfinite" in self.file[prefix + "stats"] else None
        top_value = f("top/value")
        top_gate = f("top/gate").astype(np.float32) if windows else None
        top_in = f("top/in").astype(np.float32) if windows else None
        distributions = self._distributions(prefix, row, part, windows, tokens, label)
        explanations = self._explanations(layer, start, stop, expert)
        out = []
        for i in range(stop - start):
            out.append(NeuronData(
                layer=layer, neuron=start + i, n_tokens=self.n_tokens,
                count=stats["count"][i], sum=stats["sum"][i], min=stats["min"][i], max=stats["max"][i],
                top_value=top_value[i], top_doc=top_doc[i], top_pos=top_pos[i],
                top_gate=None if top_gate is None else top_gate[i], top_in=None if top_in is None else top_in[i],
                window_tokens=None if ids is None else ids[i], flipped=bool(weights["flipped"][i]),
                cos_gate_in=float(weights["cos_gate_in"][i]), cos_gate_out=float(weights["cos_gate_out"][i]),
                cos_in_out=float(weights["cos_in_out"][i]), context_before=self.context_before,
                context_after=self.context_after, attrs=self.attrs,
                nonfinite=None if nonfinite is None else nonfinite[i], expert=expert, routed=routed,
                explanations=None if explanations is None else explanations[i],
                **{name: _pick(value, i) for name, value in distributions.items()}))
        return out

    def _read_block(self, name: str, row: int, part: slice, label: Callable[[int], str]) -> np.ndarray:
        """``name[row, part]`` (:meth:`read`); a chunk that cannot be read names the first neuron of
        ``part`` whose own read fails (``label(i)`` names neuron ``start + i``)."""
        try:
            return self.read(name, (row, part))
        except FormatError as error:
            for i, neuron in enumerate(range(part.start, part.stop)):
                self.read(name, (row, neuron), label(i))
            raise error

    @staticmethod
    def _check_block(check: Callable[..., None], label: Callable[[int], str], *arrays: np.ndarray) -> None:
        """``check(*arrays, name)`` of a block of neurons (each array's first axis): checked at once,
        and neuron by neuron only to name the one at fault."""
        try:
            check(*arrays, "these neurons")
        except FormatError:
            for i in range(len(arrays[0])):
                check(*(a[i] for a in arrays), label(i))
            raise

    @property
    def has_distributions(self) -> bool:
        """Whether the file has histograms, density, samples and bands (files before them do not)."""
        return "hist" in self.file["stats"]

    def _edges(self, name: str) -> np.ndarray:
        if name not in self._weight_cache:
            self._weight_cache[name] = self.read(name)
        return self._weight_cache[name]

    def _distributions(self, prefix: str, row: int, part: slice, windows: bool, tokens: bool,
                       label: Callable[[int], str]) -> dict[str, Any]:
        """The distribution fields of :class:`NeuronData` present in the file, for the neurons ``part``
        (each array with the neurons on its first axis; the edges are the same for every neuron)."""
        out: dict[str, Any] = {}
        f = lambda name: self._read_block(prefix + name, row, part, label)  # noqa: E731
        if self.has_distributions:
            out["hist"] = f("stats/hist")
            out["density"] = f("stats/density")
            out["hist_edges"] = _Shared(self._edges("stats/hist_edges"))
            out["density_edges"] = _Shared(self._edges("stats/density_edges"))
            out["band_edges"] = _Shared(self._edges("bands/edges"))
            for group in ("samples", "bands"):
                doc, pos = f(group + "/doc"), f(group + "/pos")
                self._check_block(lambda d, p, name: schema.check_places(self.where, prefix + group, d, p,
                                                                         self.doc_lengths, name), label, doc, pos)
                gate = f(group + "/gate").astype(np.float32) if windows else None
                in_ = f(group + "/in").astype(np.float32) if windows else None
                out[group] = _Block(doc=doc, pos=pos, value=f(group + "/value"), gate=gate, in_=in_,
                                    tokens=self.window_tokens(doc, pos) if tokens else None)
        if prefix + "vocab" in self.file:
            out["vocab_token"] = f("vocab/token")
            self._check_block(lambda token, name: schema.check_vocab_ids(self.where, prefix + "vocab/token", token,
                                                                         self.n_vocab, name), label, out["vocab_token"])
            out["vocab_score"] = f("vocab/score")
        if not prefix:  # dense layers only
            from mkdocs_gluscope.related import read_related

            related = read_related(self, row, part, label)
            if related is not None:
                out["related"] = related
        if not prefix and self.has_effects:  # dense layers only: experts have no effects
            out["top_next_score"] = f("top/next_score")
            out["top_final_scale"] = self.final_scale_at(f("top/doc"), f("top/pos"))
        return out

    def _explanations(self, layer: int, start: int, stop: int, expert: int | str | None) -> list[Any] | None:
        # The explanations/ group's own module reads it (it imports this one, hence here).
        from mkdocs_gluscope.explanations import block_explanations

        return block_explanations(self, layer, start, stop, expert)

    def window_tokens(self, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Token ids around each (doc, pos): shape ``doc.shape + (W,)``, -1 outside a document."""
        offsets = np.arange(-self.context_before, self.context_after + 1)
        doc = np.asarray(doc)[..., None]
        t = np.asarray(pos)[..., None] + offsets
        safe_doc = np.clip(doc, 0, self.n_docs - 1)
        start, stop = self.doc_offsets[safe_doc], self.doc_offsets[safe_doc + 1]
        inside = (doc >= 0) & (t >= 0) & (start + t < stop)
        ids = self.tokens[np.where(inside, start + t, 0)]
        return np.where(inside, ids, -1)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ActivationsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Shared:
    """A value that every neuron of a block shares (not indexed by :func:`_pick`)."""

    value: Any


@dataclass
class _Block:
    """:class:`Examples` of a block of neurons (the neurons on each array's first axis)."""

    doc: np.ndarray
    pos: np.ndarray
    value: np.ndarray
    gate: np.ndarray | None
    in_: np.ndarray | None
    tokens: np.ndarray


def _pick(value: Any, i: int) -> Any:
    """Neuron ``i``'s part of a block's field."""
    if isinstance(value, _Shared):
        return value.value
    if isinstance(value, _Block):
        return Examples(doc=value.doc[i], pos=value.pos[i], value=value.value[i],
                        gate=None if value.gate is None else value.gate[i],
                        in_=None if value.in_ is None else value.in_[i],
                        tokens=None if value.tokens is None else value.tokens[i])
    return value[i]
