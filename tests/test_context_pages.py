"""A neuron in context on its page: related neurons, effects, and your own text on a served site."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.render import fmt
from sites import build, build_site, serve_folder, write_project

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def project(model_factory, corpus_files, tmp_path_factory):
    """A tiny model's file with effects and both parts of related/, and a site of all its neurons that
    names the model as probe_model."""
    from collect.run import collect
    from test_collect import small_config

    root = tmp_path_factory.mktemp("context-site")
    folder = model_factory("llama")
    path = collect(small_config(folder, corpus_files, root / "data" / "act.h5", batch_tokens=128))
    assert main(["related", str(path), "--model", str(folder)]) == 0
    config = write_project(root, {"activations": "data/act.h5", "neurons": ["0.*", "1.*"], "probe_model": str(folder)})
    return root, config, folder, path


def test_built_pages_show_related_neurons_and_effects_and_no_text_box(project):
    root, config, _, _ = project
    site = build(config)
    page = (site / "neurons" / "L0" / "N3" / "index.html").read_text(encoding="utf-8")
    assert "Related neurons" in page and "Feeds" in page and "Writes alike" in page and "Fires with" in page
    # Related neurons link to their pages (MkDocs resolved the links: no .md left).
    links = re.findall(r'href="(\.\./\.\./L1/N\d+/)"', page)
    assert links and all((site / "neurons" / "L0" / "N3" / link / "index.html").resolve().exists() for link in links)
    effects = re.findall(r'<span class="gs-eff" title="([^"]*)">([^<]*)</span>', page)
    assert effects and any("raises most" in title for title, _ in effects)
    assert "gs-probe" not in page.split("</article>")[0] and "Your own text" not in page  # a built site: no box


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium package is not installed")
def test_served_page_runs_your_own_text_through_the_model(project, output_dir):
    from playwright.sync_api import sync_playwright

    from collect.probe import Prober
    from mkdocs_gluscope.store import ActivationsFile

    root, config, folder, path = project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    text = "Once again the council met, and the cat sat on the mat."
    # The reference values first: opening the activations file while serving could start a rebuild.
    with ActivationsFile(path) as f:
        prober = Prober.load(str(folder), bos=str(f.attrs["bos"]))
    probed = prober.run(text, [(1, 3)])
    # The server's log goes to a file: a pipe nobody reads would block it once full.
    log = tempfile.TemporaryFile(mode="w+")
    # Ctrl+C as a terminal sends it: SIGINT at its default (a shell's background job starts with it ignored,
    # and Python then installs no KeyboardInterrupt, so mkdocs serve would never stop).
    serve = subprocess.Popen([sys.executable, "-m", "mkdocs", "serve", "-f", str(config), "--dev-addr",
                              f"127.0.0.1:{port}", "--no-livereload"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=log, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "neurons/L1/N3/", timeout=2)
                break
            except OSError:
                assert serve.poll() is None, log.seek(0) or log.read()
                time.sleep(0.5)
        errors: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "neurons/L1/N3/")
            page.locator(".gs-probe-text").fill(text)
            page.locator(".gs-probe-run").click()
            row = page.locator(".gs-probe-result .gs-ex")
            row.wait_for(state="visible", timeout=60_000)
            peak = probed.peak(0)
            assert row.locator(".gs-val").inner_text() == fmt(probed.post[0, peak])
            tokens = row.locator(".gs-toks > span")
            assert tokens.count() == len(probed.tokens) and "gs-x" in tokens.nth(peak).get_attribute("class")
            tokens.nth(peak).hover()
            tip = page.locator(".gs-tip")
            tip.wait_for(state="visible")
            assert "post" in tip.inner_text() and "case" in tip.inner_text()
            page.locator(".gs-probe").scroll_into_view_if_needed()
            page.screenshot(path=str(output_dir / "probe-box.png"))
            page.locator("h2#related-neurons").scroll_into_view_if_needed()
            page.screenshot(path=str(output_dir / "related-neurons.png"))
            probe_url = page.locator(".gs-probe").get_attribute("data-url")
            assert probe_url.startswith("http://127.0.0.1:")
            browser.close()
        assert not errors, errors
        # The answer names this site's origin only (CORS), and another site's request is refused.
        body = b'{"text": "a cat", "neuron": "1.3"}'
        for origin, status in ((f"http://127.0.0.1:{port}", 200), ("http://example.com", 403)):
            request = urllib.request.Request(probe_url, data=body, headers={"Origin": origin, "Content-Type": "text/plain"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    got, allowed = r.status, r.headers.get("Access-Control-Allow-Origin")
            except urllib.error.HTTPError as e:
                got, allowed = e.code, e.headers.get("Access-Control-Allow-Origin")
            assert got == status and allowed == (origin if status == 200 else None)
    finally:
        serve.send_signal(signal.SIGINT)  # mkdocs serve shuts its plugins down, which stop the probe server
        try:
            serve.wait(timeout=120)
        finally:
            if serve.poll() is None:
                serve.kill()
            log.seek(0)
            print(log.read()[-3000:])  # shown with a failure
            log.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(probe_url.replace("/probe", "/health"), timeout=5)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium package is not installed")
def test_light_pages_show_related_neurons_and_effects(project, tmp_path, output_dir):
    """The light layout draws both from the neuron's data file: the related lists as links to pages that
    exist, and each example's effect as the full page computes it."""
    from playwright.sync_api import sync_playwright

    from mkdocs_gluscope.context import effects_context
    from mkdocs_gluscope.render import page_windows
    from mkdocs_gluscope.store import ActivationsFile

    _, _, _, path = project
    site = build_site(tmp_path, {"activations": str(path), "neurons": ["0.*", "1.*"], "layout": "light",
                                 "workers": 1})
    with ActivationsFile(path) as f:
        data = f.neuron(0, 3)
        expected = effects_context(data, page_windows(data)["hook_post"])["effect"]
    errors: list[str] = []
    with serve_folder(site) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "neurons/L0/N3/")
        page.wait_for_selector(".gs-light[data-ready='2']", timeout=30_000)
        text = page.locator(".gs-light").inner_text()
        assert "Related neurons" in text and "Feeds" in text and "Writes alike" in text and "Fires with" in text
        links = page.locator(".gs-light table.gs-related a").evaluate_all("els => els.map(e => e.href)")
        assert links and all((site / (href[len(base):] + "index.html")).exists() for href in links), links
        listed = page.locator(".gs-examples.gs-top details.gs-list[open]")
        c, h = int(listed.get_attribute("data-case")), int(listed.get_attribute("data-hook"))
        cells = listed.locator(".gs-ex .gs-eff")
        cells.first.wait_for()
        shown = [float(x.replace("−", "-")) if x != "–" else None for x in cells.all_inner_texts()]
        want = expected[c][h][:len(shown)]
        assert shown and all((a is None) == (b is None) for a, b in zip(shown, want))
        assert all(a == pytest.approx(b, rel=6e-3, abs=1e-6) for a, b in zip(shown, want) if a is not None)
        assert "raises most" in cells.first.get_attribute("title")
        page.locator("h2#related-neurons").scroll_into_view_if_needed()
        page.screenshot(path=str(output_dir / "light-related-neurons.png"))
        listed.scroll_into_view_if_needed()
        page.screenshot(path=str(output_dir / "light-effects.png"))
        browser.close()
    assert not errors, errors


