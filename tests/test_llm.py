"""An OpenAI-compatible server as explainer and simulator (``gluscope explain --llm``): a stand-in
server that speaks the protocol over real HTTP, and llama.cpp's server where it is installed."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mkdocs_gluscope.cli import main
from mkdocs_gluscope.explanations import neuron_explanations
from mkdocs_gluscope.store import CASES, ActivationsFile
from test_explain import PLANTED, planted  # noqa: F401  (the planted-neuron model and file)


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers as a model that knows the planted neuron would: the label names "again" when the
    examples show it, and the simulation marks exactly the tokens holding "again"."""

    requests: list[dict] = []

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "stand-in-1", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        prompt = body["messages"][0]["content"]
        if "Predict how active" in prompt:
            tokens = prompt.rstrip("\n").rsplit("\n\n", 1)[1].split("\n")
            knows = "the word again" in prompt  # the label it was given
            answer = "\n".join(f"{t}\t{10 if knows and 'again' in t else 0}" for t in tokens)
        else:
            answer = "the word again\n" if "again\t10" in prompt else "nothing in particular"
        self._send({"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def log_message(self, *args) -> None:
        pass


def _serve():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_server_explains_and_simulates_with_the_same_scoring(planted, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "act.h5"
    shutil.copy(planted["file"], path)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("explain", "simulate"):  # a user's edited prompts: the server sees them
        text = (Path(__file__).parent.parent / "mkdocs_gluscope/prompts" / f"{name}.txt").read_text()
        (prompts / f"{name}.txt").write_text("EDITED " + text)
    server = _serve()
    _Answers.requests.clear()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        layer, neuron = PLANTED
        code = main(["explain", str(path), "--neurons", f"{layer}.{neuron}", "--llm", url, "--prompts", str(prompts),
                     "--score", "--model", str(planted["model"]), "--dataset", str(planted["held_out"]),
                     "--no-progress"])
        assert code == 0, capsys.readouterr().err
    finally:
        server.shutdown()
    assert all(r["messages"][0]["content"].startswith("EDITED ") and r["temperature"] == 0 for r in _Answers.requests)
    with ActivationsFile(path) as f:
        cases = neuron_explanations(f, layer, neuron)
        attrs = dict(f.file["explanations"].attrs)
    fires = cases[CASES.index("gate+_in+")]
    assert fires.label == "the word again" and fires.method == "llm stand-in-1"
    assert fires.score > 0.95 and fires.precision > 0.9 and fires.recall > 0.9, fires
    assert all(c.label == "nothing in particular" and c.score == 0 for c in cases[1:] if c.label), cases
    assert attrs["explainer"] == "llm stand-in-1" and attrs["score_simulator"] == "llm stand-in-1"


def test_an_unreachable_server_is_one_error_line(tmp_path, capsys):
    from synthetic import write_synthetic

    path = write_synthetic(tmp_path / "act.h5", layers=1, d_mlp=4, k=4, before=3, after=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert main(["explain", str(path), "--llm", f"http://127.0.0.1:{port}/v1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gluscope: error: --llm http://127.0.0.1:") and err.count("\n") == 1, err


def _llama_python() -> str | None:
    """An interpreter with llama-cpp-python's server: this one, or GLUSCOPE_LLAMA_PYTHON's."""
    python = os.environ.get("GLUSCOPE_LLAMA_PYTHON", sys.executable)
    found = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    return python if found.returncode == 0 else None


@pytest.mark.slow
def test_llama_cpp_server_on_the_demo_model(planted, tmp_path, capsys):  # noqa: F811
    """A real server: llama.cpp's (llama-cpp-python), serving the demo's SmolLM2 GGUF file."""
    python = _llama_python()
    if python is None:
        pytest.skip("llama-cpp-python with its server is not installed (pip install 'llama-cpp-python[server]', or "
                    "point GLUSCOPE_LLAMA_PYTHON at an interpreter that has it); it compiles llama.cpp, so CI leaves "
                    "it out")
    from collect.demo import MODEL_FILE, cache_dir

    gguf = cache_dir() / "smollm2" / MODEL_FILE
    if not gguf.exists():
        pytest.skip(f"the demo's model is not in the cache ({gguf}); run make demo once")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                               "--n_ctx", "2048", "--model_alias", "smollm2-135m"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        path = tmp_path / "act.h5"
        shutil.copy(planted["file"], path)
        layer, neuron = PLANTED
        code = main(["explain", str(path), "--neurons", f"{layer}.{neuron}", "--llm", url, "--score", "--model",
                     str(planted["model"]), "--dataset", str(planted["held_out"]), "--score-tokens", "200",
                     "--no-progress"])
        assert code == 0, capsys.readouterr().err
    finally:
        server.terminate()
        server.wait(timeout=30)
    with ActivationsFile(path) as f:
        cases = neuron_explanations(f, layer, neuron)
        attrs = dict(f.file["explanations"].attrs)
    assert cases[0].label and cases[0].method == "llm smollm2-135m" and attrs["score_simulator"] == "llm smollm2-135m"
    assert all(c.scored_positions > 0 for c in cases if c.label)
