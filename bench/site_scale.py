"""A whole model as a site: every neuron of a model-shaped file, built with ``mkdocs build`` (light layout),
then opened in Chromium from a local server that honours range requests.

Writes a synthetic activations file of the shape asked (``bench/shaped.py``: the demo's SmolLM2-135M or
the paper's OLMo-7B-0424), builds the demo site's ``mkdocs.yml`` with ``neurons: all``, and prints: the
build's time and peak memory (the proportional set size of the build and its workers, sampled every
half second), the site's size by kind (pages, scripts and indexes: what GitHub Pages would hold with
the data elsewhere) and the data files' (per neuron), and for a few neuron pages opened in a fresh
Chromium: the time until the summary, the histograms and the first examples show, and the bytes
fetched (all, and those of the neuron: its page, data and documents, without the site's shared
scripts, styles and the theme's page, which a reader's browser holds after the first page).

    python bench/site_scale.py --shape olmo-7b [--layers 32] [--keep DIR] [--file FILE] [--pages 5] [--neurons 5.*]

``--neurons`` builds part of the model (e.g. one layer: the pages' figures do not depend on how many
there are; sizes and times per neuron scale).

``--baseline DIR`` compares the build's CPU time with another version of the code (a checkout of it,
e.g. ``git archive main | tar -x -C DIR``): each of ``--rounds`` rounds builds the same site with that
code and with this one, alternately, each in a fresh process with an empty cache, and prints each
build's CPU seconds (the process and its workers), the median ratio, and whether the two sites' data
files, word index and layer tables are the same bytes.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


class MemorySampler(threading.Thread):
    """The largest summed proportional set size (Pss: shared pages counted once) of this process and
    its descendants, sampled every half second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    @staticmethod
    def tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return out

    @staticmethod
    def pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            return 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, sum(self.pss(p) for p in self.tree(os.getpid())))
            self.stop.wait(0.5)


def sizes(site: Path, prefix: str = "neurons") -> dict[str, int]:
    import re

    page = re.compile(rf"{re.escape(prefix)}/L\d+/(?:(?:E\d+|S)/)?N\d+(?:/index)?\.html$")
    kinds: dict[str, int] = {}
    for p in site.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(site).as_posix()
        kind = ("data: neuron files" if rel.startswith(f"{prefix}/data/neurons/") else
                "data: corpus files" if rel.startswith(f"{prefix}/data/corpus/") else
                "neuron pages" if page.match(rel) else
                "word index" if rel.startswith(f"{prefix}/gluscope/search/") else
                "layer tables" if rel.startswith(f"{prefix}/gluscope/layers/") else
                "sitemaps" if "sitemap" in rel else
                "layer and index pages" if rel.startswith(f"{prefix}/") else
                "theme, scripts, other pages")
        kinds[kind] = kinds.get(kind, 0) + p.stat().st_size
    return kinds


def open_pages(site: Path, urls: list[str], warm_url: str) -> list[dict]:
    """Each page in a fresh Chromium profile: seconds until it shows its summary, histograms and first
    examples, and bytes fetched (all; the neuron's own)."""
    from playwright.sync_api import sync_playwright

    from sites import serve_folder

    out = []
    log: list = []
    with serve_folder(site, log) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu"])
        for url in urls:
            for warm in (False, True):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                if warm:  # the site's shared files in the browser's cache: another neuron's page first
                    page.goto(base + warm_url)
                    page.wait_for_selector(".gs-light[data-ready='2'] details.gs-list[open] .gs-ex", timeout=60000)
                log.clear()
                start = time.perf_counter()
                page.goto(base + url)
                page.wait_for_selector(".gs-light[data-ready='2'] svg.gs-hist", timeout=60000)
                page.wait_for_selector(".gs-examples.gs-top details.gs-list[open] .gs-ex", timeout=60000)
                shown = time.perf_counter() - start
                own = sum(n for path, _, n in log if "/data/" in path or path.rstrip("/").endswith(url.rstrip("/")))
                out.append({"url": url, "warm": warm, "seconds": shown, "bytes": sum(n for _, _, n in log),
                            "own": own, "requests": len(log)})
                context.close()
        browser.close()
    return out


def machine() -> str:
    """The CPU as ``/proc/cpuinfo`` names it (model, family, model number, widest vector unit) and its cores."""
    info: dict[str, str] = {}
    for line in open("/proc/cpuinfo"):
        if ":" in line:
            key, value = (x.strip() for x in line.split(":", 1))
            info.setdefault(key, value)
    flags = info.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return (f"{info.get('model name', 'unknown CPU')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"
            f" ({vector}), {len(os.sched_getaffinity(0))} cores")


BUILD = """
import resource, sys, time
sys.path.insert(0, sys.argv[3])
from sites import build
t = time.perf_counter()
build(__import__("pathlib").Path(sys.argv[1]), strict=False)
wall = time.perf_counter() - t
cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
print("BUILT", wall, cpu)
"""


