"""Expert neurons from the model's own computation: the values in the file are the experts' own, bit for
bit, whatever implementation ran them; the packed, wide-layer statistics; the GPU path's host syncs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from collect.run import CollectConfig, collect
from mkdocs_gluscope.store import CASES, HOOKS, ActivationsFile, early_end, first_counted_position

MOE = {"mixtral": 2, "olmoe": 2, "qwen2moe": 2, "deepseek2": 3}


def small_config(model: Path, corpus: list[Path], out: Path, **overrides) -> CollectConfig:
    options = dict(model=str(model), dataset=[str(p) for p in corpus], out=out, k=4, context_before=3,
                   context_after=1, compile=False, progress=False, device="cpu", batch_tokens=128,
                   dtype="float32")
    options.update(overrides)
    return CollectConfig(**options)


def with_config(folder: Path, target: Path, **changes) -> Path:
    """A copy of a saved tiny model with some config.json entries changed."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


class ModelsOwnRows:
    """Records, during a collection's own forward passes, the rows the experts themselves computed,
    from the arguments and results of the matmuls the implementation calls (not through gluscope's
    tap): ``grouped_mm``'s grouped linears (each row's expert from their offsets), the eager loop's
    ``F.linear`` calls (the expert from the weight's place in ``gate_up_proj`` or ``down_proj``).
    Each row's token is the one whose hidden state is the row's input, bit for bit; the up
    projection's output is ``[gate | in]``, the down projection's input is ``post``."""

    def __init__(self, monkeypatch) -> None:
        import collect.run as run_module
        import transformers.integrations.moe as moe_module

        self.rows: list[tuple] = []  # (layer, input_ids, token, expert, "up" | "down", row)
        self.current: tuple | None = None  # (layer, experts module, its hidden states, input_ids)
        real_run, real_grouped, real_linear = (run_module.run_with_mlp_hooks, moe_module._grouped_linear,
                                               torch.nn.functional.linear)

        def add(inputs, outputs, experts, kind):
            layer, module, hidden, ids = self.current
            token_of = {row.tobytes(): t for t, row in enumerate(hidden.float().numpy())}
            tokens = [token_of[x.tobytes()] for x in inputs.detach().float().cpu().numpy()] if kind == "up" else None
            source = (outputs if kind == "up" else inputs).detach().float().cpu().numpy()
            for i, (y, e) in enumerate(zip(source, experts)):
                self.rows.append((layer, ids, None if tokens is None else tokens[i], int(e), kind, y))

        def grouped(input, weight, offs, bias=None, is_transposed=False):
            out = real_grouped(input, weight, offs, bias=bias, is_transposed=is_transposed)
            if self.current is not None:
                module = self.current[1]
                experts = np.searchsorted(offs.cpu().numpy(), np.arange(len(input)), side="right")
                add(input, out, experts, "up" if weight is module.gate_up_proj else "down")
            return out

        def linear(input, weight, bias=None):
            out = real_linear(input, weight, bias)
            if self.current is not None:
                module = self.current[1]
                for kind, base in (("up", module.gate_up_proj), ("down", module.down_proj)):
                    offset = weight.data_ptr() - base.data_ptr()
                    if weight.shape == base.shape[1:] and 0 <= offset < base.numel() * base.element_size():
                        add(input, out, [offset // (weight.numel() * weight.element_size())] * len(input), kind)
            return out

        def run(loaded, input_ids, layers, on_layer, on_moe=None, **options):
            handles = []
            for layer in layers:
                if layer in loaded.moe:
                    def pre(m, args, layer=layer):
                        self.current = (layer, m, args[0].detach().cpu(), input_ids.cpu())

                    def done(m, args, out):
                        self.current = None
                    module = loaded.moe[layer].experts_module
                    handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(done)]
            try:
                return real_run(loaded, input_ids, layers, on_layer, on_moe, **options)
            finally:
                for handle in handles:
                    handle.remove()
                self.current = None

        monkeypatch.setattr(run_module, "run_with_mlp_hooks", run)
        monkeypatch.setattr(moe_module, "_grouped_linear", grouped)
        monkeypatch.setattr(torch.nn.functional, "linear", linear)

    def by_document(self, f: ActivationsFile) -> dict[tuple[int, int], dict[int, np.ndarray]]:
        """``{(layer, expert): {doc: [T, 3, I]}}``: gate, in, post of each position of each document
        as the experts computed them, NaN where the token was not routed to the expert. An expert's
        down projection takes its rows in the order its up projection made them, so its n-th down row
        in a call is the post of its n-th up row."""
        documents = [f.document(d) for d in range(f.n_docs)]

        def doc_of(row: np.ndarray) -> int:
            found = [d for d, doc in enumerate(documents) if len(doc) <= len(row) and np.array_equal(row[:len(doc)], doc)]
            return max(found, key=lambda d: len(documents[d]))

        out: dict = {}
        ups: dict = {}
        for layer, ids, token, expert, kind, row in self.rows:
            call = (layer, id(ids), expert)
            if kind == "up":
                ups.setdefault(call, []).append((ids, token, row))
                continue
            ids, token, up = ups[call].pop(0)
            b, pos = divmod(token, ids.shape[1])
            doc = doc_of(ids[b].numpy())
            table = out.setdefault((layer, expert), {})
            if doc not in table:
                table[doc] = np.full((len(documents[doc]), 3, len(row)), np.nan, dtype=np.float32)
            if pos < len(documents[doc]):
                half = len(up) // 2
                table[doc][pos] = np.stack([up[:half], up[half:], row])
        return out


def check_against_models_own(path: Path, own: dict) -> int:
    """Every routed expert neuron's case counts, its extremes of gate, in and post per case, and every
    top-k example of gate and in (value and window): equal to the experts' own values, bit for bit.
    Returns the number of values compared."""
    gate_hook, in_hook, post_hook = HOOKS.index("hook_pre"), HOOKS.index("hook_pre_linear"), HOOKS.index("hook_post")
    compared = 0
    with ActivationsFile(path) as f:
        first, before, n_docs = first_counted_position(f.attrs), f.context_before, f.n_docs
        longest = max(len(f.document(d)) for d in range(n_docs))
        rows = {key: row for key, (group, row) in f.expert_rows.items() if group == "experts"}
        routed = dict(f.routed)
    with h5py.File(path) as h:
        g = h["experts"]
        count, lo, hi = g["stats/count"][...], g["stats/min"][...], g["stats/max"][...]
        top_doc, top_pos, top_value = g["top/doc"][...], g["top/pos"][...], g["top/value"][...]
        top_gate, top_in = g["top/gate"][...], g["top/in"][...]
    for (layer, expert), row in rows.items():
        size = count.shape[1]
        table = np.full((n_docs, longest + before + 8, 3, size), np.nan, dtype=np.float32)
        for doc, values in own[layer, expert].items():
            table[doc, :len(values)] = values
        counted = table[:, first:]
        counted = counted[~np.isnan(counted[:, :, 0, 0])]  # [P, 3, I]: the routed, counted positions
        assert routed[layer, expert] == len(counted)
        gate, in_, post = counted[:, 0], counted[:, 1], counted[:, 2]
        masks = [(gate > 0) & (in_ > 0), (gate > 0) & (in_ < 0), (gate < 0) & (in_ > 0), (gate < 0) & (in_ < 0)]
        np.testing.assert_array_equal(count[row], np.stack([m.sum(0) for m in masks], axis=-1), err_msg=str(expert))
        for c, mask in enumerate(masks):
            for hook, v in ((gate_hook, gate), (in_hook, in_), (post_hook, post)):
                some = mask.any(0)
                v_lo = np.where(mask, v, np.inf).min(0)
                v_hi = np.where(mask, v, -np.inf).max(0)
                np.testing.assert_array_equal(lo[row, some, c, hook], v_lo[some], err_msg=str((layer, expert, c, hook)))
                np.testing.assert_array_equal(hi[row, some, c, hook], v_hi[some], err_msg=str((layer, expert, c, hook)))
                compared += 2 * int(some.sum())
        neuron = np.arange(size)[:, None, None, None]
        for hook, which in ((gate_hook, 0), (in_hook, 1)):
            doc, pos = top_doc[row, :, :, hook], top_pos[row, :, :, hook]  # [I, C, k]
            filled = doc >= 0
            d, p = np.where(filled, doc, 0), np.where(filled, pos, 0)
            want = table[d, p, which, np.arange(size)[:, None, None]]
            np.testing.assert_array_equal(top_value[row, :, :, hook][filled], want[filled])
            offsets = np.arange(top_gate.shape[-1]) - before
            at = p[..., None] + offsets  # [I, C, k, W]
            inside = (at >= 0) & filled[..., None]
            for windows, part in ((top_gate, 0), (top_in, 1)):
                want = np.where(inside, table[d[..., None], np.clip(at, 0, None), part, neuron], np.nan)
                got = windows[row, :, :, hook]
                np.testing.assert_array_equal(got[filled], want[filled], err_msg=str((layer, expert, hook, part)))
                compared += int(filled.sum()) * windows.shape[-1]
    return compared


@pytest.mark.parametrize("arch", list(MOE))
def test_expert_values_are_the_models_own_bit_for_bit(arch, model_factory, corpus_files, tmp_path, monkeypatch):
    """In float32 and bfloat16, with grouped_mm and with the eager experts loop: each routed expert
    neuron's case counts, extremes of gate, in and post per case, and every top-k example's value and
    window are the values the experts themselves computed (read from the implementation's own
    matmuls), bit for bit: a value near zero keeps the sign the model gave it."""
    base = model_factory(arch, MOE[arch])
    for implementation in ("grouped_mm", "eager"):
        folder = with_config(base, tmp_path / implementation, experts_implementation=implementation)
        for dtype in ("float32", "bfloat16"):
            own = ModelsOwnRows(monkeypatch)
            out = collect(small_config(folder, corpus_files, tmp_path / f"{implementation}-{dtype}.h5", dtype=dtype,
                                       window_dtype="float32", batch_tokens=64, samples=0))
            with ActivationsFile(out) as f:
                assert f.attrs["dtype"] == dtype
                reference = own.by_document(f)
            assert check_against_models_own(out, reference) > 1000
            monkeypatch.undo()


def same_file(a: Path, b: Path) -> None:
    """Every dataset of two files equal (sums up to the order of additions), and the token count."""
    with h5py.File(a) as x, h5py.File(b) as y:
        names = []
        x.visit(lambda n: names.append(n) if isinstance(x[n], h5py.Dataset) else None)
        assert names and sorted(names) == sorted(n for n in names if n in y)
        for n in names:
            u, v = x[n][...], y[n][...]
            if n.endswith("sum"):  # float32 per-batch sums: packed over other lengths, added in another order
                np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6, err_msg=n)
            else:
                assert np.array_equal(u, v, equal_nan=u.dtype.kind == "f"), n
        assert x.attrs["n_tokens"] == y.attrs["n_tokens"]


