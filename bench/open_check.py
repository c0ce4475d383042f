"""What checking a file costs when it is opened (``mkdocs_gluscope.schema.check_file``), by file shape.

The check reads the attributes, every object's metadata, the corpus's offsets and token ids and the
expert rows; never a neuron's data. So its cost grows with the corpus (the token ids are read and their
range checked) and with the number of datasets, not with the neurons' data. This writes files of real
shape whose neuron datasets are created but left unwritten (HDF5 stores no chunk for them, so the files
are small and the check sees exactly the metadata a full file has), with corpora of several sizes, and
times ``ActivationsFile(path)`` (open + check) against a bare ``h5py.File(path)`` open, interleaved,
median of repeats.

    python bench/open_check.py [--repeats 7] [--tokens 100k,2M,20M]

Shapes: the demo (SmolLM2-135M: 30 layers x 1,536 neurons, k = 16, window 19, distributions and
vocabulary lists) and the paper's OLMo-7B (32 x 11,008); corpora as given (100k is the demo's, 20M the
paper's Dolma subset), in 1,024-token documents.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mkdocs_gluscope.distributions import BAND_EDGES, BAND_SAMPLES, DENSITY_EDGES, HIST_EDGES, SAMPLES  # noqa: E402
from mkdocs_gluscope.store import ActivationsFile, _create_neuron_datasets  # noqa: E402

SHAPES = {"demo (30 x 1536)": (30, 1536, 49152), "OLMo-7B (32 x 11008)": (32, 11008, 50304)}


def count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_file(path: Path, layers: int, d_mlp: int, vocab: int, tokens: int) -> Path:
    """A file of the given shape: corpus, vocabulary and attributes written, neuron datasets created empty."""
    rng = np.random.default_rng(0)
    docs = max(1, tokens // 1024)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "gluscope-activations", "format_version": 1, "k": 16, "context_before": 16,
                        "context_after": 2, "n_tokens": tokens - docs, "n_docs": docs, "samples": SAMPLES,
                        "band_samples": BAND_SAMPLES, "layers": list(range(layers)), "has_bos": True,
                        "model": "bench", "dataset": "bench"})
        f.attrs["cases"] = np.array(["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"], dtype=h5py.string_dtype())
        f.attrs["hooks"] = np.array(["hook_post", "hook_pre_linear", "hook_pre", "swish"], dtype=h5py.string_dtype())
        corpus = f.create_group("corpus")
        corpus.create_dataset("tokens", data=rng.integers(0, vocab, tokens, dtype=np.int32), chunks=(min(tokens, 1 << 16),),
                              compression="gzip", compression_opts=1, shuffle=True)
        corpus.create_dataset("doc_offsets", data=np.linspace(0, tokens, docs + 1).astype(np.int64))
        corpus.create_dataset("vocab", data=[f"t{i}" for i in range(vocab)], dtype=h5py.string_dtype("utf-8"))
        corpus.create_dataset("source_index", data=np.arange(docs, dtype=np.int64))
        _create_neuron_datasets(f, layers, d_mlp, 16, 19, "float16", SAMPLES, BAND_SAMPLES)
        f["stats"].create_dataset("hist_edges", data=HIST_EDGES)
        f["stats"].create_dataset("density_edges", data=DENSITY_EDGES)
        f["bands"].create_dataset("edges", data=BAND_EDGES)
        vocab_group = f.create_group("vocab")
        for name, dtype in (("token", "int32"), ("score", "float32")):
            vocab_group.create_dataset(name, (layers, d_mlp, 3, 2, 10), dtype, chunks=(1, 8, 3, 2, 10),
                                       compression="gzip", compression_opts=1, shuffle=True)
    return path


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", default="100k,2M,20M")
    args = parser.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}, {os.cpu_count()} cores; load: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (layers, d_mlp, vocab) in SHAPES.items():
            for tokens in (count(t) for t in args.tokens.split(",")):
                path = write_file(Path(folder) / f"{layers}-{tokens}.h5", layers, d_mlp, vocab, tokens)
                bare, checked = [], []
                for _ in range(args.repeats):  # interleaved: other jobs on the machine load both alike
                    bare.append(seconds(lambda: h5py.File(path, "r").close()))
                    checked.append(seconds(lambda: ActivationsFile(path).close()))
                print(f"{name:>22}, {tokens:>11,} tokens ({path.stat().st_size / 1e6:6.1f} MB written): median "
                      f"open {1e3 * statistics.median(bare):7.2f} ms, open + check "
                      f"{1e3 * statistics.median(checked):8.2f} ms")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
