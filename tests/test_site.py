"""The MkDocs plugin: pages, index pages, search, escaping, configuration errors, serve and deploy."""

from __future__ import annotations

import json
import sys
import re
import subprocess
from pathlib import Path

import h5py
import pytest
from mkdocs.exceptions import Abort, PluginError

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.store import CASES
from sites import build_site, write_project
from synthetic import write_synthetic

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


def test_pages_for_listed_neurons(activations, tmp_path):
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
    assert "gluscope:examples" not in page
    assert page.count('class="gs-ex"') == 4 * 4 * 4
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
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # The model name shows as text, with the template braces intact.
    assert "&lt;b&gt;model&lt;/b&gt;" in page.replace("&#60;", "&lt;").replace("&#62;", "&gt;")
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
    assert page.count('class="gs-ex"') == 4 * 4 * 2
    assert '<option value="hook_pre" selected>' in page


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