def test_gpu_path_of_an_moe_batch_makes_one_host_sync_and_writes_the_exact_file(model_factory, corpus_files,
                                                                               tmp_path, monkeypatch):
    """The GPU's code path on a CPU (list capacities, example candidates and packed lengths learnt from
    earlier batches, nonzero_static), with the distributions: each batch of an MoE model (OLMoE,
    grouped_mm) makes one host sync, model included, until its flags are read (collect.syncs'
    counter); a packed length too short on purpose is flagged on the device and that layer redone
    exactly; the file equals the exact path's, dataset by dataset."""
    import functools

    import collect.run as run_module
    from collect.memory import ListCapacity, PackedLength
    from collect.syncs import SyncCounter

    folder = model_factory("olmoe", 2)
    syncs: list[int] = []
    redone: list[bool] = []
    real_batch, real_hooks = run_module._run_batch, run_module.run_with_mlp_hooks
    counters: list[SyncCounter] = []

    def counted_batch(*args, **kwargs):
        with SyncCounter() as counter:
            counters.append(counter)
            real_batch(*args, **kwargs)
        syncs.append(getattr(counter, "first_pass", counter.total))

    def hooks(loaded, input_ids, layers, on_layer, on_moe=None, **options):
        again = isinstance(on_moe, functools.partial)  # the exact redo of flagged layers, after the sync
        if again:
            counters[-1].first_pass = counters[-1].total
        redone.append(again)
        return real_hooks(loaded, input_ids, layers, on_layer, on_moe, **options)

    monkeypatch.setattr(run_module, "_run_batch", counted_batch)
    monkeypatch.setattr(run_module, "run_with_mlp_hooks", hooks)
    exact = collect(small_config(folder, corpus_files, tmp_path / "exact.h5", batch_tokens=64))  # the CPU kernel's
    monkeypatch.setattr(ListCapacity, "ON_CPU", True)
    monkeypatch.setattr(PackedLength, "ON_CPU", True)
    for margin, name in ((1.5, "static.h5"), (0.5, "short.h5")):  # 0.5: too short, some batches overflow
        monkeypatch.setattr(PackedLength, "MARGIN", margin)
        syncs.clear(), redone.clear()
        static = collect(small_config(folder, corpus_files, tmp_path / name, batch_tokens=64))
        assert len(syncs) > 3 and all(n == 1 for n in syncs), syncs
        assert any(redone) == (margin < 1), redone
        same_file(exact, static)


