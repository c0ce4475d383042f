"""A probe without transformers: a Llama model's layers computed from its checkpoint with torch alone.

Importing transformers' model code costs a probe of SmolLM2 about 3.5 of its 5.5 CPU seconds on 2 cores
(it pulls in ``torch._dynamo`` and ``torch.distributed.tensor``; ``python -X importtime``), so a probe could
not get under about 6 s while it imported it. For a ``LlamaForCausalLM`` checkpoint in safetensors files
(SmolLM2, Llama 2 and 3, TinyLlama...), :func:`run_layers` computes the layers from the files with the torch
calls transformers makes, in the same order.

It is trusted for a checkpoint only once a probe through transformers has shown it equal there:
:func:`verify` runs both on check texts, every layer's gate, in, act(gate) and post bit for bit, and the
tokenizer's ids too; only then is a recipe written (:func:`remember`: the shapes, the rotary frequencies,
the tokenizer as transformers loaded it, each token's display string) to ``probe/`` in the cache folder,
under a key of the checkpoint's files (sizes and modification times), the torch, transformers and tokenizers
versions, the dtype, the device and the probe's options. A later probe that finds a recipe for its
checkpoint uses it (:func:`recall`); anything else (another family, a GGUF file, a changed file, another
version) goes through transformers as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

#: The shape of a recipe; a change to it gives new keys, so older recipes are never read.
RECIPE_VERSION = 1
#: The rotary embeddings whose frequencies do not depend on the text's length (others are not taken).
STATIC_ROPE = ("default", "linear", "llama3")
#: Texts the two paths are compared on: a sentence, the same at a length past the attention kernel's blocks,
#: and a single token (attention over one position takes another branch in transformers).
CHECK_TEXTS = ("The committee's 3 reports, dated 1790–2021, were “read twice” — and then? Ünïcödé & <tags>.",)
CHECK_LENGTHS = (1, 130)

#: ``on_layer(layer, gate, in, post)``, each ``[1, T, d_mlp]``, as the MLP computes them.
OnLayer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _package_versions() -> list[str]:
    out = []
    for name in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return out


def checkpoint_folder(model: str) -> Path | None:
    """The folder of a model's safetensors files: the path itself, or the hub cache's snapshot of a hub
    name (only what is already downloaded: a recipe never fetches)."""
    path = Path(model)
    if path.is_dir():
        return path.resolve()
    if path.exists():  # a GGUF file: dequantized by transformers, no recipe
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True)).resolve()
    except Exception:  # not in the cache, no huggingface_hub, a name it refuses: no recipe
        return None


def _fingerprint(folder: Path) -> list[list[Any]] | None:
    """Each file a recipe depends on, with its size and modification time; None without safetensors files."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    if not any(p.suffix == ".safetensors" for p in files):
        return None
    return [[p.name, stat.st_size, stat.st_mtime_ns] for p in files for stat in [p.stat()]]


def recipe_key(folder: Path, *, dtype: str, device: str, refactor: bool, bos: str) -> str | None:
    """The name of a checkpoint's recipe for these options; None where the folder has no safetensors files."""
    files = _fingerprint(folder)
    if files is None:
        return None
    text = json.dumps([RECIPE_VERSION, str(folder), files, _package_versions(), dtype, device, refactor, bos])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class Shape:
    """What :func:`run_layers` needs besides the weights, read from the transformers model it was checked on."""

    n_layers: int
    d_mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    inv_freq: list[float]  # the rotary embedding's own float32 frequencies
    rope_scaling: float  # its attention_scaling
    prefix: str  # "model." : the decoder's parameter names in the checkpoint
    biases: dict[str, bool] = field(default_factory=dict)  # which projections have a bias

    @classmethod
    def of(cls, hf_model: Any) -> "Shape | None":
        """The shape of a transformers model this module computes, or None (another family or option)."""
        config = getattr(hf_model, "config", None)
        if type(hf_model).__name__ != "LlamaForCausalLM" or config is None:
            return None
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if (config.hidden_act != "silu" or rope not in STATIC_ROPE
                or getattr(config, "_attn_implementation", None) != "sdpa"):
            return None
        decoder = hf_model.model
        attn = decoder.layers[0].self_attn
        if attn.head_dim > 256 and attn.num_key_value_groups > 1:
            return None  # transformers repeats the keys there instead of sdpa's enable_gqa
        biases = {name: getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        biases.update({name: getattr(decoder.layers[0].mlp, name).bias is not None
                       for name in ("gate_proj", "up_proj", "down_proj")})
        return cls(n_layers=len(decoder.layers), d_mlp=decoder.layers[0].mlp.gate_proj.out_features,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
                   scaling=float(attn.scaling), eps=float(decoder.norm.variance_epsilon),
                   inv_freq=[float(x) for x in decoder.rotary_emb.inv_freq.float().cpu()],
                   rope_scaling=float(decoder.rotary_emb.attention_scaling), prefix="model.", biases=biases)


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or shards with their index), read as asked,
    in the probe's dtype: only the layers a probe reads leave the files."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            where = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    where.update({name: file.name for name in f.keys()})
        self._where, self._folder, self._open = where, folder, safe_open
        self._files: dict[str, Any] = {}
        self.dtype, self.device = dtype, device

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if file not in self._files:
            self._files[file] = self._open(str(self._folder / file), framework="pt")
        return self._files[file].get_tensor(name).to(device=self.device, dtype=self.dtype)


