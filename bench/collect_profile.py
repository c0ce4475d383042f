"""Where a dense collection's time goes beyond the forward pass: each part, per layer-batch and per neuron-token.

Runs the collection of ``bench/collect_overhead.py`` (same model shape, random weights, same corpus
and batches) with a timer around each part of the statistics' hot path, and after each collection
batch the forward pass over the layers it reads (no logits) on the same batch. Prints, for the
later batches (the second half) and for the whole run, the median of each part in ms per
layer-batch and ns per neuron-token, against the forward pass's: the parts are inclusive where
indented under another. On a CPU the clock is the CPU time of the one torch thread (the cores may be
shared); the machine's load is printed with the figures.

    python bench/collect_profile.py                     # SmolLM2-135M shape, 512-token documents
    python bench/collect_profile.py --doc-len 128 --batch-tokens 4096
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from collect_overhead import SHAPES, cpu_name, malloc_setting  # noqa: E402

#: (label, depth) in print order; a timer's time includes those indented under it.
PARTS = [
    ("forward over the layers read", 0),
    ("collection batch", 0),
    ("LayerPaths.add", 1),
    ("kernel glue (layer_batch)", 2),
    ("C++ layer_batch", 3),
    ("from_documents", 2),
    ("update_stats", 2),
    ("merge_top (glue)", 3),
    ("C++ merge", 4),
    ("add_candidates", 3),
    ("C++ examples", 4),
    ("C++ windows", 4),
]


class Timers:
    """Inclusive CPU time per label, per batch."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.batches: list[dict[str, float]] = []

    def add(self, label: str, seconds: float) -> None:
        if self.batches:
            self.batches[-1][label] = self.batches[-1].get(label, 0.0) + seconds

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, self.clock() - start)
        return timed

    def patch(self, owner: Any, name: str, label: str) -> None:
        setattr(owner, name, self.wrap(getattr(owner, name), label))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, help="layers of the model (default: the shape's)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--doc-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's dtype (bfloat16: what --dtype auto picks on a CPU with native bfloat16)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc as it is instead of reusing freed memory as collect() does")
    p.add_argument("--per-batch", action="store_true", help="also print each batch's parts (ms per layer-batch)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    malloc = malloc_setting(args.malloc_defaults)
    n_layers, d_model, d_mlp, heads, kv_heads, vocab = SHAPES[args.shape]
    n_layers = args.layers or n_layers

    import transformers

    import collect.batch
    import collect.fused
    import collect.run as run_module
    import collect.stats
    import tiny
    from collect.corpus import Corpus, plan_batches
    from collect.model import prepare_model
    from collect.run import CollectConfig, collect_statistics

    work = Path(tempfile.mkdtemp(prefix="gluscope-profile-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer = tiny.train_tokenizer(work, bos=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(2048, args.doc_len),
        tie_word_embeddings=True, bos_token_id=0)
    n_docs = args.tokens // args.doc_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(n_docs, args.doc_len)).astype(np.int32)
    tokens[:, 0] = 0
    corpus = Corpus(tokens=tokens.reshape(-1), doc_offsets=np.arange(n_docs + 1) * args.doc_len,
                    source_index=np.arange(n_docs), titles=None, has_bos=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    loaded, _ = prepare_model(hf, tokenizer)
    layers = list(range(loaded.n_layers))
    batches = plan_batches(corpus.lengths, args.batch_tokens)
    cfg = CollectConfig(model=str(work), dataset=["synthetic"], out=work / "profile.h5", dtype=args.dtype,
                        batch_tokens=args.batch_tokens, progress=False, samples=args.samples)
    first = batches[0].docs
    warm = Corpus(tokens=tokens[first].reshape(-1), doc_offsets=np.arange(len(first) + 1) * args.doc_len,
                  source_index=first, titles=None, has_bos=True)
    collect_statistics(loaded, warm, cfg, layers)  # compile and self-check once, untimed

    clock = time.thread_time if args.threads == 1 else time.perf_counter
    timers = Timers(clock)
    timers.patch(collect.batch.LayerPaths, "add", "LayerPaths.add")
    timers.patch(collect.fused, "layer_batch", "kernel glue (layer_batch)")
    timers.patch(collect.fused, "from_documents", "from_documents")
    timers.patch(collect.batch, "update_stats", "update_stats")
    timers.patch(collect.fused, "merge_top", "merge_top (glue)")
    timers.patch(collect.stats, "add_candidates", "add_candidates")
    if hasattr(collect.fused, "add_candidates"):
        timers.patch(collect.fused, "add_candidates", "add_candidates")
    if collect.fused._fused is not None:
        kernel = collect.fused._fused

        class Timed:
            layer_batch = staticmethod(timers.wrap(kernel.layer_batch, "C++ layer_batch"))
            merge = staticmethod(timers.wrap(kernel.merge, "C++ merge"))
            windows = staticmethod(timers.wrap(kernel.windows, "C++ windows"))
            if hasattr(kernel, "examples"):
                examples = staticmethod(timers.wrap(kernel.examples, "C++ examples"))
        collect.fused._fused = Timed
    # act(gate) is not timed apart: wrapping the activation would stop the collection from taking it
    # from the model's own activation module (collect.model.run_with_mlp_hooks(with_act=True)).

    run_batch = run_module._run_batch

    fresh_pages: list[tuple[int, int]] = []  # per batch: the collection's, the forward pass's

    def pages() -> int:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    def timed_batch(*a: Any, **kw: Any) -> None:
        timers.batches.append({})
        start, before = clock(), pages()
        run_batch(*a, **kw)
        timers.add("collection batch", clock() - start)
        collected = pages() - before
        ids = torch.from_numpy(tokens[a[2].docs].astype(np.int64))
        start, before = clock(), pages()
        with torch.inference_mode():
            hf.model(ids)
        timers.add("forward over the layers read", clock() - start)
        fresh_pages.append((collected, pages() - before))

    run_module._run_batch = timed_batch
    try:
        collect_statistics(loaded, corpus, cfg, layers)
    finally:
        run_module._run_batch = run_batch

    b = len(batches[0].docs)
    neuron_tokens = b * args.doc_len * d_mlp  # per layer-batch
    print(f"{cpu_name()}, {args.threads} torch thread(s), {'CPU time of the thread' if clock is time.thread_time else 'wall time'}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {malloc}")
    print(f"{args.shape} shape: {n_layers} layers x {d_mlp} neurons, {args.dtype}, --samples {args.samples}; "
          f"{n_docs} documents x {args.doc_len} tokens, {len(batches)} batches of {b}")
    if args.per_batch:
        labels = [label for label, _ in PARTS]
        print("batch  " + "  ".join(f"{label[:12]:>12s}" for label in labels))
        for i, x in enumerate(timers.batches):
            print(f"{i + 1:5d}  " + "  ".join(f"{x.get(label, 0.0) / n_layers * 1e3:12.2f}" for label in labels))
    for title, part in (("later batches", timers.batches[len(batches) // 2:]), ("whole run", timers.batches)):
        print(f"-- {title} ({len(part)} batches): median ms per layer-batch, ns per neuron-token")
        medians = collections.OrderedDict(
            (label, statistics.median(x.get(label, 0.0) for x in part) / n_layers) for label, _ in PARTS)
        for label, depth in PARTS:
            ms = medians[label] * 1e3
            print(f"{'  ' * depth}{label + ':':{40 - 2 * depth}s} {ms:9.2f} ms {ms * 1e6 / neuron_tokens:8.2f} ns")
        print(f"fresh pages faulted in per batch (median): collection "
              f"{statistics.median(c for c, _ in fresh_pages[len(fresh_pages) - len(part):]):,.0f}, forward "
              f"{statistics.median(f for _, f in fresh_pages[len(fresh_pages) - len(part):]):,.0f}")
        fwd = medians["forward over the layers read"]
        ratios = [x["collection batch"] / x["forward over the layers read"] for x in part]
        print(f"collection / forward: median of per-batch ratios {statistics.median(ratios):.3f}; "
              f"statistics beyond the forward {(medians['collection batch'] - fwd) * 1e3:.2f} ms per layer-batch "
              f"(budget at 1.10x: {fwd * 0.1 * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