def test_pick_lists_expert_neurons_of_every_case(model_factory, corpus_files, tmp_path, capsys):
    """`gluscope pick` on a file of expert neurons (OLMoE: routed experts only; DeepSeek-V2: a dense layer,
    routed and shared experts): rare-case standouts of every case among the experts, each judged against
    its case's scale among the layer's experts, their frequency a share of the tokens routed to the expert;
    the ids are pages' ids."""
    from mkdocs_gluscope.cli import main
    from mkdocs_gluscope.pick import case_scales, expert_set, pick_neurons

    for arch, layers in (("olmoe", 2), ("deepseek2", 3)):
        out = collect(small_config(model_factory(arch, layers), corpus_files, tmp_path / f"{arch}.h5", k=4))
        with ActivationsFile(out) as f:
            picks = pick_neurons(f, per_layer=1, mix=2, rare=0.2, per_case=2)
            experts = [p for p in picks if p.expert is not None]
            rare = [p for p in experts if p.reason.startswith("rare")]
            assert {c for c in CASES if any(f"rare {c} " in p.reason for p in rare)} == set(CASES), picks
            assert any(p.reason.startswith("unusual case mix") for p in experts)
            for p in rare:
                data = f.neuron(p.layer, p.neuron, expert=p.expert, windows=False)
                c = next(i for i, case in enumerate(CASES) if f"rare {case} " in p.reason)
                assert data.frequency[c] < 0.2 and data.count[c] >= f.k
                assert f"({100 * data.count[c] / f.routed[p.layer, p.expert]:.2g}% of its expert's tokens" in p.reason
                s = expert_set(f, p.layer, p.expert == "s")
                after_start = (data.top_doc[c, 0] >= 0) & (data.top_pos[c, 0] >= early_end(f.attrs))
                extreme = np.abs(data.top_value[c, 0][after_start]).max()  # (pick leaves out the start)
                assert p.score == pytest.approx(extreme / case_scales(s.magnitude)[c], rel=1e-6)
            if arch == "deepseek2":
                assert any(p.expert is None for p in picks) and any(p.expert == "s" for p in picks)
        capsys.readouterr()
        assert main(["pick", str(out), "--rare", "0.2"]) == 0
        text = capsys.readouterr().out
        assert '.e' in text and "gluscope: error" not in text


