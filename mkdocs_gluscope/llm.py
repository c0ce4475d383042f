"""Any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, ...) as explainer and simulator.

``gluscope explain --llm URL`` asks the server's model, for each case, what the tokens of the case's
top examples have in common (the label), and, with ``--score``, asks it to predict the case's
activation on every token of the held-out sequences from that label alone (the simulator), as
Bills et al. (2023) did with GPT-4; the scores are then those of the rule-based path.

Only the standard library talks to the server (``urllib``, JSON): ``GET URL/models`` to learn the
model's name when none is given (recorded in the file), ``POST URL/chat/completions`` with
temperature 0. The prompts are text files a user can edit (:func:`load_prompts`): the package's
``prompts/explain.txt`` and ``prompts/simulate.txt``, or a folder with files of those names
(``--prompts``). They are ``string.Template`` texts: ``$examples`` (explain), ``$explanation`` and
``$tokens`` (simulate); activations in prompts are on Bills et al.'s 0-10 scale, 10 being the case's
strongest ``|post|`` among its top examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mkdocs_gluscope.activations import act_values
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.render import token_label
from mkdocs_gluscope.store import CASES, HOOK_SIGNS, NeuronData, early_end

PROMPTS = ("explain", "simulate")
#: Top examples shown to the explainer per case, and the longest label kept.
EXAMPLES, LABEL_CHARS = 5, 160
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ChatServer:
    """An OpenAI-compatible chat server at ``url`` (ending in ``/v1`` for most servers)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.model = model or self.models()[0]

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace").strip().splitlines()[:1]
            raise GluscopeError(f"--llm {self.url}{path}: HTTP {e.code} {e.reason}"
                                + (f" ({detail[0][:200]})" if detail else "")) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise GluscopeError(f"--llm {self.url}{path}: {reason}; expected an OpenAI-compatible server such as "
                                "http://127.0.0.1:8000/v1") from None

    def models(self) -> list[str]:
        found = [m.get("id", "") for m in self._request("/models").get("data", [])]
        if not found or not found[0]:
            raise GluscopeError(f"--llm {self.url}/models lists no model; name one with --llm-model")
        return found

    def chat(self, prompt: str, max_tokens: int) -> str:
        """The model's answer to one user message (temperature 0: the same answer every time)."""
        reply = self._request("/chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "seed": 0})
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise GluscopeError(f"--llm {self.url}/chat/completions answered without choices[0].message.content") from None


def load_prompts(folder: str | os.PathLike | None = None) -> dict[str, string.Template]:
    """The prompts: ``folder/explain.txt`` and ``folder/simulate.txt``, else the package's."""
    out = {}
    for name in PROMPTS:
        if folder is not None:
            path = Path(folder) / f"{name}.txt"
            if not path.is_file():
                raise GluscopeError(f"--prompts {str(folder)!r} has no {name}.txt; copy the package's prompts "
                                    f"({resources.files('mkdocs_gluscope') / 'prompts'}) there and edit them")
            text = path.read_text(encoding="utf-8")
        else:
            text = resources.files("mkdocs_gluscope").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
        out[name] = string.Template(text)
    return out


def _lines(tokens: Sequence[str], values: Sequence[float] | None = None) -> str:
    """One token per line (its visible form), with its 0-10 value after a tab where given."""
    if values is None:
        return "\n".join(token_label(t) or "·" for t in tokens)
    return "\n".join(f"{token_label(t) or '·'}\t{v:g}" for t, v in zip(tokens, values))


def case_examples(data: NeuronData, vocab: Sequence[str], c: int, count: int = EXAMPLES) -> str:
    """The case's strongest hook_post examples after the start of the document, each window as
    token/activation lines, the activation ``post`` in the case (0 elsewhere) on the 0-10 scale."""
    early = early_end(data.attrs)
    act = str(data.attrs.get("act_fn", "silu"))
    blocks, windows = [], []
    for j in range(data.top_doc.shape[-1]):
        if data.top_doc[c, 0, j] < 0 or data.top_pos[c, 0, j] < early:
            continue
        gate, in_ = data.top_gate[c, 0, j].astype(np.float64), data.top_in[c, 0, j].astype(np.float64)
        inside = (np.sign(gate) == HOOK_SIGNS[c][2]) & (np.sign(in_) == HOOK_SIGNS[c][1])
        y = np.abs(np.where(inside, act_values(gate, act) * in_, 0.0))
        ids = data.window_tokens[c, 0, j]
        windows.append(([vocab[t] for t in ids if t >= 0], y[ids >= 0]))
        if len(windows) == count:
            break
    largest = max((float(np.nanmax(y)) for _, y in windows if len(y)), default=0.0) or 1.0
    for tokens, y in windows:
        blocks.append(_lines(tokens, np.round(np.nan_to_num(y) / largest * 10).astype(int).tolist()))
    return "\n\n".join(blocks)


def explain_case(server: ChatServer, prompts: dict[str, string.Template], data: NeuronData, vocab: Sequence[str],
                 c: int) -> str:
    """The model's label of case ``c``: its first non-empty line, at most :data:`LABEL_CHARS` characters."""
    examples = case_examples(data, vocab, c)
    if not examples:
        return ""
    answer = server.chat(prompts["explain"].safe_substitute(examples=examples, case=CASES[c]), max_tokens=60)
    first = next((line.strip() for line in answer.splitlines() if line.strip()), "")
    return first[:LABEL_CHARS]


def parse_values(answer: str, n: int) -> np.ndarray:
    """``n`` predictions from the simulator's answer: the last number of each line, in order (0-10,
    clipped; missing lines 0)."""
    values = []
    for line in answer.splitlines():
        numbers = _NUMBER.findall(line.split("\t")[-1]) or _NUMBER.findall(line)
        if numbers:
            values.append(min(max(float(numbers[-1]), 0.0), 10.0))
    values = (values + [0.0] * n)[:n]
    return np.asarray(values, dtype=np.float32)


class LLMSimulator:
    """The server as simulator, with :class:`~mkdocs_gluscope.explanations.Simulator`'s interface:
    for each explanation (column) and sequence it asks the model to predict every token's activation
    (0-10) from the label alone, and scales the answer to the case's post: 10 is twice the case's
    strong ``threshold`` (so 5 is exactly "strong"), with the case's sign."""

    def __init__(self, server: ChatServer, prompts: dict[str, string.Template], labels: Sequence[str],
                 threshold: np.ndarray, sign: np.ndarray, vocab: Sequence[str]) -> None:
        self.server, self.prompts, self.labels, self.vocab = server, prompts, list(labels), vocab
        self.V = len(vocab)
        self.M = len(self.labels)
        self.scale = np.nan_to_num(2 * np.asarray(threshold, dtype=np.float32) / 10) * np.asarray(sign, np.float32)
        self.calls = 0

    def strong_level(self, sign: np.ndarray) -> np.ndarray:
        """``[M]``: a prediction of 5 or more (of 10) calls a position strong."""
        level = 5 * np.abs(self.scale)
        return np.where(level > 0, level, np.inf).astype(np.float32)

    def _sequence(self, m: int, ids: np.ndarray) -> np.ndarray:
        out = np.zeros(len(ids), dtype=np.float32)
        real = ids < self.V
        if not self.labels[m] or not real.any():
            return out
        tokens = [self.vocab[int(t)] for t in ids[real]]
        prompt = self.prompts["simulate"].safe_substitute(explanation=self.labels[m], tokens=_lines(tokens))
        self.calls += 1
        out[real] = parse_values(self.server.chat(prompt, max_tokens=8 * len(tokens) + 16), len(tokens)) * self.scale[m]
        return out

    def predict(self, current: np.ndarray, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """``[..., S, M]`` for sequences ``current`` ``[..., S]``: one request per sequence and column."""
        flat = current.reshape(-1, current.shape[-1])
        out = np.zeros(flat.shape + (self.M,), dtype=np.float32)
        for q, ids in enumerate(flat):
            for m in range(self.M):
                out[q, :, m] = self._sequence(m, ids)
        return out.reshape(current.shape + (self.M,))

    def predict_own(self, current: np.ndarray, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """``[M, ..., S]``: column ``m`` on its own sequences ``current[m]``."""
        out = np.zeros(current.shape, dtype=np.float32)
        for m in range(self.M):
            flat = current[m].reshape(-1, current.shape[-1])
            out[m] = np.stack([self._sequence(m, ids) for ids in flat]).reshape(current.shape[1:])
        return out


class LLMSimulators:
    """Makes :class:`LLMSimulator` s for :class:`collect.score.Scorer` (``llm=``)."""

    def __init__(self, server: ChatServer, prompts: dict[str, string.Template]) -> None:
        self.server, self.prompts, self.model = server, prompts, server.model

    def __call__(self, labels: Sequence[str], threshold: np.ndarray, sign: np.ndarray,
                 vocab: Sequence[str]) -> LLMSimulator:
        return LLMSimulator(self.server, self.prompts, labels, threshold, sign, vocab)


class LLMExplainer:
    """The server as explainer, for :func:`mkdocs_gluscope.explain_run.explain_file`: one request per
    case of each listed neuron, one after another (the server is the bottleneck)."""

    def __init__(self, server: ChatServer, prompts: dict[str, string.Template]) -> None:
        self.server, self.prompts = server, prompts
        #: ``explanations/method`` of its labels; the work folder's key (another model or prompt: other units).
        self.method = f"llm {server.model}"
        digest = hashlib.sha256("\0".join(p.template for p in prompts.values()).encode("utf-8")).hexdigest()[:12]
        self.identity = f"{self.method} prompts {digest}"

    def __call__(self, path: Path, units: list, *, workers: int | None, progress: bool,
                 done: Callable[[Any, dict[str, np.ndarray]], None]) -> None:
        from tqdm.auto import tqdm

        from mkdocs_gluscope.explain import strong_threshold
        from mkdocs_gluscope.explanations import empty_arrays
        from mkdocs_gluscope.store import ActivationsFile

        with ActivationsFile(path) as f, tqdm(total=sum(len(u.neurons) for u in units), unit="neuron",
                                              desc="explain (llm)", disable=not progress) as bar:
            vocab, early = f.vocab, early_end(f.attrs)
            for unit in units:
                arrays = empty_arrays(unit.size)
                for n in unit.neurons:
                    data = f.neuron(unit.layer, int(n), expert=unit.expert)
                    for c in range(len(CASES)):
                        if data.count[c] == 0:
                            continue
                        label = explain_case(self.server, self.prompts, data, vocab, c)
                        arrays["label"][n, c] = label
                        arrays["method"][n, c] = self.method if label else ""
                        arrays["threshold"][n, c] = strong_threshold(data.top_value[c, 0], data.top_pos[c, 0],
                                                                     data.top_doc[c, 0], early)
                    bar.update(1)
                done(unit, arrays)
