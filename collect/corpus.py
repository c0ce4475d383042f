"""Reading texts, tokenizing them into documents, and planning batches.

``--dataset`` is a Hugging Face hub name (read with ``datasets``, streaming), a ``save_to_disk``
folder, or local files: ``.txt`` (one document per file), ``.jsonl`` (one per line) and
``.parquet`` (one per row), given as files or a folder holding them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mkdocs_gluscope.errors import GluscopeError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")


def parse_count(text: str | int) -> int:
    """``20M``, ``500k``, ``1.5M`` or a plain integer."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise GluscopeError(f"token count {text!r}; expected a number such as 200000, 500k or 20M")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass
class Text:
    source_index: int  # row of the source dataset
    text: str
    title: str | None = None  # shown with each example (e.g. year and speaker)


@dataclass
class Corpus:
    """Tokenized documents, concatenated."""

    tokens: np.ndarray  # int32 [total]
    doc_offsets: np.ndarray  # int64 [n_docs + 1]
    source_index: np.ndarray  # int64 [n_docs]
    titles: list[str] | None
    has_bos: bool

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def document(self, doc: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[doc]:self.doc_offsets[doc + 1]]

    def sha256(self) -> str:
        """Fingerprint of the tokenized corpus (tokens and document boundaries): a resumed run
        must see exactly the documents the checkpoint was made from."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes())
        digest.update(np.ascontiguousarray(self.doc_offsets, dtype="<i8").tobytes())
        return digest.hexdigest()


def _local_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        elif path.suffix in LOCAL_SUFFIXES:
            files.append(path)
        else:
            raise GluscopeError(
                f"--dataset file {str(path)!r} has an unsupported type; expected "
                f"{', '.join(LOCAL_SUFFIXES)}, a save_to_disk folder, or a hub dataset name")
    return files


def _rows_of_file(path: Path, text_column: str) -> Iterator[tuple[str, str | None]]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace"), path.stem
        return
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GluscopeError(
                        f"{str(path)!r} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                        "expected one JSON object per line, such as {\"text\": \"...\"}") from None
                if not isinstance(row, dict):
                    raise GluscopeError(
                        f"{str(path)!r} line {number} is a JSON {type(row).__name__}, not an object; "
                        f"expected one object per line, such as {{\"{text_column}\": \"...\"}}")
                if text_column not in row:
                    raise GluscopeError(
                        f"{str(path)!r} line {number} has no column {text_column!r}; its columns are "
                        f"{', '.join(map(repr, row))}; choose one with --text-column")
                yield str(row[text_column]), row.get("title")
        return
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_column not in table.column_names:
        raise GluscopeError(
            f"{str(path)!r} has no column {text_column!r}; its columns are "
            f"{', '.join(map(repr, table.column_names))}; choose one with --text-column")
    for value in table.column(text_column).to_pylist():
        yield str(value), None


def _is_saved_dataset(path: Path) -> bool:
    markers = ("dataset_dict.json", "state.json", "dataset_info.json")
    return path.is_dir() and any((path / m).exists() for m in markers)


@dataclass
class DatasetSource:
    """What ``--dataset`` names: a save_to_disk folder, local files, or a hub dataset."""

    kind: str  # "saved", "files" or "hub"
    saved: Path | None = None
    files: list[Path] | None = None
    hub_name: str | None = None


def dataset_source(dataset: str | Sequence[str]) -> DatasetSource:
    """Classify ``--dataset`` without reading any text: cheap enough to run before the model
    loads, so a mistyped path is reported at once (the one place this rule lives)."""
    specs = [dataset] if isinstance(dataset, str) else list(dataset)
    if not specs or any(not str(s).strip() for s in specs):
        raise GluscopeError("--dataset is empty; expected a hub dataset name, a save_to_disk folder, "
                            f"or {', '.join(LOCAL_SUFFIXES)} files or folders")
    paths = [Path(s) for s in specs]
    if all(p.exists() for p in paths):
        if len(paths) == 1 and _is_saved_dataset(paths[0]):
            return DatasetSource("saved", saved=paths[0])
        files = _local_files(paths)
        if not files:
            raise GluscopeError(f"--dataset {', '.join(specs)}: no {', '.join(LOCAL_SUFFIXES)} files found")
        return DatasetSource("files", files=files)
    missing = [s for s, p in zip(specs, paths) if not p.exists()]
    if len(specs) > 1 or any(Path(s).suffix in LOCAL_SUFFIXES or s.startswith((".", "/")) for s in missing):
        raise GluscopeError(f"--dataset: no such file or folder: {', '.join(missing)}")
    return DatasetSource("hub", hub_name=specs[0])


def read_texts(dataset: str | Sequence[str], *, text_column: str = "text", split: str = "train",
               seed: int = 0) -> Iterator[Text]:
    """Texts of a dataset in a shuffled order fixed by ``seed``."""
    source = dataset_source(dataset)
    if source.kind == "saved":
        assert source.saved is not None
        yield from _read_saved_dataset(source.saved, text_column, split, seed)
    elif source.kind == "files":
        assert source.files is not None
        rows = [row for f in source.files for row in _rows_of_file(f, text_column)]
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        for i in order:
            yield Text(i, rows[i][0], rows[i][1])
    else:
        assert source.hub_name is not None
        yield from _read_hub_dataset(source.hub_name, text_column, split, seed)


def _check_column(column_names: Iterable[str] | None, text_column: str, what: str) -> None:
    if column_names is not None and text_column not in column_names:
        raise GluscopeError(
            f"{what} has no column {text_column!r}; its columns are "
            f"{', '.join(map(repr, column_names))}; choose one with --text-column")


def _read_saved_dataset(path: Path, text_column: str, split: str, seed: int) -> Iterator[Text]:
    import datasets

    data: Any = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise GluscopeError(f"{str(path)!r} has no split {split!r}; it has {', '.join(data)}")
        data = data[split]
    _check_column(data.column_names, text_column, repr(str(path)))
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    for i in order:
        yield Text(i, str(data[i][text_column]))


def _read_hub_dataset(name: str, text_column: str, split: str, seed: int) -> Iterator[Text]:
    import datasets

    try:
        data: Any = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GluscopeError(
            f"cannot read dataset {name!r}: {first}. --dataset takes a hub dataset name, a "
            f"save_to_disk folder, or {', '.join(LOCAL_SUFFIXES)} files") from None
    _check_column(getattr(data, "column_names", None), text_column, f"dataset {name!r}")
    # The index is the row in the shuffled stream; the source row is not known when streaming.
    for i, row in enumerate(data.shuffle(seed=seed, buffer_size=10_000)):
        yield Text(i, str(row[text_column]))


BOS_MODES = ("auto", "always", "never")


def uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token first by default (Llama yes, Qwen2 and SmolLM2 no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def bos_token(tokenizer: Any, mode: str) -> int | None:
    """The token put first in every document, or None.

    ``auto``: the BOS, where the tokenizer adds one itself. ``always``: a BOS even where it does
    not (its EOS if it has no BOS, as TransformerLens and the paper do), so that no real token
    takes the attention-sink role of the first position. ``never``: none.
    """
    if mode not in BOS_MODES:
        raise GluscopeError(f"--bos {mode!r}; expected one of {', '.join(BOS_MODES)}")
    if mode == "never":
        return None
    if mode == "auto":
        return tokenizer.bos_token_id if uses_bos(tokenizer) else None
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise GluscopeError("--bos always: the tokenizer has neither a BOS nor an EOS token")
    return token


def tokenize_corpus(
    texts: Iterable[Text],
    tokenizer: Any,
    *,
    max_tokens: int,
    max_doc_tokens: int = 1024,
    long_docs: str = "truncate",
    bos: str = "auto",
    batch_texts: int = 256,
) -> Corpus:
    """Documents of at most ``max_doc_tokens`` tokens (BOS first where the model uses one), until
    ``max_tokens`` tokens in all. ``long_docs="split"`` keeps the rest of a long text as further
    documents, each with its own BOS."""
    if max_tokens <= 0:
        raise GluscopeError(f"--max-tokens {max_tokens}; expected a positive count such as 200k")
    if long_docs not in ("truncate", "split"):
        raise GluscopeError(f"--long-docs {long_docs!r}; expected 'truncate' or 'split'")
    first = bos_token(tokenizer, bos)
    has_bos = first is not None
    if max_doc_tokens < 1 + has_bos:
        raise GluscopeError(f"--max-doc-tokens {max_doc_tokens}; expected at least {1 + has_bos}")
    prefix = [first] if has_bos else []
    room = max_doc_tokens - len(prefix)
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    sources: list[int] = []
    titles: list[str] = []
    total = 0
    pending: list[Text] = []

    def flush() -> bool:
        nonlocal total
        encoded = tokenizer([t.text for t in pending], add_special_tokens=False)["input_ids"]
        for text, ids in zip(pending, encoded):
            chunks = [ids[i:i + room] for i in range(0, len(ids), room)] if long_docs == "split" else [ids[:room]]
            for chunk in chunks:
                if not chunk:
                    continue
                doc = np.asarray(prefix + list(chunk), dtype=np.int32)[: max_tokens - total]
                if len(doc) <= len(prefix):
                    return True
                pieces.append(doc)
                lengths.append(len(doc))
                sources.append(text.source_index)
                titles.append(text.title or "")
                total += len(doc)
                if total >= max_tokens:
                    return True
        pending.clear()
        return False

    for text in texts:
        if not text.text.strip():
            continue
        pending.append(text)
        if len(pending) >= batch_texts and flush():
            break
    else:
        if pending:
            flush()
    if not pieces:
        raise GluscopeError("the corpus has no documents: every text was empty (check --dataset and --text-column)")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Corpus(
        tokens=np.concatenate(pieces),
        doc_offsets=offsets,
        source_index=np.asarray(sources, dtype=np.int64),
        titles=titles if any(titles) else None,
        has_bos=has_bos,
    )


# -- display strings of tokens ------------------------------------------------------------------

def _bytes_to_unicode() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_strings(tokenizer: Any, vocab_size: int, ids: Sequence[int] | None = None) -> list[str]:
    """Display string of every token id (of ``ids`` only, in their order, where given): the text it
    stands for, with bytes that are not valid UTF-8 on their own shown as ``\\xNN`` escapes."""
    ids = list(range(vocab_size)) if ids is None else [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__
    byte_level = decoder == "ByteLevel"
    byte_map = _bytes_to_unicode() if byte_level else {}
    special = set(getattr(tokenizer, "all_special_tokens", []))
    out = []
    for token_id, piece in zip(ids, pieces):
        if piece is None:
            out.append("")
        elif piece in special:
            out.append(piece)
        elif byte_level and all(ch in byte_map for ch in piece):
            out.append(bytes(byte_map[ch] for ch in piece).decode("utf-8", errors="backslashreplace"))
        elif _BYTE_TOKEN.match(piece):
            byte = int(_BYTE_TOKEN.match(piece).group(1), 16)
            out.append(chr(byte) if byte < 0x80 else f"\\x{byte:02x}")
        elif not byte_level and "\u2581" in piece:  # SentencePiece marks a leading space with ▁
            out.append(piece.replace("\u2581", " "))
        else:
            out.append(tokenizer.decode([token_id]) if not byte_level else piece)
    # HDF5 strings cannot hold NUL; show it as the escape any other raw byte gets.
    return [s.replace("\x00", "\\x00") for s in out]


# -- batches ------------------------------------------------------------------------------------

@dataclass
class Batch:
    docs: np.ndarray  # int64 [B] document indices
    length: int  # padded length T


def plan_batches(lengths: np.ndarray, batch_tokens: int, bucket: int = 64, max_docs: int = 256) -> list[Batch]:
    """Group documents of similar length (longest first) into batches of about ``batch_tokens``
    padded tokens; padded lengths are multiples of ``bucket`` so few shapes occur."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[Batch] = []
    i = 0
    while i < len(order):
        padded = int(-(-lengths[order[i]] // bucket) * bucket)
        size = max(1, min(max_docs, batch_tokens // padded))
        docs = order[i:i + size]
        batches.append(Batch(docs=docs.astype(np.int64), length=padded))
        i += size
    return batches
