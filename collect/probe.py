"""Your own text through the model: each token's gate, in, act(gate) and post for chosen neurons.

:class:`Prober` loads a model once (refactor_glu as a collection applies it) and runs texts through the
same MLP hooks a collection uses (:func:`collect.model.run_with_mlp_hooks`), documents built the same
way (a BOS first as ``--bos`` says), so its values are those a collection records for the same text.
``gluscope probe`` prints or writes them (:mod:`mkdocs_gluscope.probe`); :func:`serve` answers a served
site's text box over HTTP on the loopback interface (``python -m collect.probe --model M``, started by
the MkDocs plugin's ``probe_model`` option).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import numpy as np
import torch

from collect.corpus import bos_token, token_strings
from collect.model import layouts_folder, load_model, max_positions, refactor_glu, run_with_mlp_hooks
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.probe import Probed, probe_block_html

#: The longest text a served site's box accepts (characters): a local model, a bounded wait.
MAX_TEXT = 20_000


@dataclass
class Prober:
    """A loaded model and what documents need: the BOS rule and the vocabulary size for display strings."""

    loaded: Any
    bos: int | None
    vocab_size: int
    act_fn: str
    limit: int | None
    #: refactor_glu the layers texts run through, as a collection does (each layer once, before its first run)
    refactor: bool = True
    refactored: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, model: str, *, dtype: str = "float32", device: str = "cpu", refactor_glu: bool = True,
             bos: str = "auto") -> "Prober":
        """The model with its MLPs located, not yet refactored: refactor_glu flips a layer's neurons without
        changing what any layer computes downstream (act(gate)·in·w_out stays the same), so only the layers
        asked for need it (all 30 of SmolLM2: 0.25 CPU s of a cold probe, for a probe that reads 2)."""
        loaded, _ = load_model(model, dtype=dtype, device=device, refactor=False, cosines=False,
                               remember=layouts_folder())
        tokenizer = loaded.tokenizer
        size = max(len(tokenizer), loaded.hf_model.get_input_embeddings().weight.shape[0])
        return cls(loaded, bos_token(tokenizer, bos), size, loaded.act_fn_name, max_positions(loaded.hf_model),
                   refactor=refactor_glu)

    def check(self, neurons: Sequence[tuple[int, int]]) -> None:
        """One clear error for a neuron the model does not have (or whose layer was not loaded)."""
        for layer, n in neurons:
            if layer not in self.loaded.mlps:
                have = ", ".join(map(str, sorted(self.loaded.mlps))) or "none"
                raise GluscopeError(f"neuron {layer}.{n}: layer {layer} is not a dense layer of the loaded model "
                                    f"(layers {have})")
            if not 0 <= n < self.loaded.mlps[layer].d_mlp:
                raise GluscopeError(f"neuron {layer}.{n}: layer {layer} has neurons 0..{self.loaded.mlps[layer].d_mlp - 1}")

    def tokens(self, text: str) -> np.ndarray:
        """The document a collection makes of ``text``: the BOS (if any), then the text's tokens."""
        ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        doc = ([self.bos] if self.bos is not None else []) + list(ids)
        if not doc:
            raise GluscopeError("the text has no tokens")
        if self.limit is not None and len(doc) > self.limit:
            raise GluscopeError(f"the text has {len(doc)} tokens; the model takes at most {self.limit}")
        return np.asarray(doc, dtype=np.int64)

    @torch.no_grad()
    def run(self, text: str, neurons: Sequence[tuple[int, int]]) -> Probed:
        """gate, in, act(gate) and post of each neuron at every token of ``text``."""
        self.check(neurons)
        ids = self.tokens(text)
        layers = sorted({layer for layer, _ in neurons})
        todo = [layer for layer in layers if layer not in self.refactored]
        if self.refactor and todo:
            refactor_glu([self.loaded.mlps[layer] for layer in todo])
        self.refactored.update(todo)
        seen: dict[int, tuple[torch.Tensor, ...]] = {}

        def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
            wanted = [n for lay, n in neurons if lay == layer]
            g, i, p = (t[0, :, wanted].float() for t in (gate, in_, post))
            seen[layer] = (g, i, p, self.loaded.mlps[layer].act_fn(gate[0, :, wanted]).float())

        input_ids = torch.from_numpy(ids)[None].to(self.loaded.device)
        run_with_mlp_hooks(self.loaded, input_ids, layers, on_layer)
        columns = {layer: [n for lay, n in neurons if lay == layer] for layer in layers}
        values = {name: np.stack([seen[layer][h][:, columns[layer].index(n)].cpu().numpy() for layer, n in neurons])
                  for h, name in enumerate(("gate", "in_", "post", "swish"))}
        return Probed(tokens=ids, strings=token_strings(self.loaded.tokenizer, self.vocab_size, ids), neurons=list(neurons),
                      first_counted=1 if self.bos is not None else 0, act_fn=self.act_fn, **values)