def test_export_carries_effects_and_related_neurons(project, tmp_path):
    datasets = pytest.importorskip("datasets")
    from mkdocs_gluscope.context import neuron_context
    from mkdocs_gluscope.render import page_windows
    from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile

    _, _, _, path = project
    assert main(["export", str(path), "--out", str(tmp_path / "ds")]) == 0
    table = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "cache"))
    with ActivationsFile(path) as f:
        for layer, n in ((0, 3), (1, 7)):
            data = f.neuron(layer, n)
            context = neuron_context(data, page_windows(data)["hook_post"])
            row = table[layer * f.d_mlp + n]
            for c, case in enumerate(CASES):
                for h, hook in enumerate(HOOKS):  # the page's numbers, every list
                    page = [np.nan if x is None else x for x in context["effects"]["effect"][c][h]]
                    np.testing.assert_allclose(row[f"{case}_{hook}_max_effects"], page, rtol=1e-5, atol=1e-7)
                    assert row[f"{case}_{hook}_max_next_tokens"] == context["effects"]["next"][c][h]
                shared = context["related"]["shared"][case]
                assert row[f"{case}_related_shared"] == [e["id"] for e in shared]
                assert row[f"{case}_related_shared_cases"] == [e["case"] for e in shared]
            feeds = context["related"]["feeds"][0]["sides"]  # post > 0: gate+ is the top of the gate reads
            assert row["related_feeds_gate_top"] == [e["id"] for e in feeds["gate+"]]
            assert row["related_feeds_in_bottom_scores"] == pytest.approx([e["score"] for e in feeds["in-"]])
            assert row["related_alike_top"] == [e["id"] for e in context["related"]["alike"]]
