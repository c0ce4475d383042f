"""Explanations on a real file: ``gluscope explain --score`` end to end, then the scores of ours beside
two baselines, case by case.

    $ python bench/explain_scores.py --file data/demo.h5

1. copies the file (the command writes into it) and runs the command's own function,
   ``explain_file(..., scorer=Scorer(...))``, on every neuron (``--neurons``): the wall time of the
   whole command, of its two phases, and the CPU time it used (this process and its explaining
   processes), with the machine's load before and after (the cores are shared);
2. scores, in one more pass over the same held-out text, three explanation sets of every case:
   ours (read back from the file: the pass must reproduce the file's scores), a **shuffled** one
   (another neuron's explanation of the same case, a random derangement within each layer) and the
   **single top token** (the token of the case's strongest hook_post example after the start of the
   document, nothing else);
3. prints, per case, the distribution of each set's scores over the cases with enough scored
   positions (``--min-positions``), and how often ours beats each baseline.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collect.score import Scorer, score_pass  # noqa: E402
from mkdocs_gluscope.explain import read_block, read_corpus, shuffled_arrays, top_token_arrays  # noqa: E402
from mkdocs_gluscope.explain_run import explain_file, plan_units  # noqa: E402
from mkdocs_gluscope.explanations import read_arrays  # noqa: E402
from mkdocs_gluscope.store import CASES, ActivationsFile, early_end  # noqa: E402

QUANTILES = (10, 25, 50, 75, 90)


def machine() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    isa = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{fields.get('Model name', '?').strip()} family {fields.get('CPU family', '?').strip()} model "
            f"{fields.get('Model', '?').strip()}, {isa}, {cores} cores for this process")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class TimedScorer(Scorer):
    """The command's scorer, noting when its phase starts and ends."""

    def __call__(self, *args, **kwargs) -> None:
        self.started = time.perf_counter()
        super().__call__(*args, **kwargs)
        self.ended = time.perf_counter()


def row(name: str, scores: np.ndarray) -> str:
    q = np.nanpercentile(scores, QUANTILES) if np.isfinite(scores).any() else [np.nan] * len(QUANTILES)
    return f"  {name:<10}" + "".join(f"{x:>8.3f}" for x in q) + f"{np.nanmean(scores):>8.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, required=True, help="an activations file (copied, never changed)")
    p.add_argument("--neurons", nargs="+", default=["all"])
    p.add_argument("--score-tokens", type=int, default=32_000)
    p.add_argument("--min-positions", type=int, default=20,
                   help="a case counts when this many of its positions were scored (default: 20)")
    p.add_argument("--workdir", type=Path, default=None, help="where to put the copy (default: a temporary folder)")
    p.add_argument("--explained", action="store_true",
                   help="--file already holds scored explanations (of --neurons, with --score-tokens): skip step 1 "
                        "and score the baselines beside them")
    args = p.parse_args()
    print(machine())
    print(f"before: {load()}")
    tmp = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        if args.explained:
            path = args.file
            scorer = Scorer(path, tokens=args.score_tokens)
        else:
            path = tmp / args.file.name
            started = time.perf_counter()
            shutil.copyfile(args.file, path)
            print(f"copied the file in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 1e6:.0f} MB)")
            scorer = TimedScorer(path, tokens=args.score_tokens)
            cpu, started = cpu_seconds(), time.perf_counter()
            explain_file(path, args.neurons, scorer=scorer, progress=True)
            wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            print(f"gluscope explain --score, {' '.join(args.neurons)}, {args.score_tokens:,} held-out tokens: "
                  f"{wall / 60:.1f} min wall ({(scorer.started - started) / 60:.1f} explaining, "
                  f"{(scorer.ended - scorer.started) / 60:.1f} scoring, the rest writing the file), "
                  f"{cpu / 60:.1f} min of CPU; after: {load()}")

        with ActivationsFile(path) as f:
            units = plan_units(f, args.neurons)
            corpus = read_corpus(f)
            sets = {}
            for unit in units:
                ours = read_arrays(f, unit.group, unit.row)
                top = top_token_arrays(read_block(f, unit.group, unit.row, slice(0, unit.size)), corpus)
                top["threshold"] = ours["threshold"]
                sets[unit.name] = [ours, shuffled_arrays(ours, seed=unit.row), top]
            loaded = scorer.load(f, units)
            held_out = scorer.held_out(loaded, f)
            started = time.perf_counter()
            results = score_pass(loaded, held_out, units, sets, vocab=f.vocab, early=early_end(f.attrs),
                                 batch_tokens=scorer.batch_tokens, progress=True)
            print(f"baselines scored in {(time.perf_counter() - started) / 60:.1f} min; held-out text: "
                  f"{held_out.description}")
        names = ("ours", "shuffled", "top token")
        by_case = {name: [[] for _ in CASES] for name in names}
        enough_all, drift = [], 0.0
        for unit in units:
            r = results[unit.name]
            drift = max(drift, float(np.nanmax(np.abs(r[0]["score"] - sets[unit.name][0]["score"][unit.neurons]),
                                               initial=0.0)))
            enough = r[0]["scored_positions"] >= args.min_positions
            enough_all.append(enough)
            for c in range(len(CASES)):
                for name, scores in zip(names, r):
                    by_case[name][c].append(scores["score"][:, c][enough[:, c]])
        print(f"ours rescored: largest difference from the file's scores {drift:.2g}")
        header = "  " + " " * 10 + "".join(f"{'p' + str(q):>8}" for q in QUANTILES) + f"{'mean':>8}"
        for c, case in enumerate(CASES):
            scores = {name: np.concatenate(by_case[name][c]) for name in names}
            n = len(scores["ours"])
            beat = {name: float(np.mean(scores["ours"] > scores[name])) for name in names[1:]}
            print(f"\n{case}: {n:,} cases with >= {args.min_positions} scored positions; ours higher than shuffled "
                  f"in {100 * beat['shuffled']:.1f}%, than the top token in {100 * beat['top token']:.1f}%")
            print(header)
            for name in names:
                print(row(name, scores[name]))
        total = {name: np.concatenate([np.concatenate(v) for v in by_case[name]]) for name in names}
        n_cases = sum(int(e.sum()) for e in enough_all)
        all_cases = sum(e.size for e in enough_all)
        print(f"\nall cases: {n_cases:,} of {all_cases:,} have >= {args.min_positions} scored positions; ours higher "
              f"than shuffled in {100 * np.mean(total['ours'] > total['shuffled']):.1f}%, than the top token in "
              f"{100 * np.mean(total['ours'] > total['top token']):.1f}%")
        print(header)
        for name in names:
            print(row(name, total[name]))
        print(f"after: {load()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
