"""The whole product on a tiny model: collect, build a site, read a neuron page; the docs' claims."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mkdocs_gluscope.cli import cli_reference, main
from mkdocs_gluscope.store import ActivationsFile
from sites import build_site

REPO = Path(__file__).resolve().parent.parent


def test_collect_then_site(model_factory, corpus_files, tmp_path, capsys):
    out = tmp_path / "data" / "tiny.h5"
    code = main(["collect", "--model", str(model_factory("llama")), "--dataset", *map(str, corpus_files),
                 "--out", str(out), "--k", "4", "--no-progress", "--device", "cpu"])  # compiled statistics
    assert code == 0, capsys.readouterr().err
    with ActivationsFile(out) as f:
        n = f.neuron(1, 7)
        busiest = int(np.argmax(n.count))
        top_doc = int(n.top_doc[busiest, 0, 0])
        top_token = f.vocab[int(f.document(top_doc)[n.top_pos[busiest, 0, 0]])]
    site = build_site(tmp_path, {"activations": "data/tiny.h5", "neurons": ["1.7", "0.*"]})
    page = (site / "neurons/L1/N7/index.html").read_text()
    assert "Neuron 1.7" in page and f"doc {top_doc}" in page
    from mkdocs_gluscope.render import token_html

    assert token_html(top_token) in page
    assert len(list(site.glob("neurons/L0/N*/index.html"))) == 48


def test_analysis_example_runs(model_factory, corpus_files, tmp_path):
    from collect.run import CollectConfig, collect

    out = collect(CollectConfig(model=str(model_factory("llama")), dataset=[str(p) for p in corpus_files],
                                out=tmp_path / "a.h5", k=4, compile=False, progress=False, device="cpu"))
    result = subprocess.run([sys.executable, str(REPO / "site_src/examples/analysis.py"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "96 neurons: corr(cos(w_gate, w_in), freq(gate-_in-)) = " in result.stdout
    result = subprocess.run([sys.executable, str(REPO / "site_src/examples/bimodal.py"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert " of 96 neurons have a two-peaked gate-_in- histogram of |post|" in result.stdout


def test_cli_reference_page_is_current():
    page = (REPO / "site_src/cli.md").read_text(encoding="utf-8")
    assert cli_reference() in page, "regenerate site_src/cli.md from mkdocs_gluscope.cli.cli_reference()"


def test_demo_site_config_lists_valid_neurons():
    from mkdocs.utils.yaml import yaml_load

    with open(REPO / "mkdocs.yml", encoding="utf-8") as source:
        config = yaml_load(source)  # MkDocs' loader: the file uses its !ENV tag
    plugin = next(p["gluscope"] for p in config["plugins"] if isinstance(p, dict) and "gluscope" in p)
    from mkdocs_gluscope.neurons import parse_neuron_ids

    picked = parse_neuron_ids(plugin["neurons"], list(range(30)), 1536)  # SmolLM2-135M's shape
    assert 30 <= len(picked) <= 60
    assert config["docs_dir"] == "site_src"


@pytest.mark.demo
def test_demo_end_to_end(tmp_path):
    """The README's first command on a small budget: fetch SmolLM2 and the addresses from the
    package registries, collect, build the repository's site with --strict."""
    from collect.model import dtype_name, resolve_dtype

    project = tmp_path / "project"
    shutil.copytree(REPO / "site_src", project / "site_src")
    shutil.copy(REPO / "mkdocs.yml", project / "mkdocs.yml")
    env = {**os.environ, "GLUSCOPE_CACHE": os.environ.get("GLUSCOPE_CACHE", str(tmp_path / "cache"))}
    result = subprocess.run([sys.executable, "-m", "mkdocs_gluscope.cli", "demo", "--max-tokens", "12k",
                             "--build"], cwd=project, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    with ActivationsFile(project / "data/demo.h5") as f:
        assert f.n_layers == 30 and f.d_mlp == 1536 and f.attrs["dtype_requested"] == "auto"
        assert f.attrs["dtype"] == dtype_name(resolve_dtype("auto"))  # float32 unless bfloat16 is native
        assert "State of the Union" in f.attrs["dataset"] and "·" in (f.doc_title(0) or "")
    pages = list((project / "site/neurons").glob("L*/N*/index.html"))
    assert len(pages) >= 30
    assert "Neuron" in pages[0].read_text()
    # The demo checked the model for the probe: the user's first probe of it imports no transformers.
    assert "it will run from its recipe" in result.stderr
    with ActivationsFile(project / "data/demo.h5") as f:
        model = f.attrs["model_path"]
    script = ("import sys; from mkdocs_gluscope.cli import main; code = main(sys.argv[1:]); "
              "print('transformers imported:', 'transformers' in sys.modules); sys.exit(code)")
    probe = subprocess.run([sys.executable, "-c", script, "probe", "--model", model, "--file", "data/demo.h5",
                            "--neurons", "5.10", "--no-color", "The union of the states."], cwd=project, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "neuron 5.10" in probe.stdout and probe.stdout.endswith("transformers imported: False\n")


def test_pick_proposes_valid_neurons_with_reasons(model_factory, corpus_files, tmp_path, capsys):
    from collect.run import CollectConfig, collect
    from mkdocs_gluscope.neurons import parse_neuron_ids
    from mkdocs_gluscope.pick import pick_neurons

    out = collect(CollectConfig(model=str(model_factory("llama")), dataset=[str(p) for p in corpus_files],
                                out=tmp_path / "p.h5", k=2, compile=False, progress=False, device="cpu"))
    with ActivationsFile(out) as f:
        picks = pick_neurons(f, per_layer=1, mix=3, rare=0.5, per_case=0)
        every_case = pick_neurons(f, per_layer=1, mix=3, rare=0.5, per_case=2)
        freq = f.frequency()
    assert 3 <= len(picks) <= 5 and len({p.id for p in picks}) == len(picks)
    # --per-case adds standouts of the cases the per-layer picks left out, never the same neuron twice.
    assert {p.id for p in picks} <= {p.id for p in every_case} and len({p.id for p in every_case}) == len(every_case)
    assert all(sum(p.reason.startswith(f"rare {case} ") for p in every_case) >= 2
               for case in ("gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-")
               if (freq[..., ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"].index(case)] < 0.5).sum() >= 2)
    assert parse_neuron_ids([p.id for p in picks], [0, 1], 48)
    mixes = [p for p in picks if p.reason.startswith("unusual case mix")]
    assert len({p.layer for p in mixes}) == len(mixes)  # at most one per layer
    for p in picks:
        if p.reason.startswith("rare"):
            case = p.reason.split()[1]
            assert freq[p.layer, p.neuron, ["gate+_in+", "gate+_in-", "gate-_in+", "gate-_in-"].index(case)] < 0.5
    assert main(["pick", str(out), "--mix", "1"]) == 0
    assert '- "' in capsys.readouterr().out


def documented_commands(name: str) -> list[list[str]]:
    """Every complete ``gluscope NAME`` command in the README and the site's pages (torchrun's
    included), as argument lists: shell line continuations joined, the ``$`` prompt and trailing
    comments dropped, commands that elide options with ``...`` left out."""
    import re
    import shlex

    root = Path(__file__).resolve().parent.parent
    commands = []
    for page in [root / "README.md", *sorted((root / "site_src").glob("*.md"))]:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(rf"(?:^|\$ |; |do |--no-python )\s*(?:CUDA_VISIBLE_DEVICES=\S+ )?gluscope {name}\b(.*)",
                              line)
            if match and "..." not in match.group(1):  # "gluscope collect ... --layers 0-15" elides on purpose
                words = shlex.split(match.group(1).split(" #")[0].split(" &")[0].split(";")[0])
                commands.append([name, *(re.sub(r"\$\{?\w+\}?", "0", w) for w in words)])  # $i of a loop: 0
    return commands


def test_documented_collect_commands_parse_and_the_olmo_one_prepends_a_bos():
    """Finding: the README's OLMo command ran with --bos auto, while OLMo's tokenizer adds no BOS
    and the paper prepends one (the EOS) to every document."""
    from mkdocs_gluscope.cli import build_parser

    commands = documented_commands("collect")
    assert len(commands) >= 2
    olmo = 0
    for argv in commands:
        args = build_parser().parse_args(argv)
        if "OLMo" in args.model:
            olmo += 1
            assert args.bos == "always", argv
    assert olmo >= 1