def olmoe_shaped(device: str = "cuda:0"):
    """What the memory plan reads of a loaded model, for OLMoE-1B-7B (16 MoE layers of 64 experts x 1,024
    neurons, top-8; no dense layer, no shared expert) in bfloat16: no weights needed."""
    from types import SimpleNamespace

    moe = {layer: SimpleNamespace(n_experts=64, d_expert=1024, shared=None, top_k=8) for layer in range(16)}
    return SimpleNamespace(device=torch.device(device), d_mlp=0, dtype=torch.bfloat16, moe=moe, mlps={})


def test_state_check_on_a_small_card_names_groups_of_layers_and_experts(monkeypatch):
    """OLMoE-1B-7B on a pretended 24 GB card (about 10 GB free beside its 13.8 GB of bfloat16 weights), at the
    default options: its million expert neurons' statistics do not fit, and the refusal, before any batch,
    names groups of layers and experts that do: each within the budget, together every expert of every layer
    once."""
    import re

    from collect import memory
    from collect.memory import check_state_fits, plan_groups, state_bytes, working_bytes
    from mkdocs_gluscope.errors import GluscopeError

    loaded = olmoe_shaped()
    experts = {layer: list(range(64)) for layer in range(16)}
    config = CollectConfig(model="m", dataset=[], out=Path("o"))  # the defaults: k 16, 19-token windows, samples
    free = 24 * 10**9 - int(6.9e9 * 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 24 * 10**9))
    monkeypatch.setattr(memory, "available_host_memory", lambda: 512 * 2**30)  # room for the windows
    with pytest.raises(GluscopeError) as refused:
        check_state_fits(loaded, list(range(16)), config, experts)
    text = str(refused.value)
    per_neuron = state_bytes(1, 1, config, torch.bfloat16, "device")  # the windows go to host memory
    assert f"{64 * 1024 * 16 * per_neuron / 2**30:.1f} GiB" in text and "gluscope merge" in text
    budget = int(free * 0.9) - working_bytes(loaded, config)
    units = []

    def numbers(span: str) -> list[int]:
        a, _, b = span.partition("-")
        return list(range(int(a), int(b or a) + 1))

    groups = re.findall(r"--layers ([\d-]+)(?: --experts ([\d-]+))?", text)
    assert len(groups) > 1
    for layer_span, expert_span in groups:
        group = [(layer, e) for layer in numbers(layer_span) for e in (numbers(expert_span) if expert_span else
                                                                        range(64))]
        assert len(group) * 1024 * per_neuron <= budget
        units += group
    assert sorted(units) == [(layer, e) for layer in range(16) for e in range(64)]  # every expert once
    # On an 80 GB card (about 66 GB free) it fits in one run.
    plan = plan_groups(loaded, list(range(16)), experts, per_neuron, int(66e9 * 0.9) - working_bytes(loaded, config))
    assert len(plan.groups) == 1