@dataclass
class Layer:
    """One decoder layer's weights (a bias is None where the projection has none)."""

    norm_attn: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    norm_mlp: torch.Tensor
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]


def read_layer(checkpoint: Checkpoint, shape: Shape, index: int) -> Layer:
    base = f"{shape.prefix}layers.{index}."

    def linear(part: str, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = checkpoint.get(f"{base}{part}.{name}.bias") if shape.biases.get(name) else None
        return checkpoint.get(f"{base}{part}.{name}.weight"), bias

    return Layer(norm_attn=checkpoint.get(f"{base}input_layernorm.weight"),
                 q=linear("self_attn", "q_proj"), k=linear("self_attn", "k_proj"), v=linear("self_attn", "v_proj"),
                 o=linear("self_attn", "o_proj"), norm_mlp=checkpoint.get(f"{base}post_attention_layernorm.weight"),
                 gate=linear("mlp", "gate_proj"), up=linear("mlp", "up_proj"), down=linear("mlp", "down_proj"))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm.forward, step for step
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(x: torch.Tensor, layer: Layer, shape: Shape, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # LlamaAttention.forward with transformers' sdpa_attention_forward, no mask (one unpadded text)
    batch, length = x.shape[:2]
    hidden = (batch, length, -1, shape.head_dim)
    q = F.linear(x, *layer.q).view(hidden).transpose(1, 2)
    k = F.linear(x, *layer.k).view(hidden).transpose(1, 2)
    v = F.linear(x, *layer.v).view(hidden).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    extra = {"enable_gqa": True} if shape.heads != shape.kv_heads else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=shape.scaling,
                                         is_causal=length > 1, **extra)
    out = out.reshape(out.shape[0], -1, length, v.shape[-1]).transpose(1, 2).contiguous()
    return F.linear(out.reshape(batch, length, -1).contiguous(), *layer.o)


@torch.inference_mode()
def run_layers(shape: Shape, embed: torch.Tensor, layer: Callable[[int], Layer], input_ids: torch.Tensor,
               layers: list[int], on_layer: OnLayer) -> None:
    """Run ``input_ids`` ``[1, T]`` through the decoder up to the last of ``layers`` and call ``on_layer``
    with each listed layer's MLP values (``layer(i)``: the weights of layer ``i``)."""
    x = F.embedding(input_ids, embed)
    positions = torch.arange(input_ids.shape[1], device=x.device)[None]
    inv_freq = torch.tensor(shape.inv_freq, dtype=torch.float32, device=x.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * shape.rope_scaling).to(x.dtype), (emb.sin() * shape.rope_scaling).to(x.dtype)
    wanted, last = set(layers), max(layers)
    for index in range(last + 1):
        weights = layer(index)
        x = x + _attention(_rms_norm(x, weights.norm_attn, shape.eps), weights, shape, cos, sin)
        h = _rms_norm(x, weights.norm_mlp, shape.eps)
        gate, in_ = F.linear(h, *weights.gate), F.linear(h, *weights.up)
        post = F.silu(gate) * in_  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
        if index in wanted:
            on_layer(index, gate, in_, post)
        if index < last:
            x = x + F.linear(post, *weights.down)


# -- the recipe, remembered ------------------------------------------------------------------------


def recipe_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def remember(path: Path, shape: Shape, facts: dict[str, Any], tokenizer_json: str, strings: list[str]) -> None:
    """Write a checked recipe whole (or not at all: two processes may write at once)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps({"shape": shape.__dict__, "facts": facts, "tokenizer": tokenizer_json,
                                    "strings": strings}), encoding="utf-8")
        part.replace(path)
    except OSError:
        pass  # a read-only cache: the next probe goes through transformers again


def recall(path: Path) -> dict[str, Any] | None:
    """A recipe written by :func:`remember`, or None (absent or not one)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        entry["shape"] = Shape(**entry["shape"])
        if not isinstance(entry["strings"], list) or not isinstance(entry["tokenizer"], str):
            return None
        return entry
    except (OSError, ValueError, KeyError, TypeError):
        return None
