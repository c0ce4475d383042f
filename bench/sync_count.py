"""Host syncs per batch of a collection at a real model's width (random weights), by operation.

On a GPU every host sync stalls the Python loop until the device has caught up; a dense model's
collection allows one per batch (its read of every layer's flags, :mod:`collect.batch`). This
runs the collection's own loop (``collect_statistics``, distributions on) with each batch under
:class:`collect.syncs.SyncCounter` and prints the counts. On a CPU it counts the GPU's code path
(``ListCapacity.ON_CPU``), as the tests do: the same operations, without a GPU. Counting slows the
run (every aten call passes through Python): time with ``bench/collect_overhead.py``, not here.

    python bench/sync_count.py --shape 7b --device cuda --dtype bfloat16
    python bench/sync_count.py --shape olmoe --layers 1 --tokens 512   # CPU: the GPU's path on a CPU
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: layers, d_model, d_mlp (per expert for olmoe), heads, kv heads, vocab, experts, experts per token
SHAPES = {
    "smollm2": (30, 576, 1536, 9, 3, 49152, 0, 0),  # SmolLM2-135M
    "1b": (16, 2048, 8192, 32, 8, 128256, 0, 0),  # Llama-3.2-1B
    "7b": (32, 4096, 11008, 32, 32, 32000, 0, 0),  # Llama-2-7B / OLMo-7B
    "olmoe": (16, 2048, 1024, 16, 16, 50304, 64, 8),  # OLMoE-1B-7B
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, help="layers built (default: the shape's own)")
    p.add_argument("--experts", type=int, help="experts per layer (olmoe; default 64)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--doc-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    n_layers, d_model, d_mlp, heads, kv_heads, vocab, experts, top_k = SHAPES[args.shape]
    n_layers = args.layers or n_layers
    experts = args.experts or experts
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)

    import transformers

    import tiny
    from collect.config import resolve_experts
    from collect.corpus import Corpus
    from collect.memory import ListCapacity
    from collect.model import prepare_model
    from collect.run import CollectConfig, collect_statistics
    from collect.syncs import SyncCounter

    work = Path(tempfile.mkdtemp(prefix="gluscope-bench-syncs-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer = tiny.train_tokenizer(work, bos=True)
    common = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                  bos_token_id=0)
    config = (transformers.OlmoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k) if experts
              else transformers.LlamaConfig(**common, tie_word_embeddings=True))
    torch.manual_seed(0)
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
        if experts:
            with torch.no_grad():  # routers start at zero: random ones spread tokens over the experts
                for layer in hf.model.layers:
                    layer.mlp.gate.weight.normal_(0, 0.02)
    n_docs = args.tokens // args.doc_len
    tokens = np.random.default_rng(0).integers(3, vocab, size=(n_docs, args.doc_len)).astype(np.int32)
    tokens[:, 0] = 0  # BOS
    corpus = Corpus(tokens=tokens.reshape(-1), doc_offsets=np.arange(n_docs + 1) * args.doc_len,
                    source_index=np.arange(n_docs), titles=None, has_bos=True)
    loaded, _ = prepare_model(hf, tokenizer)
    cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=work / "x.h5", dtype=args.dtype,
                        device=args.device, batch_tokens=args.batch_tokens, progress=False, samples=8)
    ListCapacity.ON_CPU = device.type == "cpu"  # the GPU's code path, also on a CPU
    # The model's own forward pass may sync too (a mixture of experts' routing in Hugging Face code):
    # counted apart, on the first batch's tokens, so that the collection's own share is visible.
    first = torch.from_numpy(tokens[: max(1, args.batch_tokens // args.doc_len)].astype(np.int64)).to(device)
    with torch.inference_mode(), SyncCounter() as bare:
        hf.model(first)

    import collect.run as run_module

    run_batch, per_batch = run_module._run_batch, []

    def counted(*a, **kw):
        with SyncCounter() as syncs:
            run_batch(*a, **kw)
        per_batch.append(syncs.counts)

    run_module._run_batch = counted
    try:
        collect_statistics(loaded, corpus, cfg, list(range(loaded.n_layers)),
                           experts=resolve_experts(None, loaded) if experts else None)
    finally:
        run_module._run_batch = run_batch
    where = torch.cuda.get_device_name() if device.type == "cuda" else "the GPU's code path on a CPU"
    kind = f"{experts} experts x {d_mlp} neurons, top-{top_k}" if experts else f"d_mlp {d_mlp}"
    print(f"shape {args.shape} ({n_layers} layers, d_model {d_model}, {kind}), {args.dtype}, {where}, "
          f"{n_docs} docs x {args.doc_len} tokens, batch_tokens {args.batch_tokens}, distributions on")
    total = Counter()
    for counts in per_batch:
        total.update(counts)
    print(f"host syncs per batch: {[sum(c.values()) for c in per_batch]} (by operation over the run: "
          f"{dict(total)}); the bare forward pass of one batch (no logits) alone: {bare.total} {dict(bare.counts)}")


if __name__ == "__main__":
    main()