def test_state_check_counts_the_host_memory_the_windows_and_a_cpu_runs_statistics_take(monkeypatch):
    """The top-k windows of a GPU run live in host memory (19 GiB for OLMoE-1B-7B at the defaults), all of a
    CPU run's statistics do: where host memory is what runs out, the refusal says so and names groups that
    fit it; where the card is the tighter of the two, the card decides."""
    import re

    from collect import memory
    from mkdocs_gluscope.errors import GluscopeError

    experts = {layer: list(range(64)) for layer in range(16)}
    config = CollectConfig(model="m", dataset=[], out=Path("o"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200 * 2**30, 256 * 2**30))  # a big card
    monkeypatch.setattr(memory, "available_host_memory", lambda: 12 * 2**30)
    host = memory.state_bytes(1, 1, config, torch.bfloat16, "host")
    with pytest.raises(GluscopeError) as refused:
        memory.check_state_fits(olmoe_shaped(), list(range(16)), config, experts)
    text = str(refused.value)
    assert f"top-k windows of 16 layers ({16 * 64 * 1024:,} neurons with experts) need " \
           f"{16 * 64 * 1024 * host / 2**30:.1f} GiB in host memory" in text and "gluscope merge" in text
    for layers, chosen in re.findall(r"--layers ([\d-]+) --experts ([\d-]+)", text):
        a, _, b = chosen.partition("-")
        n_layers = len(range(int(layers.split("-")[0]), int(layers.split("-")[-1]) + 1))
        assert n_layers * (int(b or a) - int(a) + 1) * 1024 * host <= int(12 * 2**30 * 0.9)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 64 * 2**30)
    assert "one run" in memory.check_state_fits(olmoe_shaped(), list(range(16)), config, experts)
    # A CPU run keeps everything in host memory, next to the model.
    cpu = olmoe_shaped("cpu")
    every = memory.state_bytes(1, 1, config, torch.bfloat16, "all")
    monkeypatch.setattr(memory, "available_host_memory", lambda: 16 * 2**30)
    with pytest.raises(GluscopeError, match=rf"the statistics of 16 layers .* need "
                                            rf"{16 * 64 * 1024 * every / 2**30:.1f} GiB in host memory"):
        memory.check_state_fits(cpu, list(range(16)), config, experts)
    monkeypatch.setattr(memory, "available_host_memory", lambda: None)  # a system that does not say: no check
    assert memory.check_state_fits(cpu, list(range(16)), config, experts).startswith("statistics of")


