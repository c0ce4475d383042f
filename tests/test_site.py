"""The MkDocs plugin: pages, index pages, search, escaping, configuration errors, serve and deploy."""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from mkdocs.exceptions import Abort, PluginError

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.pages import write_markdown_pages
from mkdocs_gluscope.store import CASES
from sites import build_site, write_project
from synthetic import set_attrs, stage_early_list, write_synthetic

UNTRUSTED = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "|",
    "*",
    "`",
    "{{ x }}",
    "[x](javascript:alert(1))",
]


@pytest.fixture
def activations(tmp_path):
    return write_synthetic(tmp_path / "data" / "act.h5", layers=3, d_mlp=10, k=4)


def build_error(tmp_path, plugin, caplog) -> str:
    """The error a failing build reports (the exception and what MkDocs logged)."""
    with pytest.raises((PluginError, Abort, Exception)) as info:
        build_site(tmp_path, plugin)
    return str(info.value) + "\n" + caplog.text


def read(site: Path, rel: str) -> str:
    return (site / rel).read_text(encoding="utf-8")


@pytest.mark.parametrize("distributions", [True, False], ids=["with-distributions", "old-file"])
def test_pages_for_listed_neurons(distributions, tmp_path):
    # An old-style file (collected before histograms, samples and vocabulary) still gives every page.
    write_synthetic(tmp_path / "data" / "act.h5", layers=3, d_mlp=10, k=4, distributions=distributions)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["1.3", "2.*", "0.9"]})
    page = read(site, "neurons/L1/N3/index.html")
    assert "<h1" in page and "Neuron 1.3" in page
    for case in CASES:
        assert case in page
    for hook in ("hook_post", "hook_pre_linear", "hook_pre", "swish"):
        assert hook in page
    assert "synthetic/tiny" in page  # provenance
    assert "cos(w_gate, w_in)" in page and "refactor_glu" in page
    # Examples were inserted after Markdown: colored token spans and the recolor control.
    assert "gluscope:" not in page  # every placeholder was filled
    top_k = page.split('class="gs-examples gs-samples"')[0]
    assert top_k.count('class="gs-ex"') == 4 * 4 * 4
    for section in ("Distributions", "Vocabulary", "Random samples", "Samples by strength"):
        assert (f">{section}<" in page) == distributions, section
    assert ('<svg class="gs-hist"' in page) == distributions and ('class="gs-density"' in page) == distributions
    assert 'class="gs-hook-select"' in page
    assert re.search(r'<span class="c-?\d+ gs-x">', page)
    # Every layer-2 neuron has a page; unlisted neurons have none.
    assert all((site / f"neurons/L2/N{n}/index.html").exists() for n in range(10))
    assert not (site / "neurons/L1/N4").exists()
    # Neighbours are linked; the order is the listed order.
    assert 'href="../../L2/N0/"' in page
    assert 'href="../../L0/N9/"' in read(site, "neurons/L2/N9/index.html")
    # Assets and the documents the examples come from.
    assert (site / "assets/gluscope/gluscope.js").exists()
    assert "assets/gluscope/gluscope.css" in page
    shard = json.loads(read(site, "gluscope/docs/0.json"))
    doc, entry = next(iter(shard.items()))
    assert entry["tokens"][0] == "<s>"


def test_index_and_layer_pages(activations, tmp_path):
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["1.3", "2.5", "2.1"]})
    index = read(site, "neurons/index.html")
    assert index.count("<tr>") == 1 + 3
    assert 'href="L1/N3/"' in index and 'gs-sortable' in index
    layer = read(site, "neurons/L2/index.html")
    assert 'href="N5/"' in layer and 'href="N1/"' in layer and "N3/" not in layer
    home = read(site, "index.html")
    # Neuron pages are out of the navigation, the index is in it.
    assert "neurons/L1/N3/" not in home and 'href="neurons/"' in home


def test_search_finds_neurons_by_id_and_top_token_without_token_html(tmp_path):
    vocab = ["<s>"] + [f" tok{i}" for i in range(1, 50)] + [" zygomorphic"]
    docs = [[0, 50, 3, 4, 50, 6] for _ in range(12)]
    write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=3, k=4, vocab=vocab, docs=docs)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.2"]})
    index = json.loads(read(site, "search/search_index.json"))
    entries = [d for d in index["docs"] if d["location"].startswith("neurons/L0/N2/")]
    assert any(d["title"] == "Neuron 0.2" for d in entries)
    text = " ".join(d["text"] for d in entries)
    assert "zygomorphic" in text or "tok" in text
    assert "gs-toks" not in text and "gs-ex" not in text  # token HTML stays out of the index
    total = sum(len(d["text"]) for d in entries)
    assert total < 8000


