"""Loading a gated-MLP language model, refactor_glu, weight geometry, and the MLP hooks.

Models load through Hugging Face transformers (a hub name, a ``save_pretrained`` folder, or a GGUF
file). The recorded quantities are those of TransformerLens' ``TransformerBridge`` (raw mode):

* ``blocks.{L}.mlp.hook_pre``: gate pre-activation (``gate``) = output of the gate projection,
* ``blocks.{L}.mlp.hook_pre_linear``: in pre-activation (``in``) = output of the up projection,
* ``blocks.{L}.mlp.hook_post``: ``act(gate) * in`` = input of the down projection.

Which modules those are, TransformerLens' architecture adapters say (:mod:`collect.architectures`):
``gate_proj``/``up_proj``/``down_proj`` in Llama, ``w1``/``w3``/``w2`` in InternLM2, one fused
``gate_up_proj`` in Phi-3 (hooked once and split as the family splits it), the language tower of
a multimodal model. Mixture-of-experts layers are recorded per expert (:mod:`collect.moe`).

Two engines capture them. ``hf`` (the default) hooks those modules of the Hugging Face model
directly and runs it with its default attention; ``bridge`` boots ``TransformerBridge`` and uses
its hook points. Both give the same tensors (``tests/test_collect.py`` checks them against Hugging
Face forward hooks), but the bridge always computes attention eagerly, which costs 15-25% of the
forward pass on long documents: too much for a collection meant to cost little more than the
forward pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from collect.architectures import GatedMLP, MoELayer, locate
from collect.moe import ExpertRows, ExpertTap
from mkdocs_gluscope.errors import GluscopeError
from mkdocs_gluscope.store import SHARED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


ENGINES = ("hf", "bridge")


@dataclass
class LoadedModel:
    hf_model: Any
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge with engine "bridge", else None
    tokenizer: Any
    mlps: dict[int, GatedMLP]  # the requested dense layers, by model layer
    act_fn_name: str
    n_layers: int  # layers of the model (not only those requested)
    d_mlp: int  # neurons per dense layer (0 when only mixture-of-experts layers were requested)
    device: torch.device
    dtype: torch.dtype
    moe: dict[int, MoELayer] = field(default_factory=dict)  # the requested mixture-of-experts layers
    adapter: str = ""  # TransformerLens' adapter that located the MLPs
    skipped: list[int] = field(default_factory=list)  # layers without an MLP (attention or state-space only)
    #: weight facts of every expert of the requested MoE layers, by (layer, expert or "s")
    expert_facts: dict[tuple[int, int | str], dict[str, torch.Tensor]] = field(default_factory=dict)

    def definitions(self) -> dict[str, str]:
        """How the recorded hooks differ from the plain ``gate``, ``in``, ``post`` of a gated MLP, as
        the file's attributes say it to every page: ``hook_definition`` for the dense layers'
        neurons, ``expert_hook_definition`` for the routed experts' (families that scale, clamp or
        shift their values: Falcon-H1, Llama 4, gpt-oss)."""
        out = {}
        for attr, texts in (("hook_definition", [m.definition for m in self.mlps.values()]),
                            ("expert_hook_definition", [m.definition for m in self.moe.values()])):
            found = list(dict.fromkeys(t for t in texts if t))
            if found:
                out[attr] = "; ".join(found)
        return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise GluscopeError(f"--device {device!r}; expected cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GluscopeError(f"--device {device!r} but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether torch runs bfloat16 matmuls natively on this CPU: its kernels use AVX-512
    (``get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``) and the CPU has AVX512-BF16
    or AMX tiles. Without them bfloat16 is emulated: a 2048x576 @ 576x1536 linear took 444 ms vs
    68 ms in float32 on a 2-core AVX2 EPYC (one thread)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: may move
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    """The dtype to run in. ``auto``: bfloat16 on a CUDA device that supports it; on a CPU,
    bfloat16 where it is native (measured 4.5x faster than float32 there for SmolLM2-135M's matmul
    shapes, one thread, AMD EPYC with avx512_bf16), else float32 (4x faster than emulated
    bfloat16 on the same CPU limited to AVX2)."""
    if dtype == "auto":
        device = device or torch.device("cpu")
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise GluscopeError(f"--dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layouts_folder() -> Path:
    """Where :func:`collect.architectures.locate` remembers the adapter's answers: ``layouts/`` in
    gluscope's cache folder (``$GLUSCOPE_CACHE``, else ``~/.cache/gluscope``)."""
    from mkdocs_gluscope.npm import cache_dir

    return cache_dir() / "layouts"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file of a local model: the path itself, or the only ``.gguf`` in the folder."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise GluscopeError(
                f"--model {str(path)!r} holds several GGUF files ({', '.join(p.name for p in found)}); "
                "name one of them")
        return found[0] if found else None
    return None


