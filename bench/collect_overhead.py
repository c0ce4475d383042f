"""Collection cost against the bare forward pass, and file size per neuron.

Runs, on the same model, tokens, batches and dtype: (a) the plain Hugging Face forward pass with
its default attention, (b) the full collection (the same model with the MLP hooks, all
statistics, the file written). Prints both times, the ratio b/a, and bytes per neuron.

    python bench/collect_overhead.py                      # SmolLM2-135M shape, CPU, one thread
    python bench/collect_overhead.py --device cuda --dtype bfloat16 --tokens 262144
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-mlp", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=16384, help="corpus tokens")
    p.add_argument("--doc-len", type=int, default=512, help="tokens per document (BOS included)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each variant; medians are printed")
    p.add_argument("--no-file", action="store_true",
                   help="time the run only, without writing the file (for large models on a GPU)")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    import transformers

    from collect.corpus import Corpus
    from collect.run import CollectConfig, collect_statistics, finalize
    from collect.model import prepare_model
    from mkdocs_gluscope.store import ActivationsWriter

    work = Path(tempfile.mkdtemp(prefix="gluscope-bench-"))
    import tiny

    tokenizer = tiny.train_tokenizer(work, bos=True)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.doc_len), tie_word_embeddings=True, bos_token_id=0)

    n_docs = args.tokens // args.doc_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, args.vocab, size=(n_docs, args.doc_len)).astype(np.int32)
    tokens[:, 0] = 0  # BOS
    corpus = Corpus(tokens=tokens.reshape(-1), doc_offsets=np.arange(n_docs + 1) * args.doc_len,
                    source_index=np.arange(n_docs), titles=None, has_bos=True)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # (a) the plain Hugging Face model, default attention, same batches.
    from collect.corpus import plan_batches

    torch.manual_seed(0)
    with device:  # random weights made where they run: no copy of a large model through the host
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    batches = plan_batches(corpus.lengths, args.batch_tokens)
    inputs = [torch.from_numpy(tokens[b.docs].astype(np.int64)) for b in batches]

    def forward() -> None:
        with torch.inference_mode():
            for ids in inputs:
                hf(ids.to(device))
        sync()

    with torch.inference_mode():
        hf(inputs[0].to(device))  # warm-up
    sync()
    times_a = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        forward()
        times_a.append(time.perf_counter() - t0)

    # (b) the full collection, on the same model: statistics from the MLP hooks, then the file.
    loaded, facts = prepare_model(hf, tokenizer)
    out = work / "bench.h5"
    cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=out, dtype=args.dtype, device=args.device,
                        batch_tokens=args.batch_tokens, progress=False)
    layers = list(range(loaded.n_layers))
    first = batches[0].docs
    warm_corpus = Corpus(tokens=tokens[first].reshape(-1), doc_offsets=np.arange(len(first) + 1) * args.doc_len,
                         source_index=first, titles=None, has_bos=True)
    t0 = time.perf_counter()
    collect_statistics(loaded, warm_corpus, cfg, layers)  # torch.compile warm-up on one batch
    sync()
    warm_up = time.perf_counter() - t0
    loop_times: list[float] = []

    def full() -> None:
        start = time.perf_counter()
        states = collect_statistics(loaded, corpus, cfg, layers)
        sync()
        loop_times.append(time.perf_counter() - start)
        if args.no_file:
            return
        with ActivationsWriter(out, n_layers=len(layers), d_mlp=loaded.d_mlp, k=cfg.k,
                               context_before=cfg.context_before, context_after=cfg.context_after,
                               attrs={"model": "bench"}) as writer:
            writer.write_corpus(corpus.tokens, corpus.doc_offsets, ["t"] * args.vocab)
            for row, layer in enumerate(layers):
                writer.write_layer(row, finalize(states[layer], cfg.window_dtype))
            writer.write_weights({k: v.numpy() for k, v in facts.items()})
            writer.close(n_tokens=int(corpus.lengths.sum()) - n_docs)

    times_b = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        full()
        times_b.append(time.perf_counter() - t0)

    a, b = statistics.median(times_a), statistics.median(times_b)
    neurons = args.layers * args.d_mlp
    size = out.stat().st_size if out.exists() else 0
    print(f"device {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} thread(s)'}), "
          f"dtype {args.dtype}, {n_docs} docs x {args.doc_len} tokens, batch_tokens {args.batch_tokens}")
    print(f"model: {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}, vocab {args.vocab}")
    print(f"(a) bare HF forward:      {a:8.2f} s  ({args.tokens / a:,.0f} tok/s)")
    loop = statistics.median(loop_times)
    print(f"(b) full collection:      {b:8.2f} s  ({args.tokens / b:,.0f} tok/s): run {loop:.2f} s + "
          f"writing the file {b - loop:.2f} s   [compile warm-up, once per process: {warm_up:.1f} s]")
    print(f"ratio b/a:                {b / a:8.3f}   (run alone: {loop / a:.3f})")
    if size:
        print(f"file: {size:,} bytes = {size / neurons:,.0f} bytes per neuron ({neurons:,} neurons; "
              f"corpus {corpus.tokens.nbytes:,} bytes of it)")


if __name__ == "__main__":
    main()