def single_thread() -> None:
    """One torch thread: a text of a few hundred tokens runs fastest so (SmolLM2-135M, 20 tokens, 2-core
    AMD EPYC under load: 0.17 CPU s a run on one thread, 3.1 s on two, which spin waiting for each other),
    and a probe leaves the machine's other cores to its user."""
    torch.set_num_threads(1)


def _handler(prober: Prober, origins: set[str], lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _headers(self, status: int, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            origin = self.headers.get("Origin")
            if origin in origins:  # only the site this server was started for may read the answers
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")
            self.end_headers()

        def _reply(self, status: int, body: dict) -> None:
            self._headers(status)
            self.wfile.write(json.dumps(body).encode("utf-8"))

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/probe":
                self._reply(404, {"error": "not found"})
                return
            if self.headers.get("Origin") not in origins:
                self._reply(403, {"error": "this probe server answers its own site only"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(min(length, 4 * MAX_TEXT + 1024)).decode("utf-8"))
                text, neuron = str(request["text"]), str(request["neuron"])
                if len(text) > MAX_TEXT:
                    raise GluscopeError(f"the text has {len(text):,} characters; the box takes at most {MAX_TEXT:,}")
                layer, n = (int(x) for x in neuron.split("."))
                with lock:  # one forward pass at a time: the model is not shared across threads
                    probed = prober.run(text, [(layer, n)])
                self._reply(200, {"html": probe_block_html(probed, 0), "tokens": len(probed.tokens)})
            except GluscopeError as e:
                self._reply(400, {"error": str(e)})
            except (ValueError, KeyError, TypeError) as e:
                self._reply(400, {"error": f"bad request ({type(e).__name__}: {e}); expected JSON "
                                           '{"text": "...", "neuron": "LAYER.NEURON"}'})

        def log_message(self, *args: Any) -> None:  # quiet: mkdocs serve's terminal is the user's
            pass

    return Handler


def serve(prober: Prober, port: int, origins: set[str]) -> None:
    """Answer ``POST /probe`` (``{"text", "neuron"}`` as JSON; a ``text/plain`` body keeps the browser
    from a preflight) on 127.0.0.1 only, to pages of ``origins``; print the port, then serve forever."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(prober, origins, threading.Lock()))
    parent = os.getppid()

    def orphaned() -> None:  # the site that started this server is gone (killed, not shut down): stop too
        while os.getppid() == parent:
            time.sleep(2)
        server.shutdown()

    threading.Thread(target=orphaned, daemon=True).start()
    print(f"gluscope-probe listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collect.probe",
                                     description="the probe server a served site's text box talks to")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    parser.add_argument("--origin", action="append", default=[], help="a site origin allowed to read answers")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bos", default="auto")
    parser.add_argument("--no-refactor-glu", dest="refactor_glu", action="store_false")
    args = parser.parse_args(argv)
    single_thread()
    try:
        prober = Prober.load(args.model, dtype=args.dtype, refactor_glu=args.refactor_glu, bos=args.bos)
    except GluscopeError as e:
        print(f"gluscope: error: {e}", file=sys.stderr, flush=True)
        return 2
    serve(prober, args.port, set(args.origin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