def compare_builds(config: Path, baseline: Path, rounds: int, n_neurons: int) -> None:
    """Build ``config`` with the code in ``baseline`` and with this code, alternately (see the module)."""
    import filecmp
    import subprocess

    import yaml

    runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "this": []}
    sites = {}
    for r in range(rounds):
        for name, code in (("baseline", baseline.resolve()), ("this", ROOT)) if r % 2 == 0 else (("this", ROOT), ("baseline", baseline.resolve())):
            conf = yaml.safe_load(config.read_text(encoding="utf-8"))
            conf["site_dir"] = str(config.parent / f"site-{name}")
            shutil.rmtree(conf["site_dir"], ignore_errors=True)
            shutil.rmtree(config.parent / ".cache", ignore_errors=True)
            path = config.parent / f"mkdocs-{name}.yml"
            path.write_text(yaml.safe_dump(conf), encoding="utf-8")
            env = {**os.environ, "PYTHONPATH": str(code)}
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, "-c", BUILD, str(path), str(code), str(code / "tests")], env=env,
                                  capture_output=True, text=True, cwd=config.parent)
            line = next((x for x in done.stdout.splitlines() if x.startswith("BUILT")), None)
            if done.returncode or line is None:
                sys.exit(f"the {name} build failed:\n{done.stderr[-3000:]}")
            wall, cpu = map(float, line.split()[1:])
            runs[name].append((wall, cpu))
            sites[name] = Path(conf["site_dir"])
            print(f"round {r + 1}, {name} code: {cpu:.1f} CPU s ({1000 * cpu / n_neurons:.2f} ms a neuron), "
                  f"{wall:.0f} s wall, load average {load:.1f}", flush=True)
    ratios = [t[1] / b[1] for t, b in zip(runs["this"], runs["baseline"])]
    print(f"CPU of this code / baseline: median {statistics.median(ratios):.3f} over {rounds} round(s) "
          f"({', '.join(f'{x:.3f}' for x in ratios)})")
    same, differ = 0, []
    for folder in ("neurons/data", "neurons/gluscope/search", "neurons/gluscope/layers"):
        a, b = sites["baseline"] / folder, sites["this"] / folder
        for p in sorted(a.rglob("*")):
            if p.is_file():
                if filecmp.cmp(p, b / p.relative_to(a), shallow=False):
                    same += 1
                else:
                    differ.append(p.relative_to(sites["baseline"]).as_posix())
        missing = {q.relative_to(b) for q in b.rglob("*")} - {q.relative_to(a) for q in a.rglob("*")}
        differ += [f"{folder}/{m.as_posix()} (only in this build)" for m in sorted(missing)]
    print(f"data files, word index and layer tables: {same} files the same bytes, {len(differ)} differ"
          + (": " + ", ".join(differ[:10]) if differ else ""))