def test_untrusted_corpus_text_renders_literally(tmp_path):
    vocab = ["<s>"] + UNTRUSTED + [" ok"]
    docs = [[0] + list(range(1, len(UNTRUSTED) + 2)) * 2 for _ in range(12)]
    titles = [UNTRUSTED[i % len(UNTRUSTED)] for i in range(12)]
    write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2, k=4, vocab=vocab, docs=docs, titles=titles,
                    model="<b>model</b> {{ evil }}")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0", "0.1"]})
    for rel in ("neurons/L0/N0/index.html", "neurons/index.html", "neurons/L0/index.html"):
        page = read(site, rel)
        body = page[page.index('<article'):page.index('</article>')]
        assert "<script>alert" not in body and "<img src=x" not in body and "<img" not in body
        assert 'href="javascript:' not in body
        assert "<b>model</b> {{" not in body and "<em>" not in body
    page = read(site, "neurons/L0/N0/index.html")
    # Shown as text: the characters are there once character references are read.
    assert "<script>alert(1)</script>" in html.unescape(page)
    assert "<img src=x onerror=alert(1)>" in html.unescape(page)
    # The model name shows as text, with the template braces intact.
    assert "<b>model</b> {{ evil }}" in html.unescape(page)
    shard = json.loads(read(site, "gluscope/docs/0.json"))
    assert UNTRUSTED[0] in next(iter(shard.values()))["tokens"]  # raw in JSON, set as textContent


def test_untrusted_text_in_built_page_creates_no_elements(tmp_path):
    from html.parser import HTMLParser

    vocab = ["<s>"] + UNTRUSTED
    docs = [[0] + list(range(1, len(UNTRUSTED) + 1)) * 3 for _ in range(12)]
    write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=1, k=4, vocab=vocab, docs=docs)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]})
    tags, links = [], []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)
            links.extend(v for k, v in attrs if k in ("href", "src") and v)

    Collect().feed(read(site, "neurons/L0/N0/index.html"))
    assert not any(link.startswith("javascript:") for link in links)
    assert "img" not in tags
    assert tags.count("script") == len(re.findall(r"<script", read(site, "index.html")))


@pytest.mark.parametrize(
    "neurons, message",
    [
        (["1.x"], "neuron id '1.x' is malformed"),
        (["7.1"], "layer 7 is out of range; the file has layers 0..2"),
        (["1.10"], "neuron 10 is out of range; layers have neurons 0..9"),
        (["12"], "neuron id '12' is malformed"),
    ],
)
def test_bad_neuron_ids_fail_the_build(neurons, message, activations, tmp_path, caplog):
    assert message in build_error(tmp_path, {"activations": "data/act.h5", "neurons": neurons}, caplog)


def test_missing_file_fails_the_build_and_names_the_command(tmp_path, caplog):
    error = build_error(tmp_path, {"activations": "data/none.h5", "neurons": ["0.0"],
                                   "missing_hint": "gluscope demo --no-site"}, caplog)
    assert "data/none.h5" in error and "gluscope demo --no-site" in error


def test_file_of_another_format_or_version_fails_the_build(activations, tmp_path, caplog):
    other = tmp_path / "data" / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something-else"
    assert "format='something-else'" in build_error(tmp_path, {"activations": "data/other.h5", "neurons": ["0.0"]}, caplog)
    with h5py.File(activations, "a") as f:
        f.attrs["format_version"] = 2
    error = build_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]}, caplog)
    assert "format_version=2" in error and "format_version 1" in error
    (tmp_path / "data" / "text.h5").write_text("not hdf5")
    assert "not an HDF5 file" in build_error(tmp_path, {"activations": "data/text.h5", "neurons": ["0.0"]}, caplog)


def test_bad_plugin_options_fail_the_build(activations, tmp_path, caplog):
    error = build_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"], "color_hook": "hook_nope"}, caplog)
    assert "hook_nope" in error and "color_hook" in error
    error = build_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"], "examples": 0}, caplog)
    assert "examples: 0" in error


def test_whole_layer_all_and_examples_option(activations, tmp_path):
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": "all", "examples": 2,
                                 "url_prefix": "n", "color_hook": "hook_pre"})
    assert len(list((site / "n").glob("L*/N*/index.html"))) == 30
    page = read(site, "n/L0/N0/index.html")
    assert page.split('class="gs-examples gs-samples"')[0].count('class="gs-ex"') == 4 * 4 * 2
    assert '<option value="hook_pre" selected>' in page