def test_groups_of_layers_and_experts_merge_into_one_run(model_factory, corpus_files, tmp_path):
    """A model with a dense layer, routed and shared experts (DeepSeek-V2) planned for a budget that holds
    fewer than one layer's experts: the dense layer and shared experts in one group (--experts s), ranges of
    routed experts over both MoE layers in the others; the groups' files merge into the one run's file."""
    import dataclasses

    from collect.config import resolve_experts
    from collect.memory import plan_groups
    from collect.model import load_model
    from collect.run import collect
    from mkdocs_gluscope.merge import merge_files

    model = model_factory("deepseek2", 3)
    loaded, _ = load_model(str(model), dtype="float32", device="cpu")
    experts = resolve_experts(None, loaded)
    d = loaded.moe[1].d_expert
    plan = plan_groups(loaded, [0, 1, 2], experts, per_neuron=1, budget=2 * d * 2)  # two experts of 2 layers
    options = [g.options() for g in plan.groups]
    assert options[0] == "--layers 0-2 --experts s" and options[1:] == ["--layers 1-2 --experts 0-1",
                                                                          "--layers 1-2 --experts 2-3"]
    whole = collect(small_config(model, corpus_files, tmp_path / "whole.h5", batch_tokens=64))
    parts = []
    for i, group in enumerate(plan.groups):
        config = small_config(model, corpus_files, tmp_path / f"group{i}.h5", batch_tokens=64, layers=group.layers,
                              experts=group.experts)
        parts.append(collect(dataclasses.replace(config)))
    same_file(whole, merge_files(parts, tmp_path / "merged.h5"))


def test_packed_windows_are_the_documents_windows():
    """A packed expert's windows, cut by index (few) or from its values put back at their positions (many, a
    CPU's first batches): the same as cutting them from the document-shaped values, NaN where the expert did
    not see a position or outside the document."""
    from collect.stats import Packing, windows_at

    torch.manual_seed(0)
    b, t, groups, size = 3, 40, 5, 7
    lengths = torch.tensor([40, 33, 20])
    routed = (torch.rand(b, t, groups) < 0.3) & (torch.arange(t)[None, :, None] < lengths[:, None, None])
    longest = int(routed.sum(1).max())
    positions = torch.zeros(b, longest, groups, dtype=torch.long)
    filled = torch.zeros(b, longest, groups, dtype=torch.bool)
    values = torch.randn(b, t, groups * size)
    document = torch.full_like(values, float("nan"))
    packed = torch.zeros(b, longest, groups * size)
    for row in range(b):
        for g in range(groups):
            seen = torch.nonzero(routed[row, :, g]).squeeze(1)
            cols = slice(g * size, (g + 1) * size)
            positions[row, :len(seen), g], filled[row, :len(seen), g] = seen, True
            packed[row, :len(seen), cols] = document[row, seen, cols] = values[row, seen, cols]
    packing = Packing(positions, filled, torch.where(routed, routed.cumsum(1) - 1, -1), size, filled)
    rows, neurons, pos = torch.randint(0, b, (500,)), torch.randint(0, groups * size, (500,)), torch.randint(0, 20, (500,))
    want = windows_at(document, rows, pos, neurons, lengths, 4, 2)
    assert want.isnan().any() and not want.isnan().all()
    for syncs_free in (False, True):
        got = packing.windows_at(packed, rows, pos, neurons, lengths, 4, 2, syncs_free=syncs_free)
        assert torch.equal(got.nan_to_num(123.0), want.nan_to_num(123.0)), syncs_free


def test_the_run_prints_its_plan_before_the_first_batch(model_factory, corpus_files, tmp_path, capsys):
    """What the statistics hold and need, in one line, before the progress bar starts."""
    from mkdocs_gluscope.cli import main

    folder = model_factory("deepseek2", 3)
    capsys.readouterr()
    code = main(["collect", "--model", str(folder), "--dataset", str(corpus_files[0]), "--out", str(tmp_path / "d.h5"),
                 "--device", "cpu", "--dtype", "float32", "--no-compile", "--k", "4"])
    err = capsys.readouterr().err
    assert code == 0
    line = next(x for x in err.splitlines() if x.startswith("gluscope: statistics of"))
    # 1 dense layer of 48 neurons, 2 MoE layers of 4 routed experts x 24 and a shared expert of 24
    assert line.startswith("gluscope: statistics of 288 neurons (1 dense layer, 2 MoE layers (4 routed experts each "
                           "+ shared)): ") and "GiB on cpu" in line
    assert err.index(line) < err.index("collect:")  # before the progress bar
