"""Collection cost against the bare forward pass, and file size per neuron.

Runs, on the same model, tokens, batches and dtype: (a) the plain Hugging Face forward pass with
its default attention (logits included), (b) the full collection (the same model with the MLP
hooks, all statistics, the file written; it stops after the last MLP). Each collection batch is
followed by (a) on the same batch, so that both see the same load where cores are shared. Prints
both times, the ratio b/a, and bytes per neuron, for each document length asked for (default:
128 and 512 tokens), and for each ``--samples`` asked for (default: 0, the statistics without the
distributions, and 8, with histograms, density, samples and bands), the variants interleaved so
that they see the same load; the vocabulary projections (once per run, not per batch) are timed apart.

Two ratios, since the statistics cost falls during a run: a document enters a top-k list only if
it beats the list's k-th entry, which happens about k / (documents seen) of the time, and only
the lists that change are merged. "whole run" is the ratio over the whole (short) bench corpus,
where almost every document still enters the lists; "later batches" is the median per-batch
time of the second half of the batches (after half the documents were seen) over the median
forward time of the same batches: closer to a real run's steady state (20M tokens are 20,000 to
150,000 documents, not a few hundred), and still an overestimate of it.

Both sides run in this process with glibc's malloc set as ``collect()`` sets it
(``collect/allocator.py``), so that neither faults in again the pages the other freed (with glibc's
defaults the collection's churn made the interleaved bare forward pass fault too, which made the
ratios look lower); ``--malloc-defaults`` times them with the defaults, as figures before d350cbf were.

    python bench/collect_overhead.py                      # SmolLM2-135M shape, CPU, one thread, 128 and 512
    python bench/collect_overhead.py --shape 7b --device cuda --dtype bfloat16 --tokens 262144 --no-file
    # issue 16's 512-token figure, nearer a long run: 512 documents, later batches after 256 of them
    # (about 46 minutes on one core of a Zen 4)
    python bench/collect_overhead.py --trunk --samples 8 --repeats 1 --no-file --doc-len 512 --tokens 262144
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
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
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                   help="model shape (random weights); the options below override its parts")
    p.add_argument("--layers", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--d-mlp", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--tokens", type=int, default=32768, help="corpus tokens per document length")
    p.add_argument("--doc-len", type=int, nargs="+", default=[128, 512],
                   help="tokens per document (BOS included); one measurement each")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs; medians are printed")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc as it is instead of reusing freed memory as collect() does "
                        "(collect/allocator.py; the figures before it were timed so)")
    p.add_argument("--trunk", action="store_true",
                   help="also time the forward pass without the logits (the collection stops before them)")
    p.add_argument("--wall", action="store_true",
                   help="wall time on a CPU too (default there: the CPU time of the one torch thread)")
    p.add_argument("--samples", type=int, nargs="+", default=[0, 8],
                   help="--samples of each variant (0: no distributions; default: 0 and 8)")
    p.add_argument("--no-file", action="store_true",
                   help="time the run only, without writing the file (for large models on a GPU)")
    p.add_argument("--state-only", action="store_true",
                   help="print the statistics' memory per neuron (device and host) for each --samples, and stop")
    args = p.parse_args()
    for name, value in zip(("layers", "d_model", "d_mlp", "heads", "kv_heads", "vocab"), SHAPES[args.shape]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.state_only:
        from collect.run import CollectConfig

        for samples in args.samples:
            print_state(CollectConfig(model="m", dataset=[], out=Path("o"), samples=samples), args.layers * args.d_mlp)
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(malloc_setting(args.malloc_defaults))
    for doc_len in args.doc_len:
        measure(args, doc_len)


#: layers, d_model, d_mlp, heads, kv heads, vocab
SHAPES = {
    "smollm2": (30, 576, 1536, 9, 3, 49152),  # SmolLM2-135M
    "1b": (16, 2048, 8192, 32, 8, 128256),  # Llama-3.2-1B
    "7b": (32, 4096, 11008, 32, 32, 32000),  # Llama-2-7B / OLMo-7B
}


def print_state(cfg: "CollectConfig", neurons: int) -> None:
    """The statistics a run keeps per neuron (float16 windows): in all (a CPU run's memory), and on a
    GPU the device's part and the host memory's (the top-k windows)."""
    from collect.stats import state_bytes_per_neuron

    window = cfg.context_before + 1 + cfg.context_after
    per = {part: state_bytes_per_neuron(cfg.k, window, torch.float16, cfg.samples, cfg.band_samples, part)
           for part in ("all", "device", "host")}
    what = f"samples {cfg.samples}, band samples {cfg.band_samples}" if cfg.samples else "no distributions"
    print(f"resident statistics (k {cfg.k}, {window}-token float16 windows, {what}): {per['all']:,} bytes per neuron, {per['all'] * neurons / 2**30:.2f} GiB for "
          f"{neurons:,} neurons; on a GPU: device state {per['device']:,} bytes per neuron "
          f"({per['device'] * neurons / 2**30:.2f} GiB), host state {per['host']:,} bytes per neuron "
          f"({per['host'] * neurons / 2**30:.2f} GiB: the top-k windows)")


def malloc_setting(defaults: bool) -> str:
    """Applies collect()'s setting of glibc's malloc unless ``defaults`` (both sides of a comparison
    run in this process); returns the line that says which was timed."""
    from collect.allocator import keep_freed_memory

    if defaults:
        return "glibc malloc: its defaults (--malloc-defaults)"
    return ("glibc malloc: freed memory kept for reuse, as collect() sets it" if keep_freed_memory()
            else "malloc: as it is (not glibc)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def measure(args: argparse.Namespace, doc_len: int) -> None:
    args.doc_len = doc_len

    import transformers

    from collect.corpus import Corpus
    from collect.output import finalize
    from collect.run import CollectConfig, collect_statistics
    from collect.model import prepare_model
    from mkdocs_gluscope.store import ActivationsWriter

    work = Path(tempfile.mkdtemp(prefix="gluscope-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a run leaves 1.5 GB of checkpoints and files
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

    # On a CPU, the thread's CPU time: the cores are shared with other jobs, and one torch thread
    # computes in this thread alone, so this is the work done, not the waiting for a core.
    clock = time.thread_time if device.type == "cpu" and args.threads == 1 and not args.wall else time.perf_counter

    def forward(docs: np.ndarray, logits: bool = True) -> float:
        start = clock()
        with torch.inference_mode():
            (hf if logits else hf.model)(torch.from_numpy(tokens[docs].astype(np.int64)).to(device))
        sync()
        return clock() - start

    forward(batches[0].docs)  # warm-up

    # (b) the full collection, on the same model: statistics from the MLP hooks, then the file.
    loaded, facts = prepare_model(hf, tokenizer)  # refactor_glu leaves the model's output as it was
    layers = list(range(loaded.n_layers))
    first = batches[0].docs
    warm_corpus = Corpus(tokens=tokens[first].reshape(-1), doc_offsets=np.arange(len(first) + 1) * args.doc_len,
                         source_index=first, titles=None, has_bos=True)
    configs = {samples: CollectConfig(model=str(work), dataset=["synthetic"], out=work / f"bench-{samples}.h5",
                                      dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens,
                                      progress=False, samples=samples)
               for samples in args.samples}
    warm_up = {}
    for samples, cfg in configs.items():
        t0 = time.perf_counter()
        collect_statistics(loaded, warm_corpus, cfg, layers)  # torch.compile warm-up on one batch
        sync()
        warm_up[samples] = time.perf_counter() - t0
    from collect.vocab import file_vocab

    t0 = time.perf_counter()
    vocab, _ = file_vocab(loaded, layers, {})
    sync()
    vocab_time = time.perf_counter() - t0
    # Paired timing: each collection batch (it ends with the batch's one host sync) is followed by
    # the bare forward pass of the same batch, so both see the same load on shared cores.
    import collect.run as run_module

    run_batch = run_module._run_batch
    # per variant, repeat and batch: (collection, forward with logits, forward without them or 0)
    pairs: dict[int, list[list[tuple[float, float, float]]]] = {s: [] for s in configs}
    current = [args.samples[0]]

    def timed_batch(*a, **kw):
        start = clock()
        run_batch(*a, **kw)
        sync()
        collected = clock() - start
        pairs[current[0]][-1].append((collected, forward(a[2].docs), forward(a[2].docs, logits=False)
                                      if args.trunk else 0.0))

    run_module._run_batch = timed_batch
    runs: dict[int, list[tuple[float, float]]] = {s: [] for s in configs}  # loop, file seconds

    def full(samples: int) -> None:
        cfg = configs[samples]
        current[0] = samples
        pairs[samples].append([])
        start = clock()
        states = collect_statistics(loaded, corpus, cfg, layers)
        sync()
        loop = clock() - start - sum(f + t for _, f, t in pairs[samples][-1])
        start = clock()
        if not args.no_file:
            with ActivationsWriter(cfg.out, n_layers=len(layers), d_mlp=loaded.d_mlp, k=cfg.k,
                                   context_before=cfg.context_before, context_after=cfg.context_after,
                                   attrs={"model": "bench"}, samples=cfg.samples,
                                   band_samples=cfg.band_samples) as writer:
                writer.write_corpus(corpus.tokens, corpus.doc_offsets, ["t"] * args.vocab,
                                    source_index=corpus.source_index)
                for row, layer in enumerate(layers):
                    writer.write_layer(row, finalize(states[layer], cfg.window_dtype))
                writer.write_weights({k: v.numpy() for k, v in facts.items()})
                if samples:
                    writer.write_vocab(*vocab[""])
                writer.close(n_tokens=int(corpus.lengths.sum()) - n_docs)
        runs[samples].append((loop, clock() - start))

    for _ in range(args.repeats):
        for samples in configs:
            full(samples)
    run_module._run_batch = run_batch
    neurons = args.layers * args.d_mlp
    print(f"device {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu_name()}, {args.threads} thread(s)'}), "
          f"dtype {args.dtype}, {n_docs} docs x {args.doc_len} tokens, batch_tokens {args.batch_tokens} "
          f"({len(batches)} batches of {len(batches[0].docs)} documents)")
    print(f"model: {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}, vocab {args.vocab}")
    late = slice(len(batches) // 2, None)
    docs_seen = sum(len(x.docs) for x in batches[:late.start])
    print(f"clock: {'CPU time of the one torch thread' if clock is time.thread_time else 'wall time'}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    late_ratios = {}
    for samples, cfg in configs.items():
        label = "without distributions (--samples 0)" if samples == 0 else f"with distributions (--samples {samples})"
        loop = statistics.median(r[0] for r in runs[samples])
        file = statistics.median(r[1] for r in runs[samples])
        print(f"-- {label}")
        baselines = [("a", "bare HF forward (logits included)", 1)] + ([("c", "forward without logits", 2)]
                                                                         if args.trunk else [])
        for name, what, column in baselines:
            base = statistics.median(sum(x[column] for x in repeat) for repeat in pairs[samples])
            print(f"({name}) {what + ':':34s} {base:8.2f} s  ({args.tokens / base:,.0f} tok/s)")
        print(f"(b) full collection:                 {loop + file:8.2f} s  ({args.tokens / (loop + file):,.0f} tok/s): "
              f"run {loop:.2f} s + writing the file {file:.2f} s   [compile warm-up, once per process: "
              f"{warm_up[samples]:.1f} s]")
        for name, what, column in baselines:
            base = statistics.median(sum(x[column] for x in repeat) for repeat in pairs[samples])
            late_ratio = statistics.median(x[0] / x[column] for repeat in pairs[samples] for x in repeat[late])
            late_b = statistics.median(x[0] for repeat in pairs[samples] for x in repeat[late])
            late_base = statistics.median(x[column] for repeat in pairs[samples] for x in repeat[late])
            print(f"ratio b/{name}, whole run:     {(loop + file) / base:8.3f}   (run alone: {loop / base:.3f})")
            print(f"ratio b/{name}, later batches: {late_ratio:8.3f}   (median of per-batch ratios over batches "
                  f"{late.start + 1}-{len(batches)}, after {docs_seen} documents seen; medians {late_b:.3f} s vs "
                  f"{late_base:.3f} s)")
            late_ratios.setdefault(name, {})[samples] = late_ratio
        print_state(cfg, neurons)
        size = cfg.out.stat().st_size if cfg.out.exists() else 0
        if size:
            print(f"file: {size:,} bytes = {size / neurons:,.0f} bytes per neuron ({neurons:,} neurons; "
                  f"corpus {corpus.tokens.nbytes:,} bytes of it)")
    for name, ratios in late_ratios.items():
        if 0 in ratios:
            for samples, ratio in ratios.items():
                if samples:
                    print(f"distributions (--samples {samples}) raise the later-batch ratio b/{name} by "
                          f"{(ratio / ratios[0] - 1) * 100:+.1f}% ({ratios[0]:.3f} -> {ratio:.3f})")
    print(f"vocabulary projections (once per run): {vocab_time:.1f} s")


if __name__ == "__main__":
    main()