def test_examples_option_limits_every_list(activations, tmp_path):
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.1"], "examples": 1})
    page = read(site, "neurons/L0/N1/index.html")
    lists = re.findall(r'<(?:details|div) class="gs-list[^"]*"[^>]*>(.*?)</div>(?:</details>|</div>)', page, re.S)
    assert len(lists) >= 4 * 4 + 4 and all(body.count('class="gs-ex"') <= 1 for body in lists)
    samples = page.split('class="gs-examples gs-samples"')[1].split('class="gs-examples gs-bands"')
    assert samples[0].count('class="gs-ex"') <= 4 and 0 < samples[1].count('class="gs-ex"') <= 4 * 5


def test_serve_watches_the_activations_file(activations, tmp_path):
    from mkdocs.config import load_config

    config = load_config(str(write_project(tmp_path, {"activations": "data/act.h5", "neurons": ["0.1"]})))
    watched = []

    class Server:
        def watch(self, path, *args, **kwargs):
            watched.append(Path(path))

    config = config.plugins.on_config(config)
    config.plugins.on_serve(Server(), config=config, builder=lambda: None)
    assert activations.resolve() in watched


def test_gh_deploy_pushes_the_site_to_a_local_remote(activations, tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--bare", "-q", str(remote)], check=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").mkdir()
    (project / "data" / "act.h5").write_bytes(activations.read_bytes())
    write_project(project, {"activations": "data/act.h5", "neurons": ["1.2"]})
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["remote", "add", "origin", str(remote)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "site"], check=True)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "gh-deploy", "--force", "--no-history"], cwd=project, capture_output=True,
                            text=True, env={**__import__("os").environ, "GIT_AUTHOR_NAME": "t",
                                            "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                                            "GIT_COMMITTER_EMAIL": "t@example.com"})
    assert result.returncode == 0, result.stderr
    files = subprocess.run(["git", "-C", str(remote), "ls-tree", "-r", "--name-only", "gh-pages"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert "neurons/L1/N2/index.html" in files and "neurons/index.html" in files


def test_pages_command_writes_markdown(activations, tmp_path, capsys):
    out = tmp_path / "md"
    code = main(["pages", str(activations), "--neurons", "0.1", "2.*", "--out", str(out)])
    assert code == 0
    page = (out / "neurons/L0/N1.md").read_text()
    assert page.startswith("# Neuron 0.1") and 'class="gs-ex"' in page and "gluscope:examples" not in page
    assert len(list(out.glob("neurons/L2/N*.md"))) == 10
    assert (out / "neurons/index.md").exists() and (out / "assets/gluscope/gluscope.js").exists()
    code = main(["pages", str(activations), "--neurons", "9.9", "--out", str(out)])
    assert code == 2 and "layer 9 is out of range" in capsys.readouterr().err


def test_light_dependencies_suffice(activations, tmp_path):
    """The plugin builds a site with torch unimportable (a laptop or CI without the [collect] extra)."""
    import sys
    import textwrap

    write_project(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]})
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'transformer_lens', 'datasets'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from mkdocs.__main__ import cli
        sys.argv = ['mkdocs', 'build', '--strict', '-q', '-f', {str(tmp_path / 'mkdocs.yml')!r}]
        cli()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site/neurons/L0/N0/index.html").exists()


# -- Trust (issue 7) --------------------------------------------------------------------------------

def config_error(tmp_path, plugin, caplog) -> str:
    """The error of loading mkdocs.yml: options are checked when the config loads, before any build."""
    from mkdocs.config import load_config

    with pytest.raises(Abort):
        load_config(str(write_project(tmp_path, plugin)))
    return caplog.text


def rows(page: str) -> list[dict]:
    """Example rows of a page: their data attributes and token spans (class, text)."""
    out = []
    for attrs, body in re.findall(r'<div class="gs-ex"([^>]*)>(.*?)</div>', page):
        toks = re.search(r'<span class="gs-toks">(.*)</span><button', body).group(1)
        out.append({"attrs": dict(re.findall(r'(data-[\w-]+)="([^"]*)"', attrs)), "body": body,
                    "spans": [(cls, html.unescape(text)) for cls, text in
                              re.findall(r'<span class="([^"]*)">(.*?)</span>', toks)]})
    return out


def float16s(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f2").astype(np.float64)


@pytest.mark.parametrize("neurons, shown", [([1.10, 0.20], "1.1"), ([3], "3"), (2, "2")])
def test_yaml_numbers_as_neuron_ids_are_refused(neurons, shown, activations, tmp_path, caplog):
    # Unquoted in mkdocs.yml, 1.10 is the float 1.1: refused at config load, never read as neuron 1.1.
    error = config_error(tmp_path, {"activations": "data/act.h5", "neurons": neurons}, caplog)
    assert "neurons" in error and f"{shown} is a YAML number" in error and '"1.10"' in error
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("prefix", ["../../../escaped", "/abs/neurons", "", "/", "a/../../b", "a\\b", "C:/x", "./.",
                                    'a"b', "a b", "n<script>", "n?x", "n#x", "n%20", "névrons"])
def test_url_prefix_must_stay_inside_the_site(prefix, activations, tmp_path, caplog):
    error = config_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"], "url_prefix": prefix}, caplog)
    assert "url_prefix" in error and repr(prefix) in error and "relative path inside the site" in error
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "site").exists()


def test_url_prefix_may_be_a_nested_folder(activations, tmp_path):
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"], "url_prefix": "docs/neurons/"})
    assert (site / "docs/neurons/L0/N0/index.html").exists()


def test_activations_option_must_name_a_file(activations, tmp_path, caplog):
    error = config_error(tmp_path, {"neurons": ["0.0"]}, caplog)
    assert "'activations'" in error and "Required" in error
    caplog.clear()
    error = config_error(tmp_path, {"activations": "data", "neurons": ["0.0"]}, caplog)
    assert "'activations'" in error and "is a folder" in error and "gluscope collect" in error


def test_examples_below_one_are_refused_by_plugin_and_pages_command(activations, tmp_path, caplog, capsys):
    for bad in (0, -2, True):
        caplog.clear()
        error = config_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"], "examples": bad}, caplog)
        assert "'examples'" in error and f"{bad!r}" in error and "1 or more" in error
    with pytest.raises(GluscopeError, match="examples: 0; expected a whole number, 1 or more"):
        write_markdown_pages(activations, ["0.0"], tmp_path / "md", examples=0)
    assert main(["pages", str(activations), "--neurons", "0.0", "--out", str(tmp_path / "md"), "--examples", "0"]) == 2
    assert "examples: 0" in capsys.readouterr().err


TEMPLATES = ["{{ 7*7 }}", "{% if true %}x{% endif %}", "{# c #}"]


def template_corpus(path: Path) -> Path:
    vocab = ["<s>"] + TEMPLATES + [" ok"]
    docs = [[0] + [1, 4, 2, 4, 3, 4] * 3 for _ in range(12)]
    return write_synthetic(path, layers=1, d_mlp=2, k=4, vocab=vocab, docs=docs, model="{{ 7*7 }} model",
                           dataset="{% if true %}x{% endif %} data", titles=[f"{TEMPLATES[d % 3]} title" for d in range(12)])


def test_template_syntax_in_the_corpus_reaches_no_template_engine(tmp_path):
    """A site with mkdocs-macros (Jinja) evaluates {{ }}, {% %} and {# #} in every page's Markdown."""
    pytest.importorskip("mkdocs_macros")
    template_corpus(tmp_path / "data" / "act.h5")
    write_project(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0", "0.1"]},
                  extra={"plugins": ["search", "macros", {"gluscope": {"activations": "data/act.h5",
                                                                         "neurons": ["0.0", "0.1"]}}]})
    (tmp_path / "docs" / "macro.md").write_text("# Macro\n\nseven sevens: {{ 7*7 }}\n")
    from sites import build

    site = build(tmp_path / "mkdocs.yml")
    assert "seven sevens: 49" in read(site, "macro/index.html")  # the engine runs on this site
    labels = set(TEMPLATES) | {"<s>", "ok"}
    for rel in ("neurons/L0/N0/index.html", "neurons/index.html", "neurons/L0/index.html"):
        page = read(site, rel)
        text = html.unescape(page)
        assert "49 model" not in text and ("{{ 7*7 }} model" in text or rel.endswith("L0/index.html")), rel
        tops = [html.unescape(re.sub(r"<[^>]+>", "", t)) for t in re.findall(r'<code class="gs-top[^"]*"[^>]*>(.*?)</code>', page)]
        assert set(tops) <= labels | {"–"} and (tops or "L0/N0" in rel), (rel, tops)
    page = read(site, "neurons/L0/N0/index.html")
    spans = [text for row in rows(page) for _, text in row["spans"]]
    assert spans and set(spans) <= labels | {" ok"}
    text = html.unescape(page)
    for literal in TEMPLATES:
        assert literal in text
    assert "{% if true %}x{% endif %} data" in text and "{# c #} title" in text
    top_line = re.search(r"<strong>gate\+_in\+</strong>.*?</li>", text).group(0)  # the "Top tokens" line
    assert any(t.strip() in top_line for t in TEMPLATES), top_line


def test_pages_command_markdown_holds_no_template_syntax(tmp_path):
    activations = template_corpus(tmp_path / "act.h5")
    written = write_markdown_pages(activations, ["0.0", "0.1"], tmp_path / "md")
    markdown = [p for p in written if p.suffix == ".md"]
    assert len(markdown) == 4
    for path in markdown:
        text = path.read_text(encoding="utf-8")
        for syntax in ("{{", "{%", "{#"):
            assert syntax not in text, (path.name, syntax)
    page = html.unescape((tmp_path / "md/neurons/L0/N0.md").read_text(encoding="utf-8"))
    assert "{% if true %}x{% endif %}" in page and "{# c #} title" in page


def test_pages_name_local_models_and_datasets_by_file_name(tmp_path):
    write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2, model="/home/alice/m/SmolLM.gguf",
                    dataset="/home/alice/d/a.jsonl, /home/alice/d/b.jsonl")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]})
    for path in site.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".json", ".xml"):
            assert "/home/alice" not in html.unescape(path.read_text(encoding="utf-8")), path
    for rel in ("neurons/L0/N0/index.html", "neurons/index.html"):
        text = html.unescape(read(site, rel))
        assert "SmolLM.gguf" in text and "a.jsonl, b.jsonl" in text
    with h5py.File(tmp_path / "data" / "act.h5") as f:
        assert f.attrs["model"] == "/home/alice/m/SmolLM.gguf"  # the file keeps full provenance


