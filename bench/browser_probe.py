"""The in-browser probe, measured: one layer's gate, in and post from ONNX Runtime Web (wasm) in headless Chromium.

    pip install ".[bench]"   # onnx, onnxruntime, onnxscript, pinned
    python bench/browser_probe.py [--model MODEL] [--layer 7] [--variants float32,float16,int8,int4,int8-dynamic] [--runs 5]

Exports to ONNX a wrapper of the model whose input is the token ids (any length) and whose outputs are the
``gate``, ``in`` and ``post`` of every neuron of one layer's MLP, the model cut after that layer (a page needs
no later layer, no final norm and no unembedding). Variants: ``float32``; ``float16`` (weights stored as
float16, cast back to float32 as the session loads, so only the download halves); ``int8`` and ``int4``
(weight-only, in blocks of 32 with a scale each: onnxruntime's ``MatMulNBitsQuantizer`` on every MatMul and
on the embedding's Gather, which onnxruntime quantizes to int4 only, so ``int8`` stores the embedding as
float16; the arithmetic is float32); ``int8-dynamic`` (``quantize_dynamic``: int8 weights, one
scale a tensor, and activations quantized to uint8 before every MatMul). Each is checked in Python with onnxruntime against transformers' forward
through the project's own hooks (``collect.probe.Prober.through_transformers``, refactor_glu off: its sign flips are a page's
business, applied from the file's ``flips``, and change no magnitude), then served with ``python -m
http.server``'s handler on 127.0.0.1 to a page that imports ``onnxruntime-web`` (npm, pinned below, installed
into a temporary folder) and runs the ids of a fixed sentence, precomputed in Python (a tokenizer in the
page is not measured). Headless Chromium (``/usr/bin/chromium``) loads the page in a fresh context (cold
cache) and reports, from ``performance.now()`` (ms since navigation start): the runtime imported, the model
fetched, the session created, the first activation; then the median of ``--runs`` further runs of the same
session (warm); then a second visit with the same profile, where ``--cache-storage`` has the page keep
the model in Cache Storage (the HTTP cache would not keep a large one). The server counts the bytes it
sent per file. Wasm backend on one thread: a static host
such as GitHub Pages cannot send the COOP/COEP headers that wasm threads need. WebGPU is not tried (no GPU).

Bytes for every layer a page could need follow from the parameter counts (embedding + layers 0..L); the
exported files of ``--layer`` check that arithmetic. Figures print with the CPU (``lscpu``) and load average.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from context import SENTENCE, demo_model, machine  # noqa: E402 (bench/ is on the path of a script run from it)

ORT_WEB = "onnxruntime-web@1.31.1"
#: what a page loads of the npm package for the wasm backend: the ES module, its worker glue and the SIMD binary
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
#: tokenizers.js (pure JavaScript, what transformers.js tokenizes with), which reads the model's tokenizer.json
TOKENIZERS = "@huggingface/tokenizers@0.2.0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHROMIUM = "/usr/bin/chromium"
VARIANTS = ("float32", "float16", "int8", "int4", "int8-dynamic")

PAGE = """<!doctype html><meta charset="utf-8"><title>browser probe</title>
<script type="module">
const mark = {};
const ort = await import('./ort.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = './';
mark.runtime = performance.now();
const {Tokenizer} = await import('./tokenizers.min.mjs');
const [vocab, config, probe] = await Promise.all(
  ['tokenizer.json', 'tokenizer_config.json', 'probe.json'].map(async f => (await fetch('./' + f)).json()));
const tokenizer = new Tokenizer(vocab, config);
mark.tokenizer = performance.now();
const t = performance.now();
const ids = (probe.bos === null ? [] : [probe.bos]).concat(tokenizer.encode(probe.text, {add_special_tokens: false}).ids);
const encode = performance.now() - t;
let response;
if (probe.cache) {  // keep the model in Cache Storage, which holds what the HTTP cache will not
  const cache = await caches.open('gluscope-probe');
  response = await cache.match('./model.onnx');
  if (!response) {
    await cache.put('./model.onnx', await fetch('./model.onnx'));
    response = await cache.match('./model.onnx');
  }
} else {
  response = await fetch('./model.onnx');
}
const bytes = new Uint8Array(await response.arrayBuffer());
mark.fetched = performance.now();
const session = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm']});
mark.session = performance.now();
const feed = () => ({input_ids: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length])});
let out = await session.run(feed());
mark.first = performance.now();
const warm = [];
for (let i = 0; i < probe.runs; i++) {
  const t = performance.now();
  out = await session.run(feed());
  warm.push(performance.now() - t);
}
const values = Object.fromEntries(['gate', 'in', 'post'].map(k => [k, Array.from(out[k].data)]));
window.result = {mark, encode, warm, ids, values};
</script>
"""

def install_npm(folder: Path) -> Path:
    """The pinned onnxruntime-web and tokenizers.js, installed with npm into ``folder`` (never into the
    repository); their ``node_modules``."""
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder), ORT_WEB, TOKENIZERS],
                   check=True, capture_output=True, timeout=600)
    return folder / "node_modules"


def truncated(hf_model, layer: int):
    """The wrapper to export (torch imported here, so that ``--help`` needs none)."""
    import torch

    class Wrapper(torch.nn.Module):
        """Token ids in; gate, in and post of ``layer``'s MLP out. Layers after it are dropped, so their
        weights are not in the export; the attention is transformers' eager one with an explicit causal
        mask, which exports with a dynamic length."""

        def __init__(self) -> None:
            super().__init__()
            base = hf_model.model
            self.embed, self.rotary = base.embed_tokens, base.rotary_emb
            self.layers = torch.nn.ModuleList(base.layers[: layer + 1])

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            hidden = self.embed(input_ids)
            n = input_ids.shape[1]
            positions = torch.arange(n, device=input_ids.device)[None]
            rope = self.rotary(hidden, positions)
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
            for block in self.layers[:-1]:
                hidden = block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            last = self.layers[-1]
            attended, _ = last.self_attn(last.input_layernorm(hidden), attention_mask=mask,
                                         position_ids=positions, position_embeddings=rope)
            x = last.post_attention_layernorm(hidden + attended)
            gate, in_ = last.mlp.gate_proj(x), last.mlp.up_proj(x)
            return gate[0], in_[0], last.mlp.act_fn(gate[0]) * in_[0]

    return Wrapper().eval()


def export(hf_model, layer: int, ids, path: Path) -> float:
    """The float32 export of the wrapper; seconds it took."""
    import torch

    wrapper = truncated(hf_model, layer)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (torch.from_numpy(ids)[None],), dynamo=True, input_names=["input_ids"],
                                    output_names=["gate", "in", "post"],
                                    dynamic_shapes={"input_ids": {1: torch.export.Dim("tokens", min=2, max=8192)}},
                                    optimize=True, verbose=False)
    program.save(str(path))
    return time.perf_counter() - start


def to_float16(source: Path, target: Path) -> None:
    """Every float32 initializer stored as float16 behind a Cast to float32: half the bytes to download, the
    same float32 arithmetic (ORT folds the casts when the session loads)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32 or array.size < 1024:
            kept.append(init)
            continue
        stored = init.name + "__float16"
        kept.append(numpy_helper.from_array(array.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(target))


def to_blocks(source: Path, target: Path, bits: int) -> None:
    """Weight-only quantization in blocks of 32 (onnxruntime's MatMulNBits and GatherBlockQuantized, as
    transformers.js' q4/q8 models): the arithmetic stays float32, each block of weights has its own scale."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=32, is_symmetric=True,
                                     op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target))
    if bits == 8:  # onnxruntime quantizes a Gather to int4 only: the embedding goes float16 instead
        to_float16(target, target)


def to_int8_dynamic(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights (one scale a tensor) and the activations quantized to
    uint8 on the fly before every MatMul, which the residual stream's outliers make coarse."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])


def onnx_values(path: Path, ids) -> tuple[dict, float, float]:
    """gate, in and post from onnxruntime (CPU, one thread); session seconds and run seconds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    made = time.perf_counter()
    out = session.run(None, {"input_ids": ids[None]})
    ran = time.perf_counter()
    return dict(zip(("gate", "in", "post"), out)), made - start, ran - made


def max_diff(values: dict, reference: dict) -> str:
    import numpy as np

    return ", ".join(f"{k} {float(np.abs(np.asarray(values[k]).reshape(reference[k].shape) - reference[k]).max()):.2e}"
                     for k in ("gate", "in", "post"))


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's static handler, counting the body bytes it sends per file."""

    sent: dict[str, int] = {}

    def copyfile(self, source, outputfile) -> None:  # noqa: D102
        before = source.tell()
        super().copyfile(source, outputfile)
        type(self).sent[self.path] = type(self).sent.get(self.path, 0) + source.tell() - before

    def log_message(self, *args) -> None:  # quiet
        pass


def browse(folder: Path, timeout_s: float) -> list[tuple[dict, dict[str, int], float]]:
    """The page in headless Chromium with a new profile (cold cache), then visited again with the same profile
    (what its HTTP cache kept is revalidated, and http.server answers 304): per visit its result, the body
    bytes sent per file, wall seconds."""
    from playwright.sync_api import sync_playwright

    handler = type("Handler", (CountingHandler,), {"sent": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    visits = []
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="gluscope-profile-") as profile:
            # a profile on disk, as a reader's browser has (a fresh context's cache lives in memory only)
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM)
            try:
                for _ in range(2):
                    page = context.new_page()
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    handler.sent = {}
                    start = time.perf_counter()
                    page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
                    page.wait_for_function("window.result !== undefined", timeout=timeout_s * 1000, polling=100)
                    wall = time.perf_counter() - start
                    if errors:
                        raise RuntimeError("; ".join(errors))
                    visits.append((page.evaluate("window.result"), dict(handler.sent), wall))
                    page.close()
            finally:
                context.close()
    finally:
        server.shutdown()
        server.server_close()
    return visits


def gzipped(path: Path) -> int:
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=6))


