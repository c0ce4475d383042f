"""What an activations file must hold, checked before anything in it is read.

Activations files travel between researchers, so opening one is a trust boundary. :func:`check_file`
runs once per open (:class:`~mkdocs_gluscope.store.ActivationsFile` calls it) and refuses, with one
:class:`FormatError` line naming the file, the dataset and what was expected:

* **anything that reads outside the file**: external storage (a dataset whose bytes live in another
  file), external links, soft links that dangle, virtual datasets, user-defined links, and filters
  other than HDF5's built-in ones and LZF (HDF5 would load any other as a plugin library);
* **a schema the site's *Data format* page does not describe**: the required attributes and
  datasets, their dtypes (strings as variable-length UTF-8) and shapes that agree with each other
  (rows, neurons, cases, hooks, k, the window, samples, bands, bins, vocabulary lists, expert rows),
  optional groups complete or absent, ``n_tokens > 0``, document offsets from 0 to the end of the
  corpus without going back, and every token id inside the vocabulary.

It reads metadata and the few small arrays (the corpus's offsets and token ids, the expert rows),
never the neurons' data: milliseconds for the demo file (``bench/open_check.py``). What can only be
seen in a neuron's own data (an example's document and position, its counts, its vocabulary ids) is
checked when the neuron is read, by :func:`check_neuron_arrays`.

The names of the format live here, and :mod:`mkdocs_gluscope.store` re-exports them.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from mkdocs_gluscope.errors import GluscopeError, printable

FORMAT = "gluscope-activations"
FORMAT_VERSION = 1

#: Sign combinations of (gate, in), in file order.
CASES: tuple[str, ...] = ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
#: Recorded quantities, in file order: act(gate)*in, in, gate, act(gate).
HOOKS: tuple[str, ...] = ("hook_post", "hook_pre_linear", "hook_pre", "swish")
STAT_NAMES = ("count", "sum", "min", "max")
WEIGHT_NAMES = ("flipped", "cos_gate_in", "cos_gate_out", "cos_in_out")
#: ``samples/`` and ``bands/`` hold examples as ``top/`` does: these datasets each.
EXAMPLE_PARTS = ("doc", "pos", "value", "gate", "in")
#: ``vocab/token`` and ``vocab/score`` [L, N, 3, 2, K]: for each weight vector (axis 2, this order)
#: the K tokens of highest score (axis 3 index 0) and of lowest score (index 1).
VOCAB_WEIGHTS: tuple[str, ...] = ("out", "gate", "in")
VOCAB_DIRECTIONS: tuple[str, ...] = ("top", "bottom")
#: Groups of expert neurons (mixture-of-experts layers): routed experts, and shared experts, which see
#: every token. Each holds ``layer``, ``expert`` and ``routed`` per row and the root's neuron datasets.
EXPERT_GROUPS = ("experts", "shared_experts")
#: How an expert is named in ids and paths: routed expert ``E`` is ``eE``, the shared expert ``s``.
SHARED = "s"


class FormatError(GluscopeError, ValueError):
    """The file is not a gluscope activations file this version can read; the message is one line
    naming the file, the dataset or attribute, and what was expected."""


# -- the schema -----------------------------------------------------------------------------------
# A dtype rule is (name shown in errors, accepted (kind, itemsize) pairs); strings are their own rule.
I8 = ("int8", {("i", 1)})
I32 = ("int32", {("i", 4)})
I64 = ("int64", {("i", 8)})
F32 = ("float32", {("f", 4)})
F64 = ("float64", {("f", 8)})
BOOL = ("bool", {("b", 1)})
WINDOW = ("float16 or float32", {("f", 2), ("f", 4)})
STRING = ("variable-length UTF-8 strings", set())

# Shapes are tuples of numbers and symbols; a symbol takes the value the first dataset or attribute
# that has it gives, and every later one must agree. Symbols, in words (for the error lines):
SYMBOLS = {
    "L": "rows", "N": "neurons", "C": "cases", "C+1": "cases + 1", "H": "hooks", "k": "k", "W": "window",
    "B": "histogram bins", "B+1": "bins + 1", "G": "density cells", "G+1": "cells + 1", "S": "samples",
    "R": "bands", "R+1": "bands + 1", "S2": "band samples", "K": "vocabulary list length", "T": "tokens",
    "D": "documents", "D+1": "documents + 1", "V": "vocabulary size",
    "Et": "explanation token slots", "Ec": "explanation context slots", "Ek": "explanation kinds", "Kr": "related list length",
}
#: What every group of neurons holds (the root for dense layers, each expert group for its rows).
NEURON_DATASETS: tuple[tuple[str, tuple, tuple], ...] = (
    ("stats/count", I64, ("L", "N", "C")),
    ("stats/sum", F64, ("L", "N", "C", "H")),
    ("stats/min", F32, ("L", "N", "C", "H")),
    ("stats/max", F32, ("L", "N", "C", "H")),
    ("top/value", F32, ("L", "N", "C", "H", "k")),
    ("top/doc", I32, ("L", "N", "C", "H", "k")),
    ("top/pos", I32, ("L", "N", "C", "H", "k")),
    ("top/gate", WINDOW, ("L", "N", "C", "H", "k", "W")),
    ("top/in", WINDOW, ("L", "N", "C", "H", "k", "W")),
    ("weights/flipped", BOOL, ("L", "N")),
    ("weights/cos_gate_in", F32, ("L", "N")),
    ("weights/cos_gate_out", F32, ("L", "N")),
    ("weights/cos_in_out", F32, ("L", "N")),
)
#: Optional, alone (files before it have none).
NONFINITE = (("stats/nonfinite", I64, ("L", "N", "C+1")),)
#: The distributions: all of them or none (``gluscope collect --samples 0`` writes none).
DISTRIBUTIONS = (
    ("stats/hist", I64, ("L", "N", "C", "H", "B")),
    ("stats/density", I64, ("L", "N", "G", "G")),
    ("samples/doc", I32, ("L", "N", "C", "S")),
    ("samples/pos", I32, ("L", "N", "C", "S")),
    ("samples/value", F32, ("L", "N", "C", "H", "S")),
    ("samples/gate", WINDOW, ("L", "N", "C", "S", "W")),
    ("samples/in", WINDOW, ("L", "N", "C", "S", "W")),
    ("bands/doc", I32, ("L", "N", "C", "R", "S2")),
    ("bands/pos", I32, ("L", "N", "C", "R", "S2")),
    ("bands/value", F32, ("L", "N", "C", "H", "R", "S2")),
    ("bands/gate", WINDOW, ("L", "N", "C", "R", "S2", "W")),
    ("bands/in", WINDOW, ("L", "N", "C", "R", "S2", "W")),
)
#: The distributions' edges, at the root only: expert groups share them.
DISTRIBUTION_EDGES = (
    ("stats/hist_edges", F32, ("B+1",)),
    ("stats/density_edges", F32, ("G+1",)),
    ("bands/edges", F32, ("R+1",)),
)
#: Vocabulary projections: both or neither.
VOCAB = (
    ("vocab/token", I32, ("L", "N", 3, 2, "K")),
    ("vocab/score", F32, ("L", "N", 3, 2, "K")),
)
#: Explanations (``gluscope explain``): all of them or none, in any group of neurons. Slot counts are
#: the file's own (Et, Ec; previous and next share Ec); Ek is the length of the group's attribute ``kinds``.
EXPLANATIONS = (
    ("explanations/label", STRING, ("L", "N", "C")),
    ("explanations/method", STRING, ("L", "N", "C")),
    ("explanations/token", I32, ("L", "N", "C", "Et")),
    ("explanations/token_weight", F32, ("L", "N", "C", "Et")),
    ("explanations/previous", I32, ("L", "N", "C", "Ec")),
    ("explanations/previous_weight", F32, ("L", "N", "C", "Ec")),
    ("explanations/next", I32, ("L", "N", "C", "Ec")),
    ("explanations/next_weight", F32, ("L", "N", "C", "Ec")),
    ("explanations/kind_weight", F32, ("L", "N", "C", "Ek")),
    ("explanations/threshold", F32, ("L", "N", "C")),
    ("explanations/score", F32, ("L", "N", "C")),
    ("explanations/precision", F32, ("L", "N", "C")),
    ("explanations/recall", F32, ("L", "N", "C")),
    ("explanations/scored_positions", I64, ("L", "N", "C")),
    ("explanations/strong_positions", I64, ("L", "N", "C")),
)
#: Each top-k example's effect on the output (dense layers, at the root): both or neither.
EFFECTS = (
    ("corpus/final_scale", F32, ("T",)),
    ("top/next_score", F32, ("L", "N", "C", "H", "k")),
)
#: ``related/``, added by ``gluscope related`` (dense layers): each part complete or absent.
RELATED_ACTIVATION = (
    ("related/shared_layer", I32, ("L", "N", "C", "Kr")),
    ("related/shared_neuron", I32, ("L", "N", "C", "Kr")),
    ("related/shared_case", I8, ("L", "N", "C", "Kr")),
    ("related/shared_positions", I32, ("L", "N", "C", "Kr")),
    ("related/shared_docs", I32, ("L", "N", "C", "Kr")),
)
RELATED_WEIGHTS = (
    ("related/feeds_layer", I32, ("L", "N", 2, 2, "Kr")),
    ("related/feeds_neuron", I32, ("L", "N", 2, 2, "Kr")),
    ("related/feeds_score", F32, ("L", "N", 2, 2, "Kr")),
    ("related/alike_neuron", I32, ("L", "N", 2, "Kr")),
    ("related/alike_score", F32, ("L", "N", 2, "Kr")),
)
CORPUS = (
    ("corpus/tokens", I32, ("T",)),
    ("corpus/doc_offsets", I64, ("D+1",)),
    ("corpus/vocab", STRING, ("V",)),
)
CORPUS_OPTIONAL = (
    ("corpus/source_index", I64, ("D",)),
    ("corpus/doc_title", STRING, ("D",)),
)
#: One entry per row of an expert group.
EXPERT_ROWS = (
    ("layer", I32, ("L",)),
    ("expert", I32, ("L",)),
    ("routed", I64, ("L",)),
)
#: HDF5 filters a file may use: the built-in ones, and LZF (which h5py bundles). Any other would make
#: HDF5 look for a plugin library to load.
ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_SHUFFLE: "shuffle",
                   h5py.h5z.FILTER_FLETCHER32: "fletcher32", h5py.h5z.FILTER_SZIP: "szip",
                   h5py.h5z.FILTER_NBIT: "nbit", h5py.h5z.FILTER_SCALEOFFSET: "scaleoffset",
                   h5py.h5z.FILTER_LZF: "lzf"}

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlist = 8


def show(value: Any) -> str:
    """A value from the file as it appears in an error line: ``repr``, so control characters are
    escaped and the line stays one line, and shortened."""
    if isinstance(value, np.generic):
        value = value.item()
    return _short.repr(value)


@dataclass
class Checked:
    """What :func:`check_file` found: the attributes (plain Python) and the arrays it had to read,
    kept so the reader does not read them again."""

    attrs: dict[str, Any]
    tokens: np.ndarray
    doc_offsets: np.ndarray
    n_vocab: int


class _Check:
    """One file's check: ``where`` names the file in every error."""

    def __init__(self, f: h5py.File, where: str) -> None:
        self.f = f
        self.where = where
        self.dims: dict[str, tuple[int, str]] = {}  # symbol -> (value, what set it)
        #: Every object of the file by path, opened once by :meth:`storage` (h5py's lookups cost more
        #: than the rest of the check).
        self.objects: dict[str, Any] = {}

    def fail(self, what: str, message: str) -> FormatError:
        # ``what`` may be a name from the file: printed with its control characters escaped.
        return FormatError(f"{self.where}: {printable(what)}: {message}")

    # -- nothing outside the file -----------------------------------------------------------------
    def storage(self) -> None:
        links: list[tuple[str, Any]] = []
        self.f.visititems_links(lambda name, link: links.append((name, link)))
        for name, link in links:  # every link before any soft link is followed
            if isinstance(link, h5py.ExternalLink):
                raise self.fail(name, f"an external link to {show(link.path)} in {show(link.filename)}; a gluscope "
                                      "file keeps everything inside itself (external links are refused)")
            if not isinstance(link, (h5py.HardLink, h5py.SoftLink)):
                raise self.fail(name, f"a link of an unknown kind ({type(link).__name__}); a gluscope file has "
                                      "hard links only (and soft links inside the file)")
        for name, link in links:
            if not isinstance(link, h5py.HardLink):
                continue
            obj = self.objects[name] = self.f[name]
            if not isinstance(obj, h5py.Dataset):
                continue
            create = obj.id.get_create_plist()  # opening reads no data
            if create.get_layout() == h5py.h5d.VIRTUAL:
                sources = sorted({create.get_virtual_filename(i) for i in range(create.get_virtual_count())})
                sources = [s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in sources]
                raise self.fail(name, f"a virtual dataset (its data would come from {show(sources)}); a gluscope "
                                      "file keeps everything inside itself (virtual datasets are refused)")
            if create.get_external_count():
                outside = create.get_external(0)[0].decode("utf-8", "replace")
                raise self.fail(name, f"stored in an outside file ({show(outside)}); a gluscope file keeps every "
                                      "byte inside itself (external storage is refused)")
            for i in range(create.get_nfilters()):
                code, _, _, filter_name = create.get_filter(i)
                if code not in ALLOWED_FILTERS:
                    raise self.fail(name, f"compressed with HDF5 filter {code} ({show(filter_name)}), which HDF5 "
                                          f"would load as a plugin; expected only {', '.join(ALLOWED_FILTERS.values())}")
        for name, link in links:  # a soft link whose target is not in the file (get follows it)
            if isinstance(link, h5py.SoftLink):
                obj = self.objects[name] = self.f.get(name)
                if obj is None:
                    raise self.fail(name, f"a soft link to {show(link.path)}, which is not in the file; a gluscope "
                                          "file keeps everything inside itself")

    # -- attributes -------------------------------------------------------------------------------
    def attributes(self) -> dict[str, Any]:
        out = {}
        for key in self.f.attrs:
            try:
                out[key] = plain(self.f.attrs[key])
            except (OSError, TypeError, ValueError, UnicodeDecodeError) as e:
                raise self.fail(f"attribute {show(key)}", f"cannot be read ({type(e).__name__}: {e})") from None
        return out

    def integer(self, attrs: Mapping[str, Any], key: str, *, low: int, required: bool = True,
                meaning: str = "") -> int | None:
        if key not in attrs:
            if required:
                raise self.fail(f"attribute {key}", f"missing; expected {meaning or 'a whole number'} "
                                                    f"(a whole number, {low} or more)")
            return None
        value = attrs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(f"attribute {key}", f"{show(value)}; expected {meaning + ': ' if meaning else ''}"
                                                f"a whole number, {low} or more")
        return value

    def format(self, attrs: Mapping[str, Any]) -> None:
        fmt, version = attrs.get("format"), attrs.get("format_version")
        if fmt != FORMAT:
            raise FormatError(f"{self.where} has format={show(fmt)}; expected {FORMAT!r} (a file written by "
                              "gluscope collect)")
        if version != FORMAT_VERSION:
            raise FormatError(f"{self.where} has format_version={show(version)}; this gluscope reads "
                              f"format_version {FORMAT_VERSION}")

    def names(self, attrs: Mapping[str, Any]) -> None:
        for key, expected in (("cases", CASES), ("hooks", HOOKS)):
            if attrs.get(key) != list(expected):
                raise self.fail(f"attribute {key}", f"{show(attrs.get(key))}; expected {list(expected)} (the file's "
                                                    "axis order)")

    # -- datasets ---------------------------------------------------------------------------------
    def bind(self, symbol: str, value: int, source: str) -> None:
        """The first value of ``symbol`` stays; ``X`` and ``X+1`` are bound together."""
        if symbol in self.dims:
            return
        self.dims[symbol] = (value, source)
        if symbol.endswith("+1"):
            self.dims.setdefault(symbol[:-2], (value - 1, source))
        elif symbol + "+1" in SYMBOLS:
            self.dims.setdefault(symbol + "+1", (value + 1, source))

    def dataset(self, group: str, name: str, dtype: tuple, shape: tuple) -> h5py.Dataset:
        path = f"{group}/{name}" if group else name
        obj = self.lookup(path)
        axes = ", ".join(SYMBOLS.get(s, str(s)) if isinstance(s, str) else str(s) for s in shape)
        if obj is None:
            raise self.fail(path, f"missing; expected {dtype[0]} [{axes}]")
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(path, f"a {type(obj).__name__.lower()}; expected a dataset")
        label, kinds = dtype
        try:
            obj.dtype
        except (TypeError, ValueError) as e:
            raise self.fail(path, f"a dtype numpy cannot represent ({e}); expected {label}") from None
        if dtype is STRING:
            info = h5py.check_string_dtype(obj.dtype)
            ok = info is not None and info.encoding == "utf-8" and info.length is None
        else:
            ok = (obj.dtype.kind, obj.dtype.itemsize) in kinds
        if not ok:
            raise self.fail(path, f"dtype {obj.dtype}; expected {label}")
        if len(obj.shape) != len(shape):
            raise self.fail(path, f"shape {obj.shape}; expected {len(shape)} axes [{axes}]")
        for axis, (size, symbol) in enumerate(zip(obj.shape, shape)):
            if isinstance(symbol, str):
                self.bind(symbol, size, path)
                expected, source = self.dims[symbol]
            else:
                expected, source = symbol, ""
            if size != expected:
                wanted = tuple(self.dims[s][0] if isinstance(s, str) else s for s in shape)
                why = (f"{SYMBOLS.get(symbol, symbol)} = {expected} from {source}" if source else
                       f"axis {axis} is always {expected}")
                raise self.fail(path, f"shape {obj.shape}; expected {wanted} [{axes}], since {why}")
        return obj

    def lookup(self, path: str) -> Any:
        """The object at ``path``, or None (below a soft-linked group, h5py finds it)."""
        obj = self.objects.get(path)
        return obj if obj is not None else self.f.get(path)

    def present(self, group: str, names: Sequence[str]) -> list[bool]:
        return [self.lookup(f"{group}/{n}" if group else n) is not None for n in names]

    def all_or_none(self, group: str, spec: Sequence[tuple], what: str) -> bool:
        """Whether the datasets of ``spec`` are there (checked), when all or none are."""
        found = self.present(group, [name for name, _, _ in spec])
        if any(found) and not all(found):
            have = next(name for (name, _, _), ok in zip(spec, found) if ok)
            lack = next(name for (name, _, _), ok in zip(spec, found) if not ok)
            prefix = f"{group}/" if group else ""
            raise self.fail(prefix + lack, f"missing while {prefix}{have} is there; {what} come together "
                                           f"({', '.join(name for name, _, _ in spec)}) or not at all")
        if all(found):
            for name, dtype, shape in spec:
                self.dataset(group, name, dtype, shape)
        return all(found)

    def neurons(self, group: str, distributions: bool) -> dict[str, bool]:
        """One group of neurons (``""``: the root's dense layers); symbols L and N are the group's own."""
        for symbol in ("L", "N", "K"):  # (none of them has an "+1")
            self.dims.pop(symbol, None)
        for name, dtype, shape in NEURON_DATASETS:
            self.dataset(group, name, dtype, shape)
        has = {"nonfinite": self.all_or_none(group, NONFINITE, "stats/nonfinite"),
               "distributions": self.all_or_none(group, DISTRIBUTIONS, "the distributions"),
               "vocab": self.all_or_none(group, VOCAB, "the vocabulary projections"),
               "explanations": self.explanations(group)}
        if has["distributions"] != distributions:
            prefix = f"{group}/" if group else ""
            raise self.fail(prefix + "stats/hist", ("present" if has["distributions"] else "missing") + " while the "
                            "root " + ("has no" if has["distributions"] else "has") + " distributions; expert groups "
                            "share the root's edges, so the distributions are everywhere or nowhere")
        return has

    def explanations(self, group: str) -> bool:
        """``explanations/`` of one group of neurons: a group, its datasets all there (or the group
        absent), and its attribute ``kinds`` naming each kind of ``kind_weight``."""
        path = f"{group}/explanations" if group else "explanations"
        obj = self.lookup(path)
        if obj is None:
            return False
        if not isinstance(obj, h5py.Group):
            raise self.fail(path, "a dataset; expected a group of explanations")
        if not self.all_or_none(group, EXPLANATIONS, "the explanations"):
            first = EXPLANATIONS[0][0]
            raise self.fail(f"{group}/{first}" if group else first, "missing; a group explanations/ holds "
                            f"{', '.join(name.split('/')[1] for name, _, _ in EXPLANATIONS)}")
        try:
            kinds = plain(obj.attrs["kinds"]) if "kinds" in obj.attrs else None
        except (OSError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise self.fail(f"{path} attribute kinds", f"cannot be read ({type(e).__name__}: {e})") from None
        if (not isinstance(kinds, list) or len(kinds) != self.dims["Ek"][0]
                or not all(isinstance(k, str) for k in kinds)):
            raise self.fail(f"{path} attribute kinds", f"{show(kinds)}; expected {self.dims['Ek'][0]} names, one "
                                                       "per entry of kind_weight's last axis")
        return True

    def read(self, path: str) -> np.ndarray:
        try:
            return self.lookup(path)[...]
        except OSError as e:
            raise self.fail(path, f"cannot be read ({e}); the file is damaged") from None


def plain(value: Any) -> Any:
    """An HDF5 attribute as plain Python: numbers, strings, lists."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _increasing(values: np.ndarray) -> bool:
    return bool(values.size and np.all(np.diff(values) > 0)) and not np.isnan(values).any()


def check_file(f: h5py.File, where: str) -> Checked:
    """Check an open file (see the module docstring); ``where`` names it in errors (e.g. its path,
    quoted). Returns what was read on the way. Raises :class:`FormatError`."""
    c = _Check(f, where)
    attrs = c.attributes()
    c.format(attrs)
    c.storage()
    c.names(attrs)
    c.bind("C", len(CASES), "attribute cases")
    c.bind("C+1", len(CASES) + 1, "attribute cases")
    c.bind("H", len(HOOKS), "attribute hooks")
    k = c.integer(attrs, "k", low=1, meaning="examples per list")
    before = c.integer(attrs, "context_before", low=0, meaning="window tokens before each example")
    after = c.integer(attrs, "context_after", low=0, meaning="window tokens after each example")
    n_tokens = c.integer(attrs, "n_tokens", low=1, meaning="the number of counted positions")
    c.bind("k", k, "attribute k")
    c.bind("W", before + 1 + after, "attributes context_before + 1 + context_after")
    samples = c.integer(attrs, "samples", low=0, required=False)
    band_samples = c.integer(attrs, "band_samples", low=0, required=False)
    c.integer(attrs, "skip_positions", low=0, required=False)

    # The corpus: shapes, then the offsets and token ids themselves (the pages need them anyway).
    for name, dtype, shape in CORPUS:
        c.dataset("", name, dtype, shape)
    for name, dtype, shape in CORPUS_OPTIONAL:
        if c.lookup(name) is not None:
            c.dataset("", name, dtype, shape)
    n_docs, n_vocab, total = c.dims["D+1"][0] - 1, c.dims["V"][0], c.dims["T"][0]
    if n_docs < 1:
        raise c.fail("corpus/doc_offsets", "no documents; expected n_docs + 1 offsets, n_docs 1 or more")
    if n_vocab < 1:
        raise c.fail("corpus/vocab", "empty; expected a display string for every token id")
    if "n_docs" in attrs and attrs["n_docs"] != n_docs:
        raise c.fail("attribute n_docs", f"{show(attrs['n_docs'])}; expected {n_docs} (corpus/doc_offsets has "
                                         f"{n_docs + 1} offsets)")
    offsets = c.read("corpus/doc_offsets")
    if offsets[0] != 0 or offsets[-1] != total:
        raise c.fail("corpus/doc_offsets", f"runs from {int(offsets[0])} to {int(offsets[-1])}; expected 0 to "
                                           f"{total}, the length of corpus/tokens")
    steps = np.diff(offsets)
    if (steps < 0).any():
        d = int(np.argmax(steps < 0))
        raise c.fail("corpus/doc_offsets", f"goes back at document {d} ({int(offsets[d])} then "
                                           f"{int(offsets[d + 1])}); expected offsets that never decrease")
    if n_tokens > total:
        raise c.fail("attribute n_tokens", f"{n_tokens} counted positions in a corpus of {total} tokens; expected "
                                           f"at most {total}")
    tokens = c.read("corpus/tokens")
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise c.fail("corpus/tokens", f"token id {bad} at position {int(np.argmax(tokens == bad))}; expected ids "
                                      f"0..{n_vocab - 1} (corpus/vocab has {n_vocab} entries)")

    # The root's neurons (the dense layers; zero rows in a file of expert layers only).
    root_has_distributions = any(c.present("", [name for name, _, _ in DISTRIBUTIONS]))  # all: c.neurons checks
    if root_has_distributions:
        for key, value in (("samples", samples), ("band_samples", band_samples)):
            if not value:
                raise c.fail(f"attribute {key}", f"{show(value)} in a file with distributions; expected the "
                                                 "examples per list, 1 or more")
        c.bind("S", samples, "attribute samples")
        c.bind("S2", band_samples, "attribute band_samples")
    elif samples:
        raise c.fail("stats/hist", f"missing while the attribute samples is {samples}; the distributions "
                                   "(stats/hist, stats/density, samples/, bands/) come together or not at all")
    root = c.neurons("", root_has_distributions)
    if root["distributions"]:
        for name, dtype, shape in DISTRIBUTION_EDGES:
            c.dataset("", name, dtype, shape)
            edges = c.read(name)
            if not _increasing(edges):
                raise c.fail(name, f"{show(edges.tolist())}; expected increasing edges")
    if root["vocab"] and "vocab_k" in attrs and attrs["vocab_k"] != c.dims["K"][0]:
        raise c.fail("attribute vocab_k", f"{show(attrs['vocab_k'])}; expected {c.dims['K'][0]}, the length of "
                                          "vocab/token's lists")
    _check_additions(c, attrs, f)
    rows = c.dims["L"][0]
    layers = attrs.get("layers", list(range(rows)))
    if (not isinstance(layers, list) or len(layers) != rows
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
            or len(set(layers)) != rows):
        raise c.fail("attribute layers", f"{show(layers)}; expected {rows} distinct model layers (0 or more), one "
                                         "per row of stats/count")

    # Expert groups: rows of (layer, expert, routed) and the root's datasets per row.
    expert_layers: set[int] = set()
    routed_rows: list[tuple[int, int]] = []
    for group in EXPERT_GROUPS:
        if group not in f:
            continue
        if not isinstance(f[group], h5py.Group):
            raise c.fail(group, "a dataset; expected a group of expert rows")
        c.neurons(group, root_has_distributions)
        for name, dtype, shape in EXPERT_ROWS:
            c.dataset(group, name, dtype, shape)
        layer, expert, routed = (c.read(f"{group}/{name}") for name, _, _ in EXPERT_ROWS)
        shared = group == "shared_experts"
        seen: set[tuple[int, int]] = set()
        for row, (lay, e, r) in enumerate(zip(layer.tolist(), expert.tolist(), routed.tolist())):
            if lay < 0 or lay in layers:
                raise c.fail(f"{group}/layer", f"row {row} is layer {lay}; expected a model layer (0 or more) that is "
                                               f"not one of the dense layers {show(layers)}")
            if (e != -1) if shared else (e < 0):
                raise c.fail(f"{group}/expert", f"row {row} is expert {e}; expected "
                                                + ("-1 (a shared expert)" if shared else "an expert index, 0 or more"))
            if (lay, e) in seen:
                raise c.fail(f"{group}/expert", f"layer {lay}, expert {e} has two rows; expected one row per expert")
            seen.add((lay, e))
            if not 0 <= r <= n_tokens:
                raise c.fail(f"{group}/routed", f"row {row} has {r} routed positions; expected 0..{n_tokens} "
                                                "(the attribute n_tokens)")
            expert_layers.add(lay)
            if not shared:
                routed_rows.append((lay, e))
    _check_expert_attrs(c, attrs, expert_layers, routed_rows)
    _check_layer_attrs(c, attrs, layers, expert_layers)
    return Checked(attrs=attrs, tokens=tokens, doc_offsets=offsets, n_vocab=n_vocab)


def _check_additions(c: _Check, attrs: Mapping[str, Any], f: h5py.File) -> None:
    """The root's optional additions: effects (``corpus/final_scale``, ``top/next_score``) and the two
    parts of ``related/``, each complete or absent, with their attributes."""
    c.all_or_none("", EFFECTS, "each example's effects")
    for key in ("effect_norm", "related_weights"):
        if key in attrs and not isinstance(attrs[key], str):
            raise c.fail(f"attribute {key}", f"{show(attrs[key])}; expected a string (how the norms entered)")
    if "related" not in f:
        return
    if not isinstance(c.lookup("related"), h5py.Group):
        raise c.fail("related", "a dataset; expected a group of related-neuron lists")
    parts = [c.all_or_none("", RELATED_ACTIVATION, "the related lists by activation"),
             c.all_or_none("", RELATED_WEIGHTS, "the related lists by weights")]
    if any(parts):
        c.integer(attrs, "related_k", low=1, meaning="entries per related list")
        if attrs["related_k"] != c.dims["Kr"][0]:
            raise c.fail("attribute related_k", f"{show(attrs['related_k'])}; expected {c.dims['Kr'][0]}, the length "
                                                "of related/'s lists")


def _check_expert_attrs(c: _Check, attrs: Mapping[str, Any], expert_layers: set[int],
                        routed_rows: list[tuple[int, int]]) -> None:
    """``expert_layers``, ``n_experts_per_layer`` and the older ``n_experts`` against the expert rows."""
    listed = attrs.get("expert_layers")
    if listed is not None:
        if not isinstance(listed, list) or sorted(set(listed)) != sorted(listed) or set(listed) != expert_layers:
            raise c.fail("attribute expert_layers", f"{show(listed)}; expected the model layers of the expert rows, "
                                                    f"{sorted(expert_layers)}, each once")
    per_layer = attrs.get("n_experts_per_layer")
    if per_layer is not None:
        if not isinstance(listed, list) or not isinstance(per_layer, list) or len(per_layer) != len(listed) \
                or not all(isinstance(n, int) and n >= 1 for n in per_layer):
            raise c.fail("attribute n_experts_per_layer", f"{show(per_layer)}; expected one count of routed experts "
                                                          f"(1 or more) per entry of expert_layers {show(listed)}")
        counts = dict(zip(listed, per_layer))
        for layer, expert in routed_rows:
            if expert >= counts[layer]:
                raise c.fail("experts/expert", f"expert {expert} at layer {layer}; expected 0..{counts[layer] - 1} "
                                               f"(n_experts_per_layer gives layer {layer} {counts[layer]} experts)")
    old = attrs.get("n_experts")
    if old is not None and routed_rows:
        if not isinstance(old, list) or not old or not all(isinstance(n, int) for n in old):
            raise c.fail("attribute n_experts", f"{show(old)}; expected the routed experts' counts")
        top = max(routed_rows, key=lambda r: r[1])
        if top[1] >= max(old):
            raise c.fail("experts/expert", f"expert {top[1]} at layer {top[0]}; expected below {max(old)} (the largest "
                                           "of the attribute n_experts)")


def _check_layer_attrs(c: _Check, attrs: Mapping[str, Any], layers: list[int], expert_layers: set[int]) -> None:
    """The optional attributes that describe the model's stack and its hooks: ``n_model_layers``,
    ``skipped_layers`` (layers without an MLP) and the families' ``hook_definition`` /
    ``expert_hook_definition`` texts."""
    total = c.integer(attrs, "n_model_layers", low=1, required=False, meaning="the model's layers")
    held = set(layers) | expert_layers
    if total is not None and held and max(held) >= total:
        raise c.fail("attribute n_model_layers", f"{total}; expected more than the highest recorded layer, {max(held)}")
    skipped = attrs.get("skipped_layers")
    if skipped is not None:
        ok = (isinstance(skipped, list) and len(set(skipped)) == len(skipped)
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in skipped))
        if not ok or held & set(skipped) or (total is not None and skipped and max(skipped) >= total):
            raise c.fail("attribute skipped_layers", f"{show(skipped)}; expected distinct model layers (0 or more"
                                                     + (f", below n_model_layers {total}" if total is not None else "")
                                                     + f") that are none of the recorded layers {sorted(held)}")
    for key in ("hook_definition", "expert_hook_definition"):
        text = attrs.get(key)
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise c.fail(f"attribute {key}", f"{show(text)}; expected a text that says how the hooks are defined")


# -- one neuron's data, when it is read ------------------------------------------------------------
def check_places(where: str, dataset: str, doc: np.ndarray, pos: np.ndarray, lengths: np.ndarray, label: str) -> None:
    """Every example of ``doc``/``pos`` (any shape) is an empty slot (doc -1) or a position inside its
    document (``lengths``: each document's tokens); ``label`` names the neuron (or block) in the error."""
    n_docs = len(lengths)
    bad = (doc < -1) | (doc >= n_docs)
    if bad.any():
        d = int(doc[bad].flat[0])
        raise FormatError(f"{where}: {dataset}/doc of {label}: document {d}; expected -1 (an empty slot) or a "
                          f"document 0..{n_docs - 1}")
    filled = doc >= 0
    length = lengths[np.where(filled, doc, 0)]
    outside = filled & ((pos < 0) | (pos >= length))
    if outside.any():
        i = tuple(np.argwhere(outside)[0])
        raise FormatError(f"{where}: {dataset}/pos of {label}: position {int(pos[i])} in document {int(doc[i])}; "
                          f"expected 0..{int(length[i]) - 1} (the document has {int(length[i])} tokens)")


def check_counts(where: str, dataset: str, count: np.ndarray, total: int, label: str, of: str) -> None:
    """A neuron's case counts: none negative, and together at most the positions they are shares of."""
    if (count < 0).any() or int(count.sum()) > total:
        raise FormatError(f"{where}: {dataset} of {label}: {show(count.tolist())}; expected counts of 0 or more "
                          f"that add up to at most {total} ({of})")


def check_related(where: str, lists: Mapping[str, np.ndarray], layers: Sequence[int], d_mlp: int, label: str) -> None:
    """One neuron's ``related/`` lists (``{dataset: values}``): every entry -1 (none) or a neuron of the
    file's dense layers (and a case 0..3), so a link never points outside the file."""
    for name, values in lists.items():
        if name.endswith("_layer"):
            bad = (values != -1) & ~np.isin(values, np.asarray(layers))
            expected = f"-1 (none) or a dense layer of the file {show(list(layers))}"
        elif name.endswith("_neuron"):
            bad, expected = (values < -1) | (values >= d_mlp), f"-1 (none) or 0..{d_mlp - 1}"
        elif name.endswith("_case"):
            bad, expected = (values < -1) | (values >= len(CASES)), f"-1 (none) or 0..{len(CASES) - 1}"
        else:
            continue
        if bad.any():
            raise FormatError(f"{where}: related/{name} of {label}: {int(values[bad].flat[0])}; expected {expected}")


def check_vocab_ids(where: str, dataset: str, token: np.ndarray, n_vocab: int, label: str) -> None:
    bad = (token < -1) | (token >= n_vocab)
    if bad.any():
        raise FormatError(f"{where}: {dataset} of {label}: token id {int(token[bad].flat[0])}; expected -1 (none) or "
                          f"0..{n_vocab - 1} (corpus/vocab has {n_vocab} entries)")