def test_act_fn_from_the_table_gives_the_page_its_act_values(tmp_path):
    from mkdocs_gluscope.pages import SitePages
    from mkdocs_gluscope.store import ActivationsFile

    path = write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2, act_fn="relu")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.1"]})
    page = read(site, "neurons/L0/N1/index.html")
    assert "data-act=" not in page  # the browser is given values, not an activation name
    checked = 0
    for row in rows(page):
        g, s = float16s(row["attrs"]["data-g"]), float16s(row["attrs"]["data-s"])
        inside = ~np.isnan(g)
        assert np.allclose(s[inside], np.maximum(g[inside], 0), rtol=1e-3, atol=1e-3)
        checked += int((g[inside] < 0).sum())
    assert checked > 0  # negative gates were there, and act(gate) was 0 for them

    def swish(act_fn: str) -> tuple[np.ndarray, np.ndarray]:
        set_attrs(path, act_fn=act_fn)
        with ActivationsFile(path) as f:
            row = rows(SitePages(f, ["0.1"]).examples_html(0, 1, site_root=""))[0]["attrs"]
        return float16s(row["data-g"]), float16s(row["data-s"])

    g, exact = swish("gelu")
    _, tanh = swish("gelu_pytorch_tanh")
    inside = ~np.isnan(g)
    erf = np.array([0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in g[inside]])
    assert np.allclose(exact[inside], erf, rtol=2e-3, atol=1e-3)
    assert not np.array_equal(exact[inside], tanh[inside])