def _from_pretrained(model: str, dtype: torch.dtype) -> Any:
    """A causal LM, or failing that an image-text-to-text model (Llava-style wrappers have no causal-LM
    class): its language tower is what gets recorded."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        try:
            return AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
        except ValueError:
            raise e from None


def load_hf(model: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a hub name, a folder, or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    gguf = find_gguf(path) if path.exists() else None
    try:
        if gguf is not None:
            kwargs = dict(gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model)
            hf_model = _from_pretrained(model, dtype)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        raise GluscopeError(
            f"cannot load model {model!r}{offline}: {first_line}. --model takes a Hugging Face hub "
            "name, a folder written by save_pretrained, or a GGUF file (or a folder holding one)"
        ) from None
    return hf_model.eval(), tokenizer


def find_gated_mlps(hf_model: Any, layers: list[int] | None = None) -> list[GatedMLP]:
    """The dense gated MLPs of the requested layers (all by default), located through
    TransformerLens' architecture adapter; a clear error for a layer without one."""
    found = locate(hf_model, layers)
    moe = [layer for layer, mlp in found.layers.items() if isinstance(mlp, MoELayer)]
    if moe:
        raise GluscopeError(f"layers {moe} of model class {type(hf_model).__name__} are mixture-of-experts layers")
    return [found.layers[layer] for layer in sorted(found.layers)]


@torch.no_grad()
def refactor_glu(mlps: list[GatedMLP]) -> torch.Tensor:
    """Flip ``w_in`` (and its bias) and ``w_out`` of every neuron whose ``w_gate . w_in < 0``.

    ``act(gate) * in * w_out`` is unchanged, so the model's output is too; ``in`` and ``post``
    change sign for the flipped neurons. Returns which neurons flipped, ``[layer, neuron]`` bool.
    """
    flipped = []
    for mlp in mlps:
        dot = (mlp.w_gate.float() * mlp.w_in.float()).sum(dim=1)
        flip = dot < 0
        sign = torch.where(flip, -1.0, 1.0).to(mlp.w_in.dtype)
        # In place on views of the model's parameters (a fused projection's half, an expert's slice).
        mlp.w_in.mul_(sign[:, None])
        if mlp.b_in is not None:
            mlp.b_in.mul_(sign)
        mlp.w_out.mul_(sign.to(mlp.w_out.dtype)[None, :])
        flipped.append(flip.cpu())
    return torch.stack(flipped)


@torch.no_grad()
def weight_cosines(mlps: list[GatedMLP]) -> dict[str, torch.Tensor]:
    """Per-neuron cosine similarities between ``w_gate``, ``w_in`` and ``w_out``, [layer, neuron]."""
    out: dict[str, list[torch.Tensor]] = {"cos_gate_in": [], "cos_gate_out": [], "cos_in_out": []}
    cos = torch.nn.functional.cosine_similarity
    for mlp in mlps:
        w_gate, w_in = mlp.w_gate.float(), mlp.w_in.float()
        w_out = mlp.w_out.float().T
        out["cos_gate_in"].append(cos(w_gate, w_in, dim=1).cpu())
        out["cos_gate_out"].append(cos(w_gate, w_out, dim=1).cpu())
        out["cos_in_out"].append(cos(w_in, w_out, dim=1).cpu())
    return {name: torch.stack(values) for name, values in out.items()}


