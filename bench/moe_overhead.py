"""Collection cost of a mixture-of-experts layer against its bare forward pass, batch by batch, and the
memory its expert neurons need.

OLMoE-1B-7B's layer shape by default (d_model 2048, 64 experts of 1,024 neurons, 8 routed per token;
random weights, routers spread over the experts): every expert's neurons are recorded, 65,536 per
layer. The forward pass it is compared with is the model's trunk (embedding, layers, final norm; no
unembedding: collection skips it too), measured per batch on the same batches in the same run; CPU
seconds of this process (one torch thread), which other jobs on shared cores disturb far less than
wall time. The first batch fills every top-k list; later batches show the steady cost.

    python bench/moe_overhead.py                       # CPU, one thread, 1 layer, 8,192 tokens
    python bench/moe_overhead.py --tokens 65536        # 256 documents: later batches near a long run's cost
    python bench/moe_overhead.py --layers 16 --device cuda --dtype bfloat16 --tokens 65536

The top-k merges cost about k / (documents seen) of their first batch's: with the default 32
documents the "later" batches still rewrite most lists' windows; 65,536 tokens (about 10 minutes on
one CPU core) shows the cost a long run settles to.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def hardware() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        model = " ".join(fields.get("Model name", platform.processor()).split())
        flags = fields.get("Flags", "")
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{model} (family {fields.get('CPU family', '?').strip()} model {fields.get('Model', '?').strip()}, " \
               f"{isa}, {os.cpu_count()} cores)"
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1, help="layers built (OLMoE-1B-7B has 16)")
    p.add_argument("--full-layers", type=int, default=16, help="layers of the whole model, for the memory figures")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--d-expert", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary (the unembedding is not run either way)")
    p.add_argument("--tokens", type=int, default=8192, help="corpus tokens")
    p.add_argument("--doc-len", type=int, default=256, help="tokens per document (BOS included)")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--samples", type=int, default=None, help="random examples per case (default: collect's; 0: none)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--profile", action="store_true",
                   help="also print where a later batch's collection time goes (ms per MoE layer and batch)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc as it is instead of reusing freed memory as collect() does")
    p.add_argument("--profile-first", action="store_true",
                   help="with --profile: the first batch's parts instead (every list filling, the run-time check)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from collect_overhead import malloc_setting

    malloc = malloc_setting(args.malloc_defaults)

    import transformers

    import collect.run as run_module
    import tiny
    from collect.config import resolve_experts
    from collect.corpus import Corpus, plan_batches
    from collect.model import prepare_model
    from collect.run import CollectConfig, collect_statistics
    from collect.stats import state_bytes_per_neuron
    from mkdocs_gluscope.distributions import BAND_SAMPLES, SAMPLES

    work = Path(tempfile.mkdtemp(prefix="gluscope-bench-moe-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer = tiny.train_tokenizer(work, bos=True)
    config = transformers.OlmoeConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_expert,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1, pad_token_id=2)
    n_docs = args.tokens // args.doc_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, args.vocab, size=(n_docs, args.doc_len)).astype(np.int32)
    tokens[:, 0] = 0
    corpus = Corpus(tokens=tokens.reshape(-1), doc_offsets=np.arange(n_docs + 1) * args.doc_len,
                    source_index=np.arange(n_docs), titles=None, has_bos=True)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def clock() -> float:  # CPU seconds on a CPU (robust to shared cores), wall seconds on a GPU
        sync()
        return time.process_time() if device.type == "cpu" else time.perf_counter()

    torch.manual_seed(0)
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        with torch.no_grad():  # routers start at zero: random ones spread tokens over the experts
            for layer in hf.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.02)
    batches = plan_batches(corpus.lengths, args.batch_tokens)
    inputs = [torch.from_numpy(tokens[b.docs].astype(np.int64)).to(device) for b in batches]

    forward_faults: list[int] = []

    def forward_times() -> list[float]:
        times = []
        with torch.inference_mode():
            for ids in inputs:
                f0, t0 = _minor_faults(), clock()
                hf.model(ids)  # the trunk: no unembedding, as collection
                times.append(clock() - t0)
                forward_faults.append(_minor_faults() - f0)
        return times

    forward_times()  # warm-up
    samples = SAMPLES if args.samples is None else args.samples
    loaded, _ = prepare_model(hf, tokenizer)
    cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=work / "x.h5", dtype=args.dtype,
                        device=args.device, batch_tokens=args.batch_tokens, progress=False, compile=args.compile,
                        k=args.k, samples=samples, band_samples=BAND_SAMPLES if samples else 0)
    layers = list(range(loaded.n_layers))
    experts = resolve_experts(None, loaded)
    first = batches[0].docs
    warm = Corpus(tokens=tokens[first].reshape(-1), doc_offsets=np.arange(len(first) + 1) * args.doc_len,
                  source_index=first, titles=None, has_bos=True)
    t0 = time.perf_counter()
    collect_statistics(loaded, warm, cfg, layers, experts=experts)  # compile warm-up
    warm_up = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    collected: list[float] = []
    faults: list[int] = []  # minor page faults per batch: fresh memory the kernel must zero
    real_batch = run_module._run_batch

    def timed_batch(*a, **kw):
        f0, t0 = _minor_faults(), clock()
        real_batch(*a, **kw)
        collected.append(clock() - t0)
        faults.append(_minor_faults() - f0)

    run_module._run_batch = timed_batch
    later_from = max(1, len(batches) // 4)
    profiled = (lambda done: done == 0) if args.profile_first else (lambda done: done >= later_from)
    parts = Parts(profiled, collected) if args.profile else None
    forward = [forward_times() for _ in range(2)]
    collect_statistics(loaded, corpus, cfg, layers, experts=experts)
    forward.append(forward_times())
    run_module._run_batch = real_batch
    if parts is not None:
        parts.remove()
    bare = [statistics.median(f[i] for f in forward) for i in range(len(batches))]
    later = slice(max(1, len(batches) // 4), None)
    window = cfg.context_before + 1 + cfg.context_after
    per_neuron = state_bytes_per_neuron(args.k, window, torch.float16, samples, BAND_SAMPLES if samples else 0)
    neurons = args.full_layers * args.experts * args.d_expert
    load = os.getloadavg()
    print(f"hardware: {hardware() if device.type == 'cpu' else torch.cuda.get_device_name()}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {malloc}")
    print(f"device {args.device} ({args.threads if device.type == 'cpu' else ''} thread(s)), dtype {args.dtype}, "
          f"{n_docs} docs x {args.doc_len} tokens, {len(batches)} batches of {args.batch_tokens} tokens, compile "
          f"{args.compile}, samples {samples}, k {args.k}")
    print(f"model: {args.layers} layer(s) of d_model {args.d_model}, {args.experts} experts x {args.d_expert} neurons, "
          f"top-{args.top_k}; every expert's neurons recorded ({args.layers * args.experts * args.d_expert:,})")
    unit = "CPU s" if device.type == "cpu" else "s"
    print(f"per batch ({unit}), forward / collection: " + ", ".join(f"{f:.2f}/{c:.2f}" for f, c in zip(bare, collected)))
    print(f"whole run:     forward {sum(bare):7.2f} {unit}, collection {sum(collected):7.2f} {unit}: "
          f"ratio {sum(collected) / sum(bare):.2f}   [compile warm-up {warm_up:.1f} s wall]")
    print(f"first batch:   ratio {collected[0] / bare[0]:.2f}")
    print(f"page faults per batch (fresh 4 KiB pages, each zeroed by the OS): first {faults[0]:,}, later median "
          f"{int(statistics.median(faults[later])):,}; the bare forward pass's median {int(statistics.median(forward_faults)):,}")
    print(f"later batches ({len(batches) - later.start} from batch {later.start}): ratio "
          f"{sum(collected[later]) / sum(bare[later]):.2f}")
    print(f"statistics memory: {per_neuron / 1024:.1f} KiB per expert neuron (k={args.k}, W={window}, float16 "
          f"windows) = {per_neuron * args.d_expert * args.experts / 2**30:.2f} GiB per layer; whole model "
          f"({args.full_layers} layers, {neurons:,} expert neurons): {per_neuron * neurons / 2**30:.1f} GiB")
    if device.type == "cuda":
        print(f"peak device memory in the run: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if parts is not None:
        span = slice(0, 1) if args.profile_first else later
        n_profiled = len(bare[span])
        per = 1000 / (n_profiled * args.layers)
        what = "the first batch's time goes" if args.profile_first else "a later batch's time goes"
        print(f"where {what} ({unit[:-2]}ms per MoE layer and batch, mean of {n_profiled} batches; "
              "nested parts indented):")
        print(f"  bare forward pass of the layer            {sum(bare[span]) * per:8.1f}")
        print(f"  collection, all of it                     {sum(collected[span]) * per:8.1f}")
        print(f"  packed slots filled, per layer-batch: {'; '.join(parts.packed)}")
        for name, depth in parts.NAMES:
            if parts.totals.get(name):
                print(f"  {'  ' * depth}{name:<{40 - 2 * depth}} {parts.totals[name] * per:8.1f}   "
                      f"{parts.faults.get(name, 0) / (n_profiled * args.layers):9,.0f} page faults")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Parts:
    """Seconds spent in the expert statistics' parts, in the batches ``profiled(batches done)`` picks:
    each function wrapped where its callers look it up (CPU seconds of this process, as the batches)."""

    NAMES = [("run_with_mlp_hooks", 0), ("pack_experts", 0), ("LayerPaths.add", 0), ("reduce (compiled)", 1),
             ("kernel layer_batch", 1), ("check_outputs", 1), ("update_stats", 1), ("merge_top", 2), ("kernel merge", 2),
             ("histogram", 2), ("update_examples", 2), ("add_candidates", 2), ("kernel examples", 2), ("windows", 3),
             ("LayerPaths.redo", 0)]

    def __init__(self, profiled: Callable[[int], bool], collected: list[float]) -> None:
        import collect.batch as batch_module
        import collect.fused as fused_module
        import collect.run as run_module
        import collect.stats as stats_module

        self.totals: dict[str, float] = {}
        self.faults: dict[str, int] = {}  # minor page faults in each part
        self.undo: list[tuple[object, str, object]] = []
        in_profile = lambda: profiled(len(collected))  # noqa: E731: is the batch in flight one to profile

        def wrap(owner: object, attr: str, name: str) -> None:
            real = getattr(owner, attr)

            def timed(*a, **kw):
                if not in_profile():
                    return real(*a, **kw)
                t0, f0 = time.process_time(), _minor_faults()
                try:
                    return real(*a, **kw)
                finally:
                    self.totals[name] = self.totals.get(name, 0.0) + time.process_time() - t0
                    self.faults[name] = self.faults.get(name, 0) + _minor_faults() - f0

            self.undo.append((owner, attr, real))
            setattr(owner, attr, timed)

        wrap(run_module, "pack_experts", "pack_experts")
        wrap(run_module, "run_with_mlp_hooks", "run_with_mlp_hooks")
        self.packed: list[str] = []  # each later batch's packing: slots filled of slots packed
        timed_pack = run_module.pack_experts

        def pack(*a, **kw):
            packed = timed_pack(*a, **kw)
            if in_profile():
                filled = packed.packing.filled
                self.packed.append(f"{int(filled.sum()):,} of {filled.numel():,} (length {filled.shape[1]})")
            return packed

        run_module.pack_experts = pack
        wrap(batch_module.LayerPaths, "add", "LayerPaths.add")
        wrap(batch_module.LayerPaths, "redo", "LayerPaths.redo")
        wrap(batch_module, "check_outputs", "check_outputs")
        wrap(batch_module, "update_stats", "update_stats")
        wrap(fused_module, "layer_batch", "kernel layer_batch")
        wrap(stats_module, "merge_top", "merge_top")
        wrap(fused_module, "merge_top", "kernel merge")
        wrap(stats_module, "update_examples", "update_examples")
        wrap(stats_module, "add_candidates", "add_candidates")
        if hasattr(fused_module, "add_candidates"):
            wrap(fused_module, "add_candidates", "kernel examples")
        wrap(stats_module.Packing, "windows_at", "windows")
        real_init = batch_module.LayerPaths.__init__

        def init(paths, *a, **kw):
            real_init(paths, *a, **kw)
            for attr, name in (("reduce", "reduce (compiled)"), ("histogram", "histogram")):
                real = getattr(paths, attr)

                def timed(*args, real=real, name=name):
                    if not in_profile():
                        return real(*args)
                    t0, f0 = time.process_time(), _minor_faults()
                    try:
                        return real(*args)
                    finally:
                        self.totals[name] = self.totals.get(name, 0.0) + time.process_time() - t0
                        self.faults[name] = self.faults.get(name, 0) + _minor_faults() - f0
                setattr(paths, attr, timed)

        self.undo.append((batch_module.LayerPaths, "__init__", real_init))
        batch_module.LayerPaths.__init__ = init

    def remove(self) -> None:
        for owner, attr, real in reversed(self.undo):
            setattr(owner, attr, real)


if __name__ == "__main__":
    main()
