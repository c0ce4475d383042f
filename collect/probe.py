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
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from collect import trunk
from collect.architectures import GatedMLP
from collect.corpus import bos_token, token_strings
from collect.model import (dtype_name, layouts_folder, load_model, max_positions, resolve_device, resolve_dtype,
                           run_with_mlp_hooks)
from collect.model import refactor_glu as flip_neurons
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.probe import Probed, probe_block_html

#: The longest text a served site's box accepts (characters): a local model, a bounded wait.
MAX_TEXT = 20_000

#: ``forward(input_ids [1, T], layers, on_layer)``: run a text, calling ``on_layer(layer, gate, in, post)``.
Forward = Callable[[torch.Tensor, list[int], Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]], None]


def recipes_folder() -> Path:
    """Where checked recipes of :mod:`collect.trunk` are kept: ``probe/`` in gluscope's cache folder."""
    return layouts_folder().parent / "probe"


@dataclass
class Prober:
    """A model ready for texts: how to tokenize, spell and run them, the BOS rule and refactor_glu as a
    collection applies them. ``engine`` says what runs them: ``transformers``, or ``checkpoint`` (a
    recipe of :mod:`collect.trunk`, checked equal to transformers on this checkpoint, without importing it)."""

    engine: str
    encode: Callable[[str], list[int]]
    spell: Callable[[np.ndarray], list[str]]
    forward: Forward
    refactor_layers: Callable[[list[int]], None]
    mlp_sizes: dict[int, int]  # the dense layers a text can be read at, and their neurons
    act_fn: str
    act: Callable[[int, torch.Tensor], torch.Tensor]  # act(gate) of a layer's gate
    bos: int | None
    limit: int | None
    device: torch.device
    #: refactor_glu the layers texts run through, as a collection does (each layer once, before its first run)
    refactor: bool = True
    refactored: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, model: str, *, dtype: str = "float32", device: str = "cpu", refactor_glu: bool = True,
             bos: str = "auto", recipes: Path | None = None, recipe: bool = True) -> "Prober":
        """The model, from a checked recipe where ``recipes`` (default: :func:`recipes_folder`) has one for
        this checkpoint and these options, else through transformers (and then a recipe is checked and kept
        for the next process where the model is one :mod:`collect.trunk` computes). ``recipe=False``: through
        transformers, and no recipe read or kept."""
        torch_device = resolve_device(device)
        options = dict(dtype=dtype_name(resolve_dtype(dtype, torch_device)), device=str(torch_device),
                       refactor=refactor_glu, bos=bos)
        folder = trunk.checkpoint_folder(model) if recipe else None
        key = trunk.recipe_key(folder, **options) if folder is not None else None
        path = trunk.recipe_path(recipes or recipes_folder(), key) if key is not None else None
        entry = trunk.recall(path) if path is not None else None
        if entry is not None:
            return cls.from_recipe(entry, folder, torch_device, refactor_glu)
        prober, loaded = cls.through_transformers(model, dtype=dtype, device=device, refactor_glu=refactor_glu, bos=bos)
        if path is not None:
            check_and_remember(prober, loaded, folder, path)
        return prober

    @classmethod
    def through_transformers(cls, model: str, *, dtype: str, device: str, refactor_glu: bool,
                             bos: str) -> tuple["Prober", Any]:
        """The model with its MLPs located, not yet refactored: refactor_glu flips a layer's neurons without
        changing what any layer computes downstream (act(gate)·in·w_out stays the same), so only the layers
        asked for need it (all 30 of SmolLM2: 0.25 CPU s of a cold probe, for a probe that reads 2)."""
        loaded, _ = load_model(model, dtype=dtype, device=device, refactor=False, cosines=False,
                               remember=layouts_folder())
        tokenizer = loaded.tokenizer
        size = max(len(tokenizer), loaded.hf_model.get_input_embeddings().weight.shape[0])

        def forward(input_ids: torch.Tensor, layers: list[int], on_layer: Any) -> None:
            run_with_mlp_hooks(loaded, input_ids, layers, on_layer)

        prober = cls(engine="transformers",
                     encode=lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
                     spell=lambda ids: token_strings(tokenizer, size, ids), forward=forward,
                     refactor_layers=lambda layers: flip_neurons([loaded.mlps[layer] for layer in layers]),
                     mlp_sizes={layer: mlp.d_mlp for layer, mlp in loaded.mlps.items()},
                     act_fn=loaded.act_fn_name, act=lambda layer, gate: loaded.mlps[layer].act_fn(gate),
                     bos=bos_token(tokenizer, bos),
                     limit=max_positions(loaded.hf_model), device=loaded.device, refactor=refactor_glu)
        return prober, loaded

    @classmethod
    def from_recipe(cls, entry: dict[str, Any], folder: Path, device: torch.device, refactor_glu: bool) -> "Prober":
        """The model computed by :mod:`collect.trunk` from its checkpoint files and a checked recipe."""
        from tokenizers import Tokenizer

        shape, facts, strings = entry["shape"], entry["facts"], entry["strings"]
        checkpoint = trunk.Checkpoint(folder, getattr(torch, facts["dtype"]), device)
        tokenizer = Tokenizer.from_str(entry["tokenizer"])
        layers: dict[int, trunk.Layer] = {}

        def layer(index: int) -> trunk.Layer:
            if index not in layers:
                layers[index] = trunk.read_layer(checkpoint, shape, index)
            return layers[index]

        def refactor_layers(indices: list[int]) -> None:
            flip_neurons([GatedMLP(w_gate=w.gate[0], w_in=w.up[0], w_out=w.down[0], b_gate=w.gate[1], b_in=w.up[1],
                                   act_fn=F.silu) for w in map(layer, indices)])

        embed: list[torch.Tensor] = []

        def forward(input_ids: torch.Tensor, wanted: list[int], on_layer: Any) -> None:
            if not embed:
                embed.append(checkpoint.get(f"{shape.prefix}embed_tokens.weight"))
            trunk.run_layers(shape, embed[0], layer, input_ids, wanted, on_layer)

        return cls(engine="checkpoint", encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                   spell=lambda ids: [strings[int(i)] for i in ids], forward=forward, refactor_layers=refactor_layers,
                   mlp_sizes={index: shape.d_mlp for index in range(shape.n_layers)}, act_fn=facts["act_fn"],
                   act=lambda layer, gate: F.silu(gate), bos=facts["bos"], limit=facts["limit"], device=device, refactor=refactor_glu)

    def check(self, neurons: Sequence[tuple[int, int]]) -> None:
        """One clear error for a neuron the model does not have (or whose layer was not loaded)."""
        for layer, n in neurons:
            if layer not in self.mlp_sizes:
                have = ", ".join(map(str, sorted(self.mlp_sizes))) or "none"
                raise GluscopeError(f"neuron {layer}.{n}: layer {layer} is not a dense layer of the loaded model "
                                    f"(layers {have})")
            if not 0 <= n < self.mlp_sizes[layer]:
                raise GluscopeError(f"neuron {layer}.{n}: layer {layer} has neurons 0..{self.mlp_sizes[layer] - 1}")

    def tokens(self, text: str) -> np.ndarray:
        """The document a collection makes of ``text``: the BOS (if any), then the text's tokens."""
        doc = ([self.bos] if self.bos is not None else []) + list(self.encode(text))
        if not doc:
            raise GluscopeError("the text has no tokens")
        if self.limit is not None and len(doc) > self.limit:
            raise GluscopeError(f"the text has {len(doc)} tokens; the model takes at most {self.limit}")
        return np.asarray(doc, dtype=np.int64)

    def layer_values(self, ids: np.ndarray, layers: list[int],
                     on_layer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        """Run a document, refactoring its layers first as :meth:`run` does; ``on_layer`` gets whole layers."""
        todo = [layer for layer in layers if layer not in self.refactored]
        if self.refactor and todo:
            self.refactor_layers(todo)
        self.refactored.update(todo)
        self.forward(torch.from_numpy(ids)[None].to(self.device), layers, on_layer)

    @torch.no_grad()
    def run(self, text: str, neurons: Sequence[tuple[int, int]]) -> Probed:
        """gate, in, act(gate) and post of each neuron at every token of ``text``."""
        self.check(neurons)
        ids = self.tokens(text)
        layers = sorted({layer for layer, _ in neurons})
        seen: dict[int, tuple[torch.Tensor, ...]] = {}

        def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
            wanted = [n for lay, n in neurons if lay == layer]
            g, i, p = (t[0, :, wanted].float() for t in (gate, in_, post))
            seen[layer] = (g, i, p, self.act(layer, gate[0, :, wanted]).float())

        self.layer_values(ids, layers, on_layer)
        columns = {layer: [n for lay, n in neurons if lay == layer] for layer in layers}
        values = {name: np.stack([seen[layer][h][:, columns[layer].index(n)].cpu().numpy() for layer, n in neurons])
                  for h, name in enumerate(("gate", "in_", "post", "swish"))}
        return Probed(tokens=ids, strings=self.spell(ids), neurons=list(neurons),
                      first_counted=1 if self.bos is not None else 0, act_fn=self.act_fn, **values)


def _layer_digests(prober: Prober, ids: np.ndarray, layers: list[int]) -> dict[int, str]:
    """A hash of the exact bytes of every layer's gate, in and post for one document."""
    digests = {}

    def on_layer(layer: int, gate: torch.Tensor, in_: torch.Tensor, post: torch.Tensor) -> None:
        h = hashlib.sha256()
        for t in (gate, in_, post):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[layer] = h.hexdigest()

    prober.layer_values(ids, layers, on_layer)
    return digests


def check_and_remember(prober: Prober, loaded: Any, folder: Path, path: Path) -> bool:
    """Keep a recipe of :mod:`collect.trunk` for this checkpoint at ``path`` if the model is one it computes
    and it gives what transformers gave: the same ids for the check texts, and every layer's gate, in and
    post bit for bit on documents of a few lengths. Returns whether it was kept. Runs every layer twice:
    on a first probe of SmolLM2-135M about a second; a checkpoint it does not fit costs nothing."""
    shape = trunk.Shape.of(loaded.hf_model)
    if shape is None or sorted(prober.mlp_sizes) != list(range(shape.n_layers)):
        return False
    tokenizer = loaded.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    size = max(len(tokenizer), loaded.hf_model.get_input_embeddings().weight.shape[0])
    facts = {"dtype": dtype_name(loaded.dtype), "act_fn": prober.act_fn, "bos": prober.bos, "limit": prober.limit}
    try:
        entry = {"shape": shape, "facts": facts, "tokenizer": backend.to_str(), "strings": token_strings(tokenizer, size)}
        quick = Prober.from_recipe(entry, folder, prober.device, prober.refactor)
        layers = list(range(shape.n_layers))
        for text in trunk.CHECK_TEXTS:
            ids = prober.tokens(text)
            if not np.array_equal(quick.tokens(text), ids):
                return False
            longest = min(max(trunk.CHECK_LENGTHS), prober.limit or max(trunk.CHECK_LENGTHS))
            for doc in (ids, *(np.resize(ids, min(n, longest)) for n in trunk.CHECK_LENGTHS)):
                if _layer_digests(quick, doc, layers) != _layer_digests(prober, doc, layers):
                    return False
    except Exception:  # noqa: BLE001 (anything the recipe cannot do: no recipe, the probe itself is unaffected)
        return False
    trunk.remember(path, shape, facts, entry["tokenizer"], entry["strings"])
    return True


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
