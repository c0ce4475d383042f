"""Collection cost of a mixture-of-experts model against its bare forward pass, and the memory
its expert neurons need.

OLMoE-1B-7B's shape by default (d_model 2048, 64 experts of 1,024 neurons, 8 routed per token,
16 layers; random weights): every expert's neurons are recorded, 65,536 per layer. ``--layers``
builds fewer layers of that shape (the whole model is 28 GB in float32); the memory figures are
given for the whole model too, from the statistics' own tensors.

    python bench/moe_overhead.py --layers 2 --tokens 2048          # CPU, one thread
    python bench/moe_overhead.py --layers 16 --device cuda --dtype bfloat16 --tokens 65536
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def stats_bytes(d_mlp: int, k: int, window: int, window_dtype: torch.dtype) -> int:
    """Bytes of one expert's running statistics (LayerStats) on the device."""
    from collect.stats import LayerStats

    state = LayerStats.empty(d_mlp, k, window, "meta", window_dtype)
    return sum(t.numel() * t.element_size() for t in state.to_dict().values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="layers built (OLMoE-1B-7B has 16)")
    p.add_argument("--full-layers", type=int, default=16, help="layers of the whole model, for the memory figures")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--d-expert", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--tokens", type=int, default=2048, help="corpus tokens")
    p.add_argument("--doc-len", type=int, default=256, help="tokens per document (BOS included)")
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    import transformers

    import tiny
    from collect.corpus import Corpus, plan_batches
    from collect.model import prepare_model
    from collect.config import resolve_experts
    from collect.run import CollectConfig, collect_statistics

    work = Path(tempfile.mkdtemp(prefix="gluscope-bench-moe-"))
    tokenizer = tiny.train_tokenizer(work, bos=True)
    config = transformers.OlmoeConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_expert,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096, bos_token_id=0)
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

    torch.manual_seed(0)
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        with torch.no_grad():  # routers start at zero: random ones spread tokens over the experts
            for layer in hf.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.02)
    batches = plan_batches(corpus.lengths, args.batch_tokens)
    inputs = [torch.from_numpy(tokens[b.docs].astype(np.int64)) for b in batches]

    # CPU seconds too: on shared cores (other jobs running) they vary much less than wall time.
    def forward() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids in inputs:
                hf(ids.to(device))
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    with torch.inference_mode():
        hf(inputs[0].to(device))
    runs = [forward() for _ in range(2)]
    a, a_cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    loaded, _ = prepare_model(hf, tokenizer)
    cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=work / "x.h5", dtype=args.dtype,
                        device=args.device, batch_tokens=args.batch_tokens, progress=False, compile=args.compile,
                        k=args.k)
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
    t0, c0 = time.perf_counter(), time.process_time()
    collect_statistics(loaded, corpus, cfg, layers, experts=experts)
    sync()
    b, b_cpu = time.perf_counter() - t0, time.process_time() - c0
    window = cfg.context_before + 1 + cfg.context_after
    per_expert = stats_bytes(args.d_expert, args.k, window, getattr(torch, cfg.window_dtype))
    per_neuron = per_expert / args.d_expert
    neurons = args.full_layers * args.experts * args.d_expert
    print(f"device {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} thread(s)'}), "
          f"dtype {args.dtype}, {n_docs} docs x {args.doc_len} tokens, batch_tokens {args.batch_tokens}, "
          f"compile {args.compile}")
    print(f"model: {args.layers} layers of d_model {args.d_model}, {args.experts} experts x {args.d_expert} neurons, "
          f"top-{args.top_k}, vocab {args.vocab}")
    print(f"(a) bare HF forward:   {a:8.2f} s  ({args.tokens / a:,.0f} tok/s)")
    print(f"(b) collection run:    {b:8.2f} s  ({args.tokens / b:,.0f} tok/s)   [compile warm-up {warm_up:.1f} s]")
    print(f"ratio b/a:             {b / a:8.2f}   (CPU seconds: {b_cpu:.2f} / {a_cpu:.2f} = {b_cpu / a_cpu:.2f})")
    print(f"statistics memory: {per_neuron / 1024:.1f} KiB per neuron (k={args.k}, W={window}, float16 windows) = "
          f"{per_expert / 2**20:.1f} MiB per expert = {per_expert * args.experts / 2**30:.2f} GiB per layer; "
          f"whole model ({args.full_layers} layers, {neurons:,} expert neurons): "
          f"{per_neuron * neurons / 2**30:.1f} GiB")
    if device.type == "cuda":
        print(f"peak device memory in the run: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
