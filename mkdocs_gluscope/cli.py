"""The ``gluscope`` command: ``collect``, ``pages``, ``info``, ``merge``, ``pick``, ``explain``, ``export`` and ``demo``.

Each subcommand is thin glue: it parses options and calls a library function. Errors the user can
fix come out as one ``gluscope: error: ...`` line and exit status 2 (bad options too); Ctrl-C
during ``collect`` leaves a checkpoint and exits with 130, SIGTERM the same with 143.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from mkdocs_gluscope.errors import GluscopeError, printable
from mkdocs_gluscope.distributions import BAND_SAMPLES, SAMPLES


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one ``gluscope: error: ...`` line like every other bad input."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("gluscope").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"gluscope: error: {where}{message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list[int]:
    """``3``, ``0,5,7`` or ``2-4`` (inclusive); at least one layer."""
    expected = "expected layers such as 3, 0,5,7 or 2-4"
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"{text!r}: the range {part} runs backwards; {expected}")
                out += list(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer; {expected}")
    return out


def _expert_list(text: str) -> list[int | str]:
    """``3``, ``0,5,7``, ``0-7`` or ``0-7,s`` (``s``: the shared expert); at least one expert."""
    expected = "expected experts such as 3, 0,5,7, 0-7 or 0-7,s (s: the shared expert)"
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "s":
            out.append("s")
            continue
        try:
            out += _int_list(part) if part else []
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no expert; {expected}")
    return list(dict.fromkeys(out))


def _count(text: str) -> int:
    from collect.corpus import parse_count

    try:
        return parse_count(text)
    except GluscopeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub name, save_pretrained folder, or GGUF file (or a folder holding one)")
    p.add_argument("--dataset", required=True, nargs="+",
                   help="hub dataset name, save_to_disk folder, or .txt/.jsonl/.parquet files or folders")
    p.add_argument("--out", required=True, type=Path, help="the activations file to write (.h5)")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the corpus (default: 0)")
    p.add_argument("--max-tokens", type=_count, default=20_000_000,
                   help="stop after this many corpus tokens, e.g. 500k or 20M (default: 20M)")
    p.add_argument("--max-doc-tokens", type=int, default=1024,
                   help="tokens per document, BOS included (default: 1024)")
    p.add_argument("--long-docs", choices=("truncate", "split"), default="truncate",
                   help="cut long texts, or split them into further documents (default: truncate)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="a BOS token first in every document: as the tokenizer does (auto), always (its EOS "
                        "if it has no BOS, as TransformerLens does), or never (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="dtype the model runs in: auto, float32, bfloat16 or float16; auto is bfloat16 on a GPU "
                        "that supports it and on a CPU with native bfloat16 (AVX512-BF16 or AMX), else "
                        "float32; statistics accumulate in float32/float64 (default: auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="layers to record, e.g. 0,5 or 10-20 (default: all)")
    p.add_argument("--experts", type=_expert_list, default=None,
                   help="in mixture-of-experts layers, the experts to record, e.g. 0-7 or 0-7,s (s: the shared "
                        "expert); every expert's neurons are neurons, with statistics over the tokens routed to "
                        "it (default: all)")
    p.add_argument("--engine", choices=("hf", "bridge"), default="hf",
                   help="capture the hooks from the Hugging Face modules (default, fastest) or through "
                        "TransformerLens' TransformerBridge (same values; eager attention)")
    p.add_argument("--k", type=int, default=16, help="examples kept per case and hook (default: 16)")
    p.add_argument("--context-before", type=int, default=16,
                   help="window tokens before each example's token (default: 16)")
    p.add_argument("--context-after", type=int, default=2,
                   help="window tokens after each example's token (default: 2)")
    p.add_argument("--include-bos", action="store_true",
                   help="count the BOS position too (excluded by default: it holds attention-sink outliers)")
    p.add_argument("--skip-positions", type=int, default=0, metavar="N",
                   help="leave the first N positions after the BOS of every document out of all statistics, "
                        "e.g. where early tokens act as attention sinks; not with --include-bos (default: 0)")
    p.add_argument("--no-refactor-glu", dest="refactor_glu", action="store_false",
                   help="keep the weights as they are (by default, neurons with w_gate.w_in < 0 "
                        "get w_in and w_out flipped)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="padded tokens per batch (default: 8192; raise it on a large GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the statistics eagerly (slower; no torch.compile warm-up)")
    p.add_argument("--samples", type=int, default=SAMPLES, metavar="S",
                   help="uniform random examples kept per case, next to the top-k; 0 records no distributions "
                        f"(no histograms, density, samples or bands) (default: {SAMPLES})")
    p.add_argument("--band-samples", type=int, default=BAND_SAMPLES, metavar="S",
                   help=f"random examples kept per case and band of |post| (default: {BAND_SAMPLES})")
    p.add_argument("--no-effects", dest="effects", action="store_false",
                   help="stop each forward pass after the last recorded MLP, as before effects: no "
                        "corpus/final_scale and no top/next_score, so pages show no effect on the output "
                        "(default: run on to the final norm and record them)")
    p.add_argument("--window-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the stored gate/in windows (default: float16)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process shard I of N (every N-th batch), e.g. one per GPU; combine the files "
                        "with gluscope merge (default: the whole corpus)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT.ckpt if it exists (written every --checkpoint-every seconds and on "
                        "Ctrl-C or SIGTERM); it must come from the same options and corpus")
    p.add_argument("--checkpoint-every", type=float, default=600.0,
                   help="seconds between checkpoints (default: 600)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_collect(args: argparse.Namespace) -> int:
    try:
        from collect.run import CollectConfig, Interrupted, collect
    except ImportError as e:
        raise GluscopeError(
            f"gluscope collect needs the [collect] extra ({e.name} is missing): "
            "pip install 'gluscope[collect]'") from None
    config = CollectConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func")})
    try:
        path = collect(config)
    except Interrupted as e:
        print(f"gluscope: {e}", file=sys.stderr)
        return e.exit_status  # 130 after Ctrl-C, 143 after SIGTERM
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes the file
        print(f"gluscope: wrote {path}")
    return 0


def add_pages_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5)")
    p.add_argument("--neurons", nargs="+", required=True,
                   help='neuron ids LAYER.NEURON, a whole layer "3.*", or "all"')
    p.add_argument("--out", type=Path, required=True, help="folder to write Markdown pages into")
    p.add_argument("--examples", type=int, default=None, help="examples shown per list (default: all k)")
    p.add_argument("--color-hook", default="hook_post",
                   help="hook that colors the tokens at first (default: hook_post)")


def run_pages(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.pages import write_markdown_pages

    written = write_markdown_pages(args.activations, args.neurons, args.out,
                                   examples=args.examples, color_hook=args.color_hook)
    print(f"gluscope: wrote {len(written)} pages under {args.out}")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5)")


def open_activations(path: Path):
    """The file, or a one-line error naming it and what is wrong."""
    from mkdocs_gluscope.store import ActivationsFile, FormatError

    try:
        return ActivationsFile(path)
    except (FileNotFoundError, FormatError) as e:
        raise GluscopeError(str(e)) from None


def run_info(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.store import CASES

    lines: list[str] = []  # printed once all is read: a damaged file gives its error line alone
    out = lines.append
    with open_activations(args.activations) as f:
        for key in ("model", "dataset", "dtype", "act_fn", "refactor_glu", "include_bos", "created"):
            if key in f.attrs:  # text from the file: escaped, so it cannot act on the terminal
                out(f"{key:>14}: {printable(f.attrs[key])}")
        out(f"{'layers':>14}: {f.describe_layers()} ({f.n_layers})")
        if f.expert_layers or f.attrs.get("skipped_layers") is not None:
            # Which of the model's layers hold neurons: a hybrid stack's attention or state-space
            # layers hold none, an MoE layer holds its experts'.
            held = sorted(set(f.layers) | set(f.expert_layers))
            total = f.attrs.get("n_model_layers")
            text = f"{', '.join(map(str, held))}" + (f" of {total} model layers" if total else "")
            skipped = list(f.attrs.get("skipped_layers", []))
            if skipped:
                text += f"; {', '.join(map(str, skipped))} hold no MLP (attention or state space only)"
            out(f"{'with neurons':>14}: {text}")
        out(f"{'neurons':>14}: {f.d_mlp} per layer")
        out(f"{'documents':>14}: {f.n_docs}")
        out(f"{'tokens':>14}: {f.n_tokens} counted")
        out(f"{'k':>14}: {f.k}, window {f.context_before} before + 1 + {f.context_after} after")
        if f.n_layers and f.d_mlp:
            freq = f.frequency().mean(axis=(0, 1))
            out(f"{'mean freq.':>14}: " + ", ".join(f"{c} {100 * x:.1f}%" for c, x in zip(CASES, freq)))
        if f.has_distributions:
            out(f"{'distributions':>14}: histograms ({len(f.hist_edges) - 1} octave bins), gate x in density, "
                  f"{f.attrs.get('samples')} random examples per case, {f.attrs.get('band_samples')} per case "
                  "and band of |post|")
        else:
            out(f"{'distributions':>14}: none (collected with --samples 0, or before them)")
        if "vocab" in f.file:
            out(f"{'vocabulary':>14}: top and bottom {f.file['vocab/token'].shape[-1]} tokens of w_out, w_gate, w_in")
        if "explanations" in f.file:
            import numpy as np

            e = f.file["explanations"]
            score = f.read("explanations/score")
            labelled = int((e["method"].asstr()[...] != "").sum())
            scored = np.isfinite(score)
            median = f", median score {np.median(score[scored]):.2f}" if scored.any() else ""
            out(f"{'explanations':>14}: {labelled:,} cases labelled, {int(scored.sum()):,} scored{median} "
                f"({e.attrs.get('explainer', '')})")
        if f.has_nonfinite:
            nonfinite = f.read("stats/nonfinite").sum(axis=-1)  # [L, N]
            neurons = int((nonfinite > 0).sum())
            out(f"{'non-finite':>14}: {int(nonfinite.sum()):,} positions in {neurons:,} neuron"
                  f"{'' if neurons == 1 else 's'} (NaN or inf; left out of every statistic)")
        if f.expert_rows:
            from mkdocs_gluscope.store import SHARED

            for layer in f.expert_layers:
                experts = f.experts_of(layer)
                routed = [e for e in experts if e != SHARED]
                shares = [f.routed[(layer, e)] / max(f.n_tokens, 1) for e in routed]
                text = (f"{len(routed)} routed x {f.expert_neurons(routed[0])} neurons, routing "
                        f"{100 * min(shares):.1f}%..{100 * max(shares):.1f}% of tokens" if routed else "")
                if SHARED in experts:
                    text += (", " if text else "") + f"shared expert of {f.expert_neurons(SHARED)} neurons"
                out(f"{'experts L' + str(layer):>14}: {text}")
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", type=Path, nargs="+",
                   help="the files of one run: shards (collect --shard I/N), layer groups (--layers), or both")
    p.add_argument("--out", type=Path, required=True, help="the merged activations file")


def run_merge(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.merge import merge_files

    print(f"gluscope: wrote {merge_files(args.inputs, args.out)}")
    return 0


def add_pick_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5)")
    p.add_argument("--per-layer", type=int, default=1,
                   help="rare-case standouts per layer (and per MoE layer's experts, and shared expert): the rare cases "
                        "whose most extreme hook_post after the start of the document is largest against that case's "
                        "99th percentile in the layer (among its experts, for an expert's neuron) (default: 1)")
    p.add_argument("--per-case", type=int, default=2,
                   help="at least this many rare-case standouts of every case, over all layers, where the per-layer "
                        "ones have fewer (default: 2)")
    p.add_argument("--mix", type=int, default=10, help="neurons with the most unusual case mix (default: 10)")
    p.add_argument("--rare", type=float, default=0.10,
                   help="a case is rare below this share of tokens (default: 0.10)")
    p.add_argument("--by-score", type=int, default=None, metavar="N",
                   help="instead: the N neurons whose best-explained case has the highest explanation score "
                        "(gluscope explain --score), best first, each with its label")
    p.add_argument("--worst", action="store_true",
                   help="with --by-score: the N neurons whose worst-explained case scores lowest")
    p.add_argument("--min-positions", type=int, default=20,
                   help="with --by-score: a case's score counts when at least this many of its positions were "
                        "scored (default: 20)")


def run_pick(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.pick import pick_by_score, pick_neurons, picks_yaml

    if args.by_score is not None:
        if args.by_score < 1:
            raise GluscopeError(f"--by-score {args.by_score}; expected 1 or more neurons")
        with open_activations(args.activations) as f:
            try:
                picks = pick_by_score(f, args.by_score, min_positions=args.min_positions, worst=args.worst)
            except KeyError as e:
                raise GluscopeError(e.args[0]) from None
        print(picks_yaml(picks))
        return 0
    with open_activations(args.activations) as f:
        print(picks_yaml(pick_neurons(f, per_layer=args.per_layer, mix=args.mix, rare=args.rare,
                                      per_case=args.per_case)))
    return 0


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5); explanations are written into it")
    p.add_argument("--neurons", nargs="+", default=["all"],
                   help='neuron ids as the plugin takes them: LAYER.NEURON, "3.*", "3.e5.*" (an expert\'s), or "all" '
                        "(default: all)")
    p.add_argument("--score", action="store_true",
                   help="score each explanation by simulation against the model on held-out text (needs the "
                        "[collect] extra)")
    p.add_argument("--model", default=None,
                   help="with --score: the model the file was collected with (default: the file's model_path or "
                        "model attribute)")
    p.add_argument("--dataset", nargs="+", default=None,
                   help="with --score: the text to score on; the collection's own dataset (the default, from the "
                        "file's dataset_path or dataset attribute) gives its texts the file does not hold")
    p.add_argument("--text-column", default=None, help="with --score: the dataset's text column (default: the file's)")
    p.add_argument("--split", default=None, help="with --score: the dataset split (default: the file's)")
    p.add_argument("--score-tokens", type=_count, default=32_000,
                   help="with --score: held-out tokens to score on, e.g. 32k (default: 32k)")
    p.add_argument("--dtype", default=None,
                   help="with --score: dtype the model runs in (default: the file's dtype, what the collection ran)")
    p.add_argument("--device", default="auto", help="with --score: cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="with --score: padded tokens per batch (default: 4096)")
    p.add_argument("--llm", default=None, metavar="URL",
                   help="an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama), e.g. http://127.0.0.1:8000/v1: "
                        "its model writes the labels and, with --score, simulates them (default: the explainer that "
                        "reads only the file, and the rule-based simulator)")
    p.add_argument("--llm-model", default=None, help="with --llm: the server's model to use (default: its first)")
    p.add_argument("--llm-key-env", default=None, metavar="VAR",
                   help="with --llm: the environment variable holding the server's API key (default: none)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="with --llm: a folder with explain.txt and simulate.txt, edited copies of the package's "
                        "prompts (default: the package's)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="do the I-th of N contiguous shares of the layers (rows); the last shard to finish writes "
                        "every share into the file (default: all)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder of finished units, for resuming and shards (default: FILE.explain next to the file)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that explain (default: one per CPU this command may use)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_explain(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.explain_run import explain_file

    scorer = explainer = llm = None
    if args.llm:
        from mkdocs_gluscope.llm import ChatServer, LLMExplainer, LLMSimulators, load_prompts

        key = os.environ.get(args.llm_key_env) if args.llm_key_env else None
        if args.llm_key_env and not key:
            raise GluscopeError(f"--llm-key-env {args.llm_key_env}: that environment variable is not set")
        prompts = load_prompts(args.prompts)
        server = ChatServer(args.llm, model=args.llm_model, api_key=key)
        explainer, llm = LLMExplainer(server, prompts), LLMSimulators(server, prompts)
    elif args.llm_model or args.llm_key_env or args.prompts:
        raise GluscopeError("--llm-model, --llm-key-env and --prompts are for --llm URL")
    if args.score:
        try:
            from collect.score import Scorer
        except ImportError as e:
            raise GluscopeError(f"gluscope explain --score needs the [collect] extra ({e.name} is missing): "
                                "pip install 'gluscope[collect]'") from None
        open_activations(args.activations).close()
        scorer = Scorer(args.activations, model=args.model, dataset=args.dataset, text_column=args.text_column,
                        split=args.split, tokens=args.score_tokens, dtype=args.dtype, device=args.device,
                        batch_tokens=args.batch_tokens, llm=llm)
    elif args.model or args.dataset:
        raise GluscopeError("--model and --dataset are for --score; add --score to score the explanations")
    if args.workers is not None and args.workers < 1:
        raise GluscopeError(f"--workers {args.workers}; expected 1 or more")
    explain_file(args.activations, args.neurons, work=args.work, shard=args.shard, workers=args.workers,
                 progress=args.progress, scorer=scorer, explainer=explainer)
    return 0


DEMO_TOKENS = 100_000  # fits the 10-minute demo on a 2-core AVX2 CPU in float32 (see README)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_count, default=DEMO_TOKENS,
                   help=f"corpus tokens to collect over (default: {DEMO_TOKENS // 1000}k)")
    p.add_argument("--out", type=Path, default=Path("data/demo.h5"),
                   help="where to write the activations file (default: data/demo.h5, as mkdocs.yml expects)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype the model runs in; auto is bfloat16 where the CPU or GPU runs it natively, "
                        "else float32 (default: auto)")
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for the model and corpus (default: $GLUSCOPE_CACHE or ~/.cache/gluscope)")
    p.add_argument("--serve", dest="action", action="store_const", const="serve", default="serve",
                   help="serve the site when done (default)")
    p.add_argument("--build", dest="action", action="store_const", const="build",
                   help="build the site into site/ instead of serving it")
    p.add_argument("--no-site", dest="action", action="store_const", const="none",
                   help="only collect")
    p.add_argument("--config-file", type=Path, default=Path("mkdocs.yml"), help="the site's mkdocs.yml")
    p.add_argument("--dev-addr", default="127.0.0.1:8000", help="address to serve on (default: 127.0.0.1:8000)")


def run_demo(args: argparse.Namespace) -> int:
    try:
        from collect.demo import run_demo as demo
    except ImportError as e:
        raise GluscopeError(
            f"gluscope demo needs the [collect] extra ({e.name} is missing): "
            "pip install 'gluscope[collect]'") from None
    return demo(max_tokens=args.max_tokens, out=args.out, dtype=args.dtype, cache=args.cache,
                action=args.action, config_file=args.config_file, dev_addr=args.dev_addr)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5)")
    p.add_argument("--out", type=Path, required=True,
                   help="a new folder for the dataset (Parquet shards and a dataset card; load_dataset reads it)")


def run_export(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.export import export_dataset

    print(f"gluscope: wrote {export_dataset(args.activations, args.out)}")
    return 0


def add_related_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("activations", type=Path, help="the activations file (.h5); related/ is added to it")
    p.add_argument("--model", default=None,
                   help="the model the file was collected from (hub name, folder or GGUF file): adds the related "
                        "neurons by weights (needs the [collect] extra); without it, only those by activation")
    p.add_argument("--dtype", default=None,
                   help="dtype the model loads in: float32, bfloat16, float16 or auto; scores are float32 "
                        "(default: the file's dtype, what the collection ran: its refactor_glu flips are then "
                        "the file's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


def run_related(args: argparse.Namespace) -> int:
    import time

    from mkdocs_gluscope.related import add_related

    started = time.monotonic()
    weights = None
    if args.model is not None:
        try:
            from collect.related import weights_part
        except ImportError as e:
            raise GluscopeError(f"gluscope related --model needs the [collect] extra ({e.name} is missing): "
                                "pip install 'gluscope[collect]'") from None
        weights = lambda f: weights_part(f, args.model, dtype=args.dtype, device=args.device)  # noqa: E731
    add_related(args.activations, weights)
    parts = "by activation" + (" and by weights" if args.model is not None else "")
    print(f"gluscope: added related neurons ({parts}) to {args.activations} in {time.monotonic() - started:.1f} s")
    return 0


def _neuron_list(text: str) -> list[tuple[int, int]]:
    """``28.473`` or ``28.473,7.824``: dense neurons as LAYER.NEURON (zero-based)."""
    out = []
    for part in text.split(","):
        layer, _, neuron = part.strip().partition(".")
        if not (layer.isdigit() and neuron.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: expected neurons LAYER.NEURON separated by commas, e.g. "
                                             "28.473,7.824")
        out.append((int(layer), int(neuron)))
    return out


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to run through the model ('-': read it from standard input)")
    p.add_argument("--model", required=True, help="hub name, save_pretrained folder, or GGUF file")
    p.add_argument("--neurons", type=_neuron_list, required=True, metavar="L.N[,L.N...]",
                   help="neurons to show, e.g. 28.473,7.824")
    p.add_argument("--file", type=Path, default=None,
                   help="an activations file of this model: take its --bos and refactor_glu, so the values are "
                        "those its collection recorded (default: --bos auto, refactor_glu on)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default=None,
                   help="a BOS token first, as gluscope collect --bos (default: auto, or the file's)")
    p.add_argument("--no-refactor-glu", dest="refactor_glu", action="store_false", default=None,
                   help="keep the weights as they are (default: refactor_glu, as gluscope collect)")
    p.add_argument("--html", type=Path, default=None,
                   help="also write the rows as the pages show them into this HTML file (hover a token for its values)")
    p.add_argument("--values", action="store_true", help="also print every token's values as a tab-separated table")
    p.add_argument("--color", dest="color", action="store_true", default=None,
                   help="color even when the output is not a terminal")
    p.add_argument("--no-color", dest="color", action="store_false", help="never color")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--no-recipe", dest="recipe", action="store_false",
                   help="run the model through transformers even where a checked recipe lets a Llama checkpoint "
                        "run without it (see reading.md), and keep none")


def run_probe(args: argparse.Namespace) -> int:
    from mkdocs_gluscope.probe import print_probed, wants_color

    try:
        from collect.probe import Prober
    except ImportError as e:
        raise GluscopeError(f"gluscope probe needs the [collect] extra ({e.name} is missing): "
                            "pip install 'gluscope[collect]'") from None
    from collect.probe import single_thread

    single_thread()
    bos, refactor = args.bos, args.refactor_glu
    if args.file is not None:
        with open_activations(args.file) as f:
            bos = bos or str(f.attrs.get("bos", "auto"))
            refactor = bool(f.attrs.get("refactor_glu", True)) if refactor is None else refactor
    text = sys.stdin.read() if args.text == "-" else args.text
    prober = Prober.load(args.model, dtype=args.dtype, device=args.device,
                         refactor_glu=True if refactor is None else refactor, bos=bos or "auto", recipe=args.recipe)
    probed = prober.run(text, args.neurons)
    print_probed(probed, sys.stdout, color=wants_color(sys.stdout, args.color), values=args.values)
    if args.html is not None:
        from mkdocs_gluscope.pages import asset_text  # the pages' stylesheet and script: only for --html
        from mkdocs_gluscope.probe import probe_page_html

        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(probe_page_html(probed, asset_text("gluscope.css"), asset_text("gluscope.js")),
                             encoding="utf-8")
        print(f"gluscope: wrote {args.html}", file=sys.stderr)
    return 0


COMMANDS = {
    "collect": (add_collect_arguments, run_collect, "run a model over a corpus and write the activations file"),
    "pages": (add_pages_arguments, run_pages, "write neuron pages as Markdown files, for any site generator"),
    "info": (add_info_arguments, run_info, "summarize an activations file"),
    "merge": (add_merge_arguments, run_merge,
              "merge the files of a sharded collection into the file one run would have written"),
    "pick": (add_pick_arguments, run_pick,
             "choose neurons worth a page (rare-case standouts, unusual case mixes), as mkdocs.yml entries"),
    "explain": (add_explain_arguments, run_explain,
                "write a label for every case of every neuron into the file, scored against the model with --score"),
    "probe": (add_probe_arguments, run_probe,
              "run your own text through the model: each token colored by a neuron's post and marked by its case"),
    "related": (add_related_arguments, run_related,
                "add related neurons to the file: by shared strongest examples, and with --model by weights"),
    "export": (add_export_arguments, run_export,
               "write the file as a Hugging Face dataset, one row per neuron (needs the [collect] extra)"),
    "demo": (add_demo_arguments, run_demo,
             "SmolLM2-135M on State of the Union addresses: fetch, collect, then serve the site"),
}


def build_parser() -> argparse.ArgumentParser:
    from mkdocs_gluscope import __version__

    parser = _Parser(
        prog="gluscope",
        description="GLUScope: four-case views of the neurons of gated-MLP language models. "
                    f"Commands: {', '.join(COMMANDS)}.",
        epilog="Run 'gluscope COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"gluscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def cli_reference() -> str:
    """Markdown reference of every subcommand and option (the site's CLI page includes it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        out += [f"## {name}", "", p.description or "", "", "```", p.format_usage().strip(), "```", "",
                "| option | meaning |", "|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.dest
            if action.option_strings and action.nargs != 0:
                flag += f" {action.metavar or action.dest.upper()}"
            text = (action.help or "").replace("|", "\\|")
            if action.choices and "choices" not in text:
                text += f" (one of: {', '.join(map(str, action.choices))})"
            out.append(f"| `{flag}` | {text} |")
        out.append("")
    return "\n".join(out)


def freeze_at_exit() -> None:
    """Freeze the heap when the interpreter exits, before its last garbage collections, which would walk
    every object left: after a probe, the millions that importing torch and transformers made (its exit
    took 1.9-2.9 s of a 17-22 s probe on 2 cores at load 6-7, 0.5 s frozen). The OS frees them anyway.
    Registered once, however often (tests call main() many times in one process)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def main(argv: Sequence[str] | None = None) -> int:
    freeze_at_exit()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GluscopeError as e:
        print(f"gluscope: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gluscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gluscope pick FILE | head`: the reader has what it wanted; no traceback, and no second
        # error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the shell's status for a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