def main() -> None:
    from shaped import SHAPES, write_shaped

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    p.add_argument("--file", type=Path, default=None, help="build from this activations file instead")
    p.add_argument("--keep", type=Path, default=None, help="build into this folder and keep it")
    p.add_argument("--workers", type=int, default=None, help="processes writing the data (default: all CPUs)")
    p.add_argument("--pages", type=int, default=5, help="neuron pages to open in Chromium")
    p.add_argument("--config", type=Path, default=ROOT / "mkdocs.yml", help="the site whose theme to use")
    p.add_argument("--neurons", nargs="*", default=None, help="neuron specs to build (default: all)")
    p.add_argument("--search", nargs="*", default=[], help="words whose first results to print (the word index)")
    p.add_argument("--baseline", type=Path, default=None, help="compare the build's CPU with this code (see above)")
    p.add_argument("--rounds", type=int, default=1, help="with --baseline: builds of each")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mkdocs").setLevel(logging.WARNING)
    logging.getLogger("mkdocs.plugins.gluscope").setLevel(logging.INFO)

    import yaml

    from sites import build

    root = args.keep or Path(tempfile.mkdtemp(prefix="gluscope-site-scale-"))
    if not args.keep:
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "site", ignore_errors=True)
    shutil.rmtree(root / ".cache", ignore_errors=True)
    if args.file:
        activations, made = args.file.resolve(), 0.0
    else:
        shape = dict(SHAPES[args.shape])
        if args.layers:
            shape["layers"] = args.layers
        activations = root / "data" / f"{args.shape}.h5"
        t0 = time.perf_counter()
        if not activations.exists():
            activations.parent.mkdir(parents=True, exist_ok=True)
            write_shaped(activations, **shape, log=lambda m: logging.info(m))
        made = time.perf_counter() - t0
    from mkdocs.utils.yaml import yaml_load  # the tags mkdocs.yml may use (!ENV)

    config = yaml_load(args.config.read_text(encoding="utf-8"))
    shutil.copytree(ROOT / "site_src", root / "site_src", dirs_exist_ok=True)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "gluscope" in plugin:
            plugin["gluscope"] = {"activations": str(activations), "neurons": args.neurons or "all", "layout": "light"}
            if args.workers:
                plugin["gluscope"]["workers"] = args.workers
    config["site_dir"] = str(root / "site")
    config["markdown_extensions"] = [e for e in config["markdown_extensions"]
                                     if not (isinstance(e, dict) and "pymdownx.snippets" in e)] + [
        {"pymdownx.snippets": {"base_path": [str(root / "site_src")], "check_paths": True}}]
    (root / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    from mkdocs_gluscope.neurons import parse_neuron_ids
    from mkdocs_gluscope.store import ActivationsFile

    with ActivationsFile(activations) as f:
        layers, d_mlp = f.layers, f.d_mlp
        keys = parse_neuron_ids(args.neurons or "all", f.layers, f.d_mlp, f.experts_index())
    n_neurons = len(keys)
    built = sorted({k[0] for k in keys if len(k) == 2})  # the dense layers built
    if args.baseline:
        print(f"machine: {machine()}; {n_neurons:,} neurons of {activations.name}")
        compare_builds(root / "mkdocs.yml", args.baseline, args.rounds, n_neurons)
        if not args.keep:
            shutil.rmtree(root)
        return
    sampler = MemorySampler()
    sampler.start()
    load = os.getloadavg()
    import resource

    cpu0 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    # The demo's hand-written pages link demo neurons: strict only for the demo's own shape.
    site = build(root / "mkdocs.yml", strict=(layers, d_mlp) == (list(range(30)), 1536))
    total = time.perf_counter() - t0
    cpu = sum(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime for before, after in
              zip(cpu0, [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]))
    sampler.stop.set()
    sampler.join()
    kinds = sizes(site)
    cores = len(os.sched_getaffinity(0))
    print(f"\nmachine: {machine()}; load average {load[0]:.1f} before the build, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"activations file: {activations.name}, {activations.stat().st_size / 1e9:.2f} GB; built {n_neurons:,} neurons"
          + (f" (written in {made:.0f} s)" if made else ""))
    print(f"build: {total:.0f} s ({1000 * total / n_neurons:.2f} ms a neuron), {cpu:.0f} CPU seconds ({cpu / cores:.0f} s "
          f"on {cores} cores to themselves), peak memory {sampler.peak / 1e9:.2f} GB (Pss of the build and its workers)")
    data = {k: v for k, v in kinds.items() if k.startswith("data")}
    rest = {k: v for k, v in kinds.items() if not k.startswith("data")}
    print(f"site without the data files: {sum(rest.values()) / 1e6:.0f} MB ({sum(rest.values()) / n_neurons:.0f} B a neuron)")
    for kind, size in sorted(rest.items(), key=lambda kv: -kv[1]):
        print(f"  {kind}: {size / 1e6:.1f} MB ({size / n_neurons:.0f} B a neuron)")
    print(f"data files: {sum(data.values()) / 1e6:.0f} MB ({sum(data.values()) / n_neurons / 1e3:.2f} KB a neuron)")
    for kind, size in sorted(data.items(), key=lambda kv: -kv[1]):
        print(f"  {kind}: {size / 1e6:.1f} MB ({size / n_neurons / 1e3:.2f} KB a neuron)")
    if args.search:
        import json

        from mkdocs_gluscope.words import query_terms, shard_of

        index = site / "neurons/gluscope/search"
        firsts = json.loads((index / "firsts.json").read_text(encoding="utf-8"))
        for word in args.search:
            term = query_terms(word)[0]
            found = json.loads((index / f"{shard_of(term, firsts)}.json").read_text(encoding="utf-8")).get(term, [])
            print(f"search {word!r}: " + ", ".join(f"{p[0]} (case {p[1]}, score {p[2]}, share {p[3]}, peak {p[4]})"
                                                  for p in found[:5]))
    if args.pages:
        step = max(1, len(built) // args.pages)
        chosen = (built[::step] * args.pages)[:args.pages]
        urls = [f"neurons/L{layer}/N{(7919 * (i + 1)) % d_mlp}/" for i, layer in enumerate(chosen)]
        loads = open_pages(site, urls, f"neurons/L{built[0]}/N1/")
        for warm in (False, True):
            runs = [r for r in loads if r["warm"] == warm]
            print(f"neuron pages in Chromium, {'after another neuron page (shared files cached)' if warm else 'cold'}: "
                  f"shown in median {statistics.median(r['seconds'] for r in runs):.2f} s (max "
                  f"{max(r['seconds'] for r in runs):.2f}), fetched median {statistics.median(r['bytes'] for r in runs) / 1e3:.0f} KB "
                  f"in {statistics.median(r['requests'] for r in runs):.0f} requests, of which the neuron's own page, data "
                  f"and documents {statistics.median(r['own'] for r in runs) / 1e3:.0f} KB (max {max(r['own'] for r in runs) / 1e3:.0f})")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