def test_unknown_activation_fails_build_and_pages_command(tmp_path, caplog):
    path = write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2)
    set_attrs(path, act_fn="softplus")
    error = build_error(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]}, caplog)
    for text in ("act.h5", "'softplus'", "silu", "gelu_pytorch_tanh", "relu"):
        assert text in error
    assert "Traceback" not in error
    with pytest.raises(GluscopeError, match="'softplus' is not supported"):
        write_markdown_pages(path, ["0.0"], tmp_path / "md")


def sink_file(path: Path, **kwargs) -> Path:
    """A list (case gate+_in+, hook_post) of neuron 0.0 whose examples sit at the start of documents, with a
    huge BOS value in every window and one attention sink, and one later example."""
    docs = [[0] + [(d + t) % 50 + 1 for t in range(40)] for d in range(12)]
    write_synthetic(path, layers=1, d_mlp=2, k=8, before=5, after=2, docs=docs, **kwargs)
    stage_early_list(path, positions=[1, 2, 3, 4, 5, 6, 7, 20], values=[3600, 40, 30, 20, 10, 5, 3, 0.9])
    return path


def test_color_scale_ignores_bos_and_one_sink(tmp_path):
    sink_file(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]})
    page = read(site, "neurons/L0/N0/index.html")
    staged = rows(page)[:8]
    for row in staged:
        first = int(row["attrs"]["data-first"])
        pos, centre = int(row["attrs"]["data-pos"]), 5
        for n, (cls, token) in enumerate(row["spans"]):
            position = pos + first + n - centre
            level = int(re.match(r"c(-?\d+)", cls).group(1))
            if position == 0:
                assert token == "<s>" and level == 0 and "gs-nc" in cls  # BOS: not counted, not colored
            elif not (row is staged[0] and position == 1):
                # an ordinary token of value ~0.73 in a list whose BOS is 3600 and one sink 400
                assert level >= 5, (pos, position, cls)
    scales = json.loads(html.unescape(re.search(r'<details class="gs-list" data-scale="([^"]*)"', page).group(1)))
    assert 0.5 < scales[0] < 1.0  # hook_post's scale: data-scale holds one per hook, in HOOKS order


