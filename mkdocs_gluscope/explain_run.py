"""``gluscope explain``: explain (and score) many neurons, resumably, in shards, into the file.

The work is cut into **units**, one per row of the file (a layer's listed neurons, or an expert's).
Each finished unit is saved at once, atomically, as ``UNIT.npz`` in a work folder next to the file
(``FILE.explain/``; ``--work`` moves it), first explained, then scored when ``--score`` asks. A run
skips the units already there, so an interrupted run resumes where it stopped. ``--shard I/N``
takes the I-th of N contiguous shares of the units: shards sharing the work folder (one file
system) each do their share, and the last one to finish writes every unit into the file; shards on
separate machines copy their ``*.npz`` into one work folder, and a plain run there finds everything
done and writes it. The file itself is only ever replaced whole
(:func:`mkdocs_gluscope.explanations.write_explanations`), and the work folder is removed after.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.explain import (EXPLAINER, BaseRates, Corpus, base_rates, explain_block, read_block,
                                     read_corpus)
from mkdocs_gluscope.explanations import (ARRAYS, STRINGS, describe_attrs, empty_arrays, group_attrs,
                                          write_explanations)
from mkdocs_gluscope.neurons import NeuronSpecError, parse_neuron_ids, parse_shard
from mkdocs_gluscope.store import ActivationsFile, FormatError, expert_label

#: Neurons per task of the explaining processes (a multiple of the files' 8-neuron chunks).
BLOCK = 64


@dataclass
class Unit:
    """One row of the file with its listed neurons: a dense layer, or one expert of a layer."""

    group: str  # "" (dense layers), "experts" or "shared_experts"
    row: int
    layer: int
    expert: int | str | None
    neurons: np.ndarray  # listed neuron indices, ascending
    size: int  # neurons in the row

    @property
    def name(self) -> str:
        return f"L{self.layer}" if self.expert is None else f"L{self.layer}.{expert_label(self.expert)}"

    def listed(self) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        mask[self.neurons] = True
        return mask


def plan_units(f: ActivationsFile, neurons: str | Sequence[str]) -> list[Unit]:
    """The units of ``neurons`` (ids as the plugin's ``neurons``), in file order."""
    try:
        keys = parse_neuron_ids(neurons, f.layers, f.d_mlp, f.experts_index())
    except NeuronSpecError as e:
        raise GluscopeError(str(e)) from None
    by_row: dict[tuple[str, int], list[int]] = {}
    where: dict[tuple[str, int], tuple[int, Any]] = {}
    for key in keys:
        layer, neuron = key[0], key[1]
        expert = key[2] if len(key) == 3 else None
        group, row = ("", f.row(layer)) if expert is None else f.expert_rows[(layer, expert)]
        by_row.setdefault((group, row), []).append(neuron)
        where[(group, row)] = (layer, expert)
    order = {"": 0, "experts": 1, "shared_experts": 2}
    units = []
    for (group, row) in sorted(by_row, key=lambda gr: (order[gr[0]], gr[1])):
        layer, expert = where[(group, row)]
        size = f.d_mlp if not group else f.expert_d_mlp[group]
        units.append(Unit(group, row, layer, expert, np.array(sorted(set(by_row[(group, row)])), dtype=np.int64), size))
    return units


def shard_units(units: list[Unit], shard: str | None) -> list[Unit]:
    """The I-th of N contiguous shares of ``units`` (``"I/N"``; None: all). Contiguous, so a scoring
    shard's forward pass stops at its own last layer."""
    if shard is None:
        return units
    index, count = parse_shard(shard)
    if count > len(units):
        raise GluscopeError(f"--shard {shard}: the listed neurons make only {len(units)} units (rows of the file); "
                            "use fewer shards")
    bounds = [round(i * len(units) / count) for i in range(count + 1)]
    return units[bounds[index]:bounds[index + 1]]


class Scorer(Protocol):
    """What ``--score`` plugs in (:class:`collect.score.Scorer`): its settings (recorded in the file
    and compared on resume) and a call that adds scores to explained units."""

    settings: dict[str, Any]

    def __call__(self, path: Path, units: list[Unit], arrays: dict[str, dict[str, np.ndarray]], progress: bool,
                 done: Callable[[Unit, dict[str, np.ndarray]], None]) -> None:
        """Score ``arrays`` (each unit's, by name) in place, calling ``done(unit, arrays)`` per unit."""


# -- the work folder ---------------------------------------------------------------------------------------

def file_identity(f: ActivationsFile) -> dict[str, Any]:
    """What ties a work folder to one file: a collection's corpus fingerprint and creation time."""
    return {k: f.attrs.get(k) for k in ("corpus_sha256", "created", "n_tokens", "n_docs")} | {"layers": f.layers}


class WorkFolder:
    """Finished units as ``NAME.npz`` (each written to a temporary name and renamed, so one that exists
    is whole) and ``job.json`` naming the file it belongs to."""

    def __init__(self, path: Path, identity: dict[str, Any], explainer: str = EXPLAINER) -> None:
        self.path = path
        job = path / "job.json"
        wanted = json.loads(json.dumps({"explainer": explainer, "file": identity}, default=str))
        if job.exists():
            found = json.loads(job.read_text(encoding="utf-8"))
            if found != wanted:
                raise GluscopeError(
                    f"the work folder {str(path)!r} holds units of another activations file or explainer "
                    f"({', '.join(k for k in wanted if found.get(k) != wanted[k])} differ); delete it, or name "
                    "another with --work")
        else:
            path.mkdir(parents=True, exist_ok=True)
            tmp = job.with_suffix(".tmp")
            tmp.write_text(json.dumps(wanted, indent=1), encoding="utf-8")
            os.replace(tmp, job)

    def unit_path(self, unit: Unit) -> Path:
        return self.path / f"{unit.name}.npz"

    def load(self, unit: Unit, score_settings: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
        """A saved unit with the same listed neurons (and, with ``score_settings``, scored with those
        settings), else None."""
        path = self.unit_path(unit)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        if not np.array_equal(arrays["listed"], unit.listed()):
            return None
        if score_settings is not None and str(arrays["score_settings"]) != _settings_key(score_settings):
            return None
        for name in STRINGS:
            arrays[name] = arrays[name].astype(object)
        return arrays

    def save(self, unit: Unit, arrays: dict[str, np.ndarray], score_settings: dict[str, Any] | None) -> None:
        path = self.unit_path(unit)
        tmp = path.with_name(path.stem + ".tmp.npz")
        out = {name: (np.asarray(value, dtype=str) if name in STRINGS else value) for name, value in arrays.items()
               if name in ARRAYS or name in STRINGS}
        np.savez(tmp, **out, listed=unit.listed(),
                 score_settings=np.asarray(_settings_key(score_settings) if score_settings else ""))
        os.replace(tmp, path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


# -- explaining, in processes ------------------------------------------------------------------------------

@dataclass
class _Context:
    path: str
    corpus: Corpus
    rates: BaseRates
    n_tokens: int
    before: int
    act_fn: str


_WORKER: _Context | None = None  # each explaining process's file and corpus, set by _start_worker


def _context(path: str) -> _Context:
    with ActivationsFile(path) as f:
        corpus = read_corpus(f)
        return _Context(path, corpus, base_rates(corpus), f.n_tokens, f.context_before,
                        str(f.attrs.get("act_fn", "silu")))


def _start_worker(path: str) -> None:
    global _WORKER
    _WORKER = _context(path)


Task = tuple  # (group, row, start, stop, listed neurons relative to start)


def _explain_task(task: Task) -> dict[str, np.ndarray]:
    """Explain the listed neurons of ``start .. stop`` of one row; runs in a worker process (or in this one)."""
    group, row, start, stop, which = task
    ctx = _WORKER
    assert ctx is not None
    with ActivationsFile(ctx.path) as f:
        block = read_block(f, group, row, slice(start, stop))
    return explain_block(block, ctx.corpus, ctx.rates, n_tokens=ctx.n_tokens, before=ctx.before, act_fn=ctx.act_fn,
                         which=which)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def explain_units(path: Path, units: list[Unit], *, workers: int | None, progress: bool,
                  done: Callable[[Unit, dict[str, np.ndarray]], None]) -> None:
    """Explain every listed neuron of ``units``, calling ``done(unit, arrays)`` as each unit finishes
    (arrays ``[size, 4, ...]``, unlisted neurons empty). ``workers`` processes (default: the CPUs this
    process may use) each take blocks of :data:`BLOCK` neurons."""
    global _WORKER
    from tqdm.auto import tqdm

    tasks, pending = [], {}
    for unit in units:
        blocks = []
        for start in range(0, unit.size, BLOCK):
            stop = min(start + BLOCK, unit.size)
            which = unit.neurons[(unit.neurons >= start) & (unit.neurons < stop)] - start
            if len(which):
                blocks.append((unit.group, unit.row, start, stop, tuple(int(i) for i in which)))
        tasks += blocks
        pending[(unit.group, unit.row)] = [unit, len(blocks), empty_arrays(unit.size)]
    total = sum(len(u.neurons) for u in units)
    workers = min(workers or available_cpus(), len(tasks)) if tasks else 1
    bar = tqdm(total=total, unit="neuron", desc="explain", disable=not progress, dynamic_ncols=True)

    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # fork: the workers run numpy and h5py only (no torch thread pool a fork could leave locked), and a
            # caller's script needs no ``if __name__ == "__main__"`` guard. Each worker opens the file itself.
            with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker,
                                                          initargs=(str(path),)) as pool:
                _gather(pool.imap(_explain_task, tasks), tasks, pending, bar, done)
        else:
            previous = _WORKER
            _WORKER = _context(str(path))
            try:
                _gather(map(_explain_task, tasks), tasks, pending, bar, done)
            finally:
                _WORKER = previous
    finally:
        bar.close()


def _gather(results: Iterable[dict[str, np.ndarray]], tasks: list[Task], pending: dict, bar: Any,
            done: Callable[[Unit, dict[str, np.ndarray]], None]) -> None:
    """Put each block's arrays in its unit's; a unit whose blocks are all in goes to ``done``."""
    for (group, row, start, stop, which), arrays in zip(tasks, results):
        unit, left, merged = pending[(group, row)]
        rows = np.asarray(which, dtype=np.int64)
        for name, value in arrays.items():
            merged[name][start + rows] = value[rows]
        bar.update(len(rows))
        pending[(group, row)][1] = left - 1
        if left == 1:
            done(unit, merged)


# -- the command ------------------------------------------------------------------------------------------

def explain_file(path: str | os.PathLike, neurons: str | Sequence[str] = "all", *, work: str | os.PathLike | None = None,
                 shard: str | None = None, workers: int | None = None, progress: bool = True,
                 scorer: Scorer | None = None, explainer: Any = None, log: Callable[[str], None] | None = None) -> bool:
    """``gluscope explain``: explain (and with ``scorer``, score) ``neurons`` of the file at ``path``
    and write them into it once every unit of the job is done. Returns whether the file was written
    (a shard that finishes before the others leaves its units in the work folder). ``explainer``:
    another explainer than the file-only one (:class:`mkdocs_gluscope.llm.LLMExplainer`), called as
    :func:`explain_units` is and naming itself by ``method`` and ``identity``."""
    say = log or (lambda message: print(f"gluscope: {message}", file=sys.stderr, flush=True))
    path = Path(path)
    try:
        f = ActivationsFile(path)
    except (FileNotFoundError, FormatError) as e:
        raise GluscopeError(str(e)) from None
    with f:
        units = plan_units(f, neurons)
        identity = file_identity(f)
        check_scores_compatible(f, units, scorer)
    if not units:
        raise GluscopeError("no neurons listed: expected ids such as 3.77, 3.*, 3.e5.* or all")
    check_writable(path)  # before the work, not after it
    mine = shard_units(units, shard)
    folder = WorkFolder(Path(work) if work else path.with_name(path.name + ".explain"), identity,
                        explainer.identity if explainer is not None else EXPLAINER)
    settings = scorer.settings if scorer else None
    todo = [u for u in mine if folder.load(u, None) is None]
    if len(todo) < len(mine):
        say(f"resuming: {len(mine) - len(todo)} of {len(mine)} units already explained in {folder.path}")
    if todo:
        (explainer or explain_units)(path, todo, workers=workers, progress=progress,
                                     done=lambda u, a: folder.save(u, a, None))
    if scorer is not None:
        unscored = [u for u in mine if folder.load(u, settings) is None]
        if len(unscored) < len(mine):
            say(f"{len(mine) - len(unscored)} of {len(mine)} units already scored")
        if unscored:
            arrays = {u.name: folder.load(u, None) for u in unscored}

            def scored(unit: Unit, unit_arrays: dict[str, np.ndarray]) -> None:
                folder.save(unit, unit_arrays, settings)

            scorer(path, unscored, arrays, progress, scored)
    finished = [folder.load(u, settings) for u in units]
    if any(a is None for a in finished):
        missing = sum(a is None for a in finished)
        say(f"{missing} of {len(units)} units are not done yet (other shards); when they are, the last shard "
            f"writes them into {path}, or run the same command without --shard")
        return False
    lock = folder.path / "writing.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        say(f"another process is writing the explanations into {path} ({lock} exists; delete it if none is)")
        return False
    os.close(fd)
    try:
        attrs = {"explainer": EXPLAINER if explainer is None else explainer.method,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if scorer is not None:
            attrs.update(scorer.settings)
        write_explanations(path, {(u.group, u.row): a for u, a in zip(units, finished)}, attrs)
    finally:
        lock.unlink(missing_ok=True)
    folder.remove()
    n = sum(len(u.neurons) for u in units)
    say(f"wrote explanations of {n:,} neurons ({4 * n:,} cases){' with scores' if scorer else ''} into {path}")
    return True


def check_writable(path: Path) -> None:
    """The file can be replaced: it and its folder are writable (the new file is written beside it)."""
    folder = path.resolve().parent
    if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
        raise GluscopeError(f"cannot write explanations into {str(path)!r}: it or its folder is read-only; copy the file "
                            "somewhere writable and explain the copy")
    free = shutil.disk_usage(folder).free
    if free < path.stat().st_size * 1.1:
        raise GluscopeError(f"explanations are written through a copy of {str(path)!r} ({path.stat().st_size / 1e6:,.0f} MB), "
                            f"and its folder has {free / 1e6:,.0f} MB free; make room for one copy")


def check_scores_compatible(f: ActivationsFile, units: list[Unit], scorer: Scorer | None) -> None:
    """Refuse a scoring run whose settings differ from those of scores the file keeps for neurons this
    run does not rescore: the file's score attributes would describe only some of its scores."""
    if scorer is None:
        return
    listed = {(u.group, u.row): u.listed() for u in units}
    for group in ("", "experts", "shared_experts"):
        attrs = group_attrs(f, group)
        if not attrs:
            continue
        old = {k: v for k, v in attrs.items() if k.startswith("score_")}
        new = {k: v for k, v in scorer.settings.items() if k.startswith("score_")}
        if not old or json.loads(json.dumps(old, default=str)) == json.loads(json.dumps(new, default=str)):
            continue
        prefix = group + "/" if group else ""
        score = f.file[prefix + "explanations/score"]
        for row in range(score.shape[0]):
            kept = np.isfinite(score[row]).any(axis=-1) & ~listed.get((group, row), np.zeros(score.shape[1], bool))
            if kept.any():
                raise GluscopeError(
                    f"{str(f.path)!r} keeps scores made with other settings ({describe_attrs(old)}) for neurons this "
                    "run does not rescore; score every explained neuron again (--neurons all), or use the same "
                    "--model, --dataset and --score-tokens")