def _text_config(hf_model: Any) -> Any:
    config = hf_model.config
    return getattr(config, "text_config", None) or config


def act_fn_name(hf_model: Any) -> str:
    config = _text_config(hf_model)
    for attr in ("hidden_activation", "hidden_act", "activation_function"):  # activation_function: JetMoE
        if getattr(config, attr, None):
            return str(getattr(config, attr))
    return "unknown"


def check_activation(hf_model: Any, name: str | None = None) -> str:
    """The model's activation name (or ``name``, where the recorded layers use their own), refused
    unless pages can recompute it: the one table in :mod:`mkdocs_gluscope.activations` decides,
    before any batch runs."""
    from mkdocs_gluscope.activations import UnknownActivation, activation

    name = name or act_fn_name(hf_model)
    try:
        activation(name)
    except UnknownActivation as e:
        raise GluscopeError(f"model class {type(hf_model).__name__}: {e}") from None
    return name


def max_positions(hf_model: Any) -> int | None:
    """The most positions the model was built for (``max_position_embeddings``), if it says."""
    value = getattr(_text_config(hf_model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def boot_bridge(name: str, hf_model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Wrap a loaded model in TransformerBridge (raw mode: no weight processing)."""
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]  # bare configs lack it
    with _no_package_installs():
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    bridge.eval()
    return bridge


@contextlib.contextmanager
def _no_package_installs() -> Iterator[None]:
    """TransformerLens 4.3 runs ``pip install torchvision`` when it boots a multimodal model without
    it (for an image processor we never use). That upgrades torch in the user's environment (here:
    2.13 CPU to a multi-GB 2.14 CUDA build, mid-run, which broke torch.compile): say it is missing."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:
        yield
        return
    if not hasattr(helpers, "_ensure_torchvision"):
        yield
        return
    original = helpers._ensure_torchvision
    helpers._ensure_torchvision = _torchvision_importable
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def _torchvision_importable() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_model(model: str, *, dtype: str = "auto", device: str = "auto", refactor: bool = True,
               engine: str = "hf", layers: list[int] | None = None, cosines: bool = True,
               remember: Path | None = None) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    """Load a model by name or path and :func:`prepare_model` it."""
    if engine not in ENGINES:
        raise GluscopeError(f"--engine {engine!r}; expected one of {', '.join(ENGINES)}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    hf_model, tokenizer = load_hf(model, torch_dtype)
    return prepare_model(hf_model.to(torch_device), tokenizer, name=model, refactor=refactor, engine=engine,
                         layers=layers, cosines=cosines, remember=remember)


def prepare_model(hf_model: Any, tokenizer: Any, *, name: str = "model", refactor: bool = True,
                  engine: str = "hf", layers: list[int] | None = None, cosines: bool = True,
                  remember: Path | None = None) -> tuple[LoadedModel, dict[str, torch.Tensor]]:
    """Locate the requested layers' MLPs (all by default; ``remember``: a folder where the adapter's
    answer is kept for the next process, see :func:`collect.architectures.locate`), check, refactor
    (and for engine ``bridge``, wrap) a loaded model. Returns it and the weight facts of its dense
    layers, in layer order (``flipped`` and, unless ``cosines`` is False, the three cosines, computed
    after refactor_glu: a second of a 135M model's load on 2 cores, which a probe does without)."""
    param = next(hf_model.parameters())
    found = locate(hf_model, layers, remember=remember)
    dense = {layer: mlp for layer, mlp in sorted(found.layers.items()) if isinstance(mlp, GatedMLP)}
    moe = {layer: mlp for layer, mlp in sorted(found.layers.items()) if isinstance(mlp, MoELayer)}
    own = {layer.act_name for layer in moe.values() if layer.act_name}
    if len(own) > 1 or (own and dense):
        raise GluscopeError(f"the requested layers compute act(gate) with different functions ({sorted(own)} and the "
                            "model's own); record them in separate runs with --layers")
    act_name = check_activation(hf_model, own.pop() if own else None)
    sizes = sorted({mlp.d_mlp for mlp in dense.values()})
    if len(sizes) > 1:
        raise GluscopeError(f"the requested dense layers have MLPs of different sizes ({sizes}); record them "
                            "in separate runs with --layers")
    d_mlp = sizes[0] if sizes else 0
    if moe and engine == "bridge":
        raise GluscopeError(f"--engine bridge has no hooks on expert neurons (mixture-of-experts layers "
                            f"{list(moe)}); use --engine hf")
    mlps = list(dense.values())
    if refactor:
        flipped = refactor_glu(mlps) if mlps else torch.zeros(0, 0, dtype=torch.bool)
    else:
        flipped = torch.zeros(len(mlps), d_mlp, dtype=torch.bool)
    facts = {"flipped": flipped, **({} if not cosines else weight_cosines(mlps) if mlps else
                                    {k: torch.zeros(0, 0) for k in ("cos_gate_in", "cos_gate_out", "cos_in_out")})}
    expert_facts = {}
    for layer, moe_layer in moe.items():
        # Every expert's neurons, as a dense layer's: refactor_glu and weight geometry per expert.
        sets = {**dict(enumerate(moe_layer.experts)), **({SHARED: moe_layer.shared} if moe_layer.shared else {})}
        for expert, neurons in sets.items():
            flips = (refactor_glu([neurons])[0] if refactor and neurons.refactor
                     else torch.zeros(neurons.d_mlp, dtype=torch.bool))
            expert_facts[layer, expert] = {"flipped": flips,
                                           **{k: v[0] for k, v in weight_cosines([neurons]).items()}}
    bridge = boot_bridge(name, hf_model, tokenizer, param.device, param.dtype) if engine == "bridge" else None
    loaded = LoadedModel(hf_model=hf_model, bridge=bridge, tokenizer=tokenizer, mlps=dense,
                         act_fn_name=act_name, n_layers=found.n_layers, d_mlp=d_mlp,
                         device=param.device, dtype=param.dtype, moe=moe, adapter=found.adapter,
                         expert_facts=expert_facts, skipped=found.skipped)
    return loaded, facts


class StopForward(Exception):
    """Raised by the last needed hook: the rest of the model (and the unembedding) is skipped."""


def hook_names(layer: int) -> tuple[str, str, str]:
    """Bridge hook names of (gate, in, post) for one layer."""
    return (f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_pre_linear",
            f"blocks.{layer}.mlp.hook_post")


#: ``on_moe(layer, rows, shared)``: what a mixture-of-experts layer's experts computed
#: (:class:`collect.moe.ExpertRows`), and its shared expert's ``(gate, in, post)`` ``[B, T, N]`` (None
#: without one).
OnMoE = Callable[[int, "ExpertRows", "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None"], None]


def _dense_hooks(mlp: GatedMLP, save: Callable[[str], Callable[[torch.Tensor], None]],
                 on_post: Callable[[torch.Tensor], None], prefix: str = "") -> list[Any]:
    """Forward hooks capturing one gated MLP's gate and in, then ``on_post(post)``."""
    handles = []
    if mlp.act_module is not None:  # gate as the activation reads it (scaled after the gate projection)
        handles.append(mlp.act_module.register_forward_pre_hook(lambda m, i, f=save(prefix + "gate"): f(i[0])))
        handles.append(mlp.up.register_forward_hook(lambda m, i, o, f=save(prefix + "in"): f(o)))
    elif mlp.fused:  # one hook on the fused projection, split by the family's rule
        gate_save, in_save = save(prefix + "gate"), save(prefix + "in")

        def fused(m: Any, i: Any, o: torch.Tensor) -> None:
            gate, in_ = mlp.split(o)
            gate_save(gate)
            in_save(in_)  # returns None: the model's output is unchanged
        handles.append(mlp.gate.register_forward_hook(fused))
    else:
        handles += [mlp.gate.register_forward_hook(lambda m, i, o, f=save(prefix + "gate"): f(o)),
                    mlp.up.register_forward_hook(lambda m, i, o, f=save(prefix + "in"): f(o))]
    handles.append(mlp.down.register_forward_pre_hook(lambda m, i: on_post(i[0])))
    return handles


def run_with_mlp_hooks(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    layers: list[int],
    on_layer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None],
    on_moe: OnMoE | None = None,
    stop_after_last: bool = True,
) -> None:
    """Run the model on ``input_ids`` (right-padded: causal attention keeps padding out of real
    positions, so no attention mask is needed) and call ``on_layer(layer, gate, in, post)`` as each
    listed dense layer's MLP runs, ``on_moe`` (see :data:`OnMoE`) as each listed mixture-of-experts
    layer finishes. The forward pass stops after the last listed layer, skipping the rest of the
    model and the unembedding; with ``stop_after_last=False`` it goes on (a hook of the caller's may
    still raise :class:`StopForward`, e.g. at the final norm)."""
    last = max(layers) if stop_after_last else None
    captured: dict[str, Any] = {}
    batch, length = input_ids.shape

    def save(key: str) -> Callable[[torch.Tensor], None]:
        def hook(t: torch.Tensor) -> None:
            captured[key] = t
        return hook

    def on_post(layer: int) -> Callable[[torch.Tensor], None]:
        def hook(t: torch.Tensor) -> None:
            on_layer(layer, captured.pop("gate"), captured.pop("in"), t)
            if layer == last:
                raise StopForward
        return hook

    def moe_hooks(layer: int, moe: MoELayer) -> list[Any]:
        tap = ExpertTap(moe, f"layer {layer}'s mixture-of-experts block")

        def block_done(m: Any, i: Any, o: Any) -> None:
            shared = None
            if moe.shared is not None:
                # Some blocks run the shared expert on flattened tokens (Qwen2-MoE): back to [B, T, N].
                shared = tuple(captured.pop(f"shared_{name}").reshape(batch, length, -1)
                               for name in ("gate", "in", "post"))
            assert on_moe is not None
            on_moe(layer, tap.take(), shared)
            if layer == last:
                raise StopForward

        handles = tap.install() + [(moe.done or moe.block).register_forward_hook(block_done)]
        if moe.shared is not None:
            handles += _dense_hooks(moe.shared, save, save("shared_post"), prefix="shared_")
        return handles

    try:
        with torch.inference_mode():
            if loaded.bridge is not None:
                fwd_hooks = []
                for layer in layers:
                    gate_name, in_name, post_name = hook_names(layer)
                    fwd_hooks += [(gate_name, lambda t, hook, f=save("gate"): f(t)),
                                  (in_name, lambda t, hook, f=save("in"): f(t)),
                                  (post_name, lambda t, hook, f=on_post(layer): f(t))]
                loaded.bridge.run_with_hooks(input_ids, fwd_hooks=fwd_hooks, return_type=None)
            else:
                handles = []
                try:
                    for layer in layers:
                        if layer in loaded.moe:
                            handles += moe_hooks(layer, loaded.moe[layer])
                        else:
                            handles += _dense_hooks(loaded.mlps[layer], save, on_post(layer))
                    loaded.hf_model(input_ids=input_ids, use_cache=False)
                finally:
                    for handle in handles:
                        handle.remove()
    except StopForward:
        pass