def test_start_of_document_examples_are_marked(tmp_path):
    sink_file(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0"]})
    page = read(site, "neurons/L0/N0/index.html")
    staged = rows(page)[:8]
    marked = ["gs-early" in row["body"] for row in staged]
    assert marked == [True] * 7 + [False]
    assert "attention sink" in re.search(r'class="gs-early" title="([^"]*)"', page).group(1)
    summary = re.search(r'<details class="gs-list"[^>]*><summary>(.*?)</summary>', page).group(1)
    assert "3600" in summary and "start of document" in summary and "0.9" in summary


def test_nonfinite_values_are_reported_on_the_page(tmp_path):
    counts = np.zeros((1, 2, 5), dtype=np.int64)
    counts[0, 1] = [3, 0, 0, 2, 5]
    write_synthetic(tmp_path / "data" / "act.h5", layers=1, d_mlp=2, nonfinite=counts)
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0", "0.1"]})
    text = re.sub(r"<[^>]+>", "", read(site, "neurons/L0/N1/index.html"))
    assert "Non-finite values" in text
    assert "10 positions" in text and "excluded from every statistic" in text
    for part in ("3 in gate+_in+", "2 in gate-_in-", "5 with no case"):
        assert part in html.unescape(text), part
    assert "Non-finite" not in read(site, "neurons/L0/N0/index.html")


def test_output_into_a_closed_pipe_ends_quietly(activations, monkeypatch):
    """Found: `gluscope pick FILE | head` printed a BrokenPipeError traceback."""
    import os
    import sys

    from mkdocs_gluscope.cli import main

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) has gone
    stream = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["pick", str(activations)]) == 141
    finally:
        stream.close()


def applause_file(path: Path) -> Path:
    """Neuron 0.0 peaks on the piece "ause" of "Applause" in every example, as the demo's 28.473 does."""
    vocab = ["<s>", " We", " thank", " (", "Appl", "ause", ")", " you"]
    docs = [[0, 1, 2, 3, 4, 5, 6, 7, 1, 2] for _ in range(12)]
    write_synthetic(path, layers=1, d_mlp=2, k=4, vocab=vocab, docs=docs)
    with h5py.File(path, "a") as f:
        pos = f["top/pos"][...]
        pos[0, 0] = 5
        f["top/pos"][...] = pos
    return path


def test_search_finds_whole_words_and_snippets_leave_out_the_table(tmp_path):
    """Issue 11: `applause` found nothing because only the peak piece `ause` was indexed, and result
    snippets ran the summary table's numbers together ("5.14807.6513.524.654.2")."""
    applause_file(tmp_path / "data" / "act.h5")
    site = build_site(tmp_path, {"activations": "data/act.h5", "neurons": ["0.0", "0.1"]})
    index = json.loads(read(site, "search/search_index.json"))
    text = " ".join(d["text"] for d in index["docs"] if d["location"].startswith("neurons/L0/N0/"))
    assert re.search(r"\bApplause\b", text), text
    assert "frequency" not in text and "hook_post = act" not in text  # the summary table is not indexed
    table = read(site, "neurons/index.html")
    cell = re.search(r'<code class="gs-top gs-case0"[^>]*>(.*?)</code>', table).group(1)
    assert cell == 'Appl<span class="gs-peak">ause</span>'