def parameter_counts(hf_model) -> tuple[int, int, int, int]:
    """Parameters of the embedding, of one decoder layer, of its MLP's down projection (which the page's last
    layer does without: post is read before it) and of the final norm."""
    embed = hf_model.model.embed_tokens.weight.numel()
    per_layer = sum(p.numel() for p in hf_model.model.layers[0].parameters())
    down = hf_model.model.layers[0].mlp.down_proj.weight.numel()
    return embed, per_layer, down, hf_model.model.norm.weight.numel()


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a save_pretrained Llama folder (default: the demo's, as gluscope demo leaves it)")
    parser.add_argument("--layer", type=int, default=7, help="the layer whose MLP the page reads (default 7, of 7.824)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--runs", type=int, default=5, help="warm runs after the first activation (median)")
    parser.add_argument("--node-modules", type=Path, help=f"a node_modules folder holding {ORT_WEB} and "
                        f"{TOKENIZERS} (default: npm installs them into a temporary folder)")
    parser.add_argument("--cache-storage", action="store_true", help="the page keeps the model in Cache Storage "
                        "(the second visit then reads it from there)")
    parser.add_argument("--keep", type=Path, help="keep the exported .onnx files in this folder")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a page may take")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"--variants: {', '.join(bad)}; accepted: {', '.join(VARIANTS)}")

    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"gluscope: error: {', '.join(missing)} not installed; pip install '.[bench]' installs them")
    import numpy as np
    import torch

    from collect.probe import Prober

    torch.set_num_threads(1)
    logging.disable(logging.ERROR)  # onnxruntime's quantizers log every node they pass, and an 8-bit Gather as an error
    print(f"machine: {machine()}")
    model = args.model or demo_model()
    # through transformers (never a recipe of collect.trunk): the reference is transformers' forward
    prober, loaded = Prober.through_transformers(model, dtype="float32", device="cpu", refactor_glu=False, bos="auto")
    hf_model = loaded.hf_model
    n_layers = len(hf_model.model.layers)
    if not 0 <= args.layer < n_layers:
        parser.error(f"--layer {args.layer}: the model has layers 0..{n_layers - 1}")
    ids = prober.tokens(SENTENCE)
    d_mlp = prober.mlp_sizes[args.layer]
    probed = prober.run(SENTENCE, [(args.layer, n) for n in range(d_mlp)])
    reference = {"gate": probed.gate.T, "in": probed.in_.T, "post": probed.post.T}
    # the reference ran with the loader's attention; the export uses the eager one (an explicit causal mask,
    # which exports with a dynamic length)
    hf_model.config._attn_implementation = "eager"
    print(f"model: {model}; layer {args.layer} of {n_layers}, {d_mlp} neurons; sentence of {len(ids)} tokens "
          f"(BOS included)")

    embed, per_layer, down, tail = parameter_counts(hf_model)
    whole = embed + n_layers * per_layer + tail
    print(f"\nparameters: embedding {embed:,}, each layer {per_layer:,}; whole model {whole:,} "
          f"(unembedding tied to the embedding)")
    print("weights a page needs to read layer L: the embedding, layers 0..L, less L's down projection "
          "(float32 / float16 / int8, arithmetic from the counts):")
    for layer in sorted({0, args.layer, n_layers // 2, n_layers - 1}):
        n = embed + (layer + 1) * per_layer - down
        print(f"  L={layer:2d}: {n:,} parameters: {mb(4 * n)} / {mb(2 * n)} / {mb(n)}")
    print(f"  whole model: {mb(4 * whole)} / {mb(2 * whole)} / {mb(whole)}")

    with tempfile.TemporaryDirectory(prefix="gluscope-browser-") as tmp:
        work = Path(tmp)
        modules = args.node_modules or install_npm(work / "npm")
        dist, tokenizers = modules / "onnxruntime-web" / "dist", modules / "@huggingface" / "tokenizers"
        assets = {f: dist / f for f in ORT_FILES} | {"tokenizers.min.mjs": tokenizers / "dist" / "tokenizers.min.mjs"}
        assets |= {f: Path(model) / f for f in TOKENIZER_FILES}
        missing = [str(path) for path in assets.values() if not path.is_file()]
        if missing:
            sys.exit(f"gluscope: error: missing {', '.join(missing)}; expected --node-modules with {ORT_WEB} and "
                     f"{TOKENIZERS}, and --model a folder with {' and '.join(TOKENIZER_FILES)}")
        versions = {p.name: json.loads((p / "package.json").read_text())["version"] for p in (dist.parent, tokenizers)}
        print(f"\nwhat a page loads besides the model ({', '.join(f'{k} {v}' for k, v in versions.items())}; wasm "
              "backend, one thread): " + ", ".join(f"{f} {mb(p.stat().st_size)} (gzip {mb(gzipped(p))})"
                                                   for f, p in assets.items()))

        float32 = work / "float32.onnx"
        took = export(hf_model, args.layer, ids, float32)
        print(f"export (torch.onnx.export, dynamo) of layers 0..{args.layer}: {took:.1f} s")
        files = {"float32": float32}
        makers = {"float16": to_float16, "int8": partial(to_blocks, bits=8), "int4": partial(to_blocks, bits=4),
                  "int8-dynamic": to_int8_dynamic}
        for name in variants:
            if name != "float32":
                files[name] = work / f"{name}.onnx"
                makers[name](float32, files[name])

        print("\nin Python (onnxruntime, CPU, one thread) against transformers' forward (max abs diff):")
        for name in variants:
            values, made, ran = onnx_values(files[name], ids)
            print(f"  {name}: {mb(files[name].stat().st_size)} (gzip {mb(gzipped(files[name]))}); session {made:.2f} s, "
                  f"run {ran * 1000:.0f} ms; diff {max_diff(values, reference)} "
                  f"(|post| up to {np.abs(reference['post']).max():.2f})")
        # the length is dynamic and the attention causal: a prefix of the ids gives the reference's first rows
        prefix = len(ids) // 2
        values, _, _ = onnx_values(float32, ids[:prefix])
        print(f"  float32, the first {prefix} ids alone: diff "
              f"{max_diff(values, {k: v[:prefix] for k, v in reference.items()})}")

        print(f"\nin headless Chromium ({CHROMIUM}), ms since navigation start (the page tokenizes the sentence "
              f"itself); warm run = median of {args.runs} further runs of the same session:")
        for name in variants:
            site = work / f"site-{name}"
            site.mkdir()
            for f, path in assets.items():
                shutil.copy(path, site / f)
            shutil.copy(files[name], site / "model.onnx")
            bos = None if prober.bos is None else int(prober.bos)
            (site / "probe.json").write_text(json.dumps({"text": SENTENCE, "bos": bos, "runs": args.runs,
                                                           "cache": args.cache_storage}))
            (site / "index.html").write_text(PAGE)
            load = os.getloadavg()[0]
            kept = "Cache Storage" if args.cache_storage else "HTTP cache"
            for visit, (result, sent, wall) in zip(("first visit (cold cache)", f"second visit ({kept})"),
                                                   browse(site, args.timeout)):
                if result["ids"] != ids.tolist():
                    sys.exit(f"gluscope: error: the page's tokens {result['ids']} are not Python's {ids.tolist()}")
                m = result["mark"]
                model_sent = sent.get("/model.onnx", 0)
                print(f"  {name}, {visit}, load {load:.1f}: sent {mb(model_sent)} model + "
                      f"{mb(sum(sent.values()) - model_sent)} else; runtime imported {m['runtime']:.0f}, tokenizer "
                      f"ready {m['tokenizer']:.0f} (encoding {result['encode']:.1f}), model fetched {m['fetched']:.0f}, "
                      f"session {m['session']:.0f}, FIRST ACTIVATION {m['first']:.0f} ms (wall {wall:.1f} s); warm run "
                      f"{statistics.median(result['warm']):.0f} ms; diff {max_diff(result['values'], reference)}")
                load = os.getloadavg()[0]
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(files[name], args.keep / f"layer{args.layer}-{name}.onnx")
    print(f"\n{machine()}")


if __name__ == "__main__":
    main()
