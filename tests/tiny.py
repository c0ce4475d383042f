"""Tiny random gated models and corpora, built offline inside the tests."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "Once again the council met, and once again it failed to agree on the budget.",
    "In 1861 the president spoke of the union, the states, and the war.",
    "Numbers like 42, 1999 and 3.14 appear in text; so do symbols: <, >, &, |, *.",
    "A short one.",
    "Tabs\tand\nnewlines\n\nshould stay visible in every page of the site.",
    "Meanwhile, the market rose again; later it fell, and then it rose once more.",
    "Zebras, yaks and quokkas: rare words split into several tokens each.",
]

ARCHS = {
    # name: (config class, extra config, tokenizer adds BOS)
    "llama": ("LlamaConfig", {}, True),
    "olmo": ("OlmoConfig", {}, True),
    "gemma": ("GemmaConfig", {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 16}, True),
    # norms around the MLP: Gemma-2 pre_ and post_feedforward_layernorm ((1 + weight)), OLMo-2 only after it
    "gemma2": ("Gemma2Config", {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 16}, True),
    "olmo2": ("Olmo2Config", {}, True),
    "qwen2": ("Qwen2Config", {}, False),
    # fused gate/up projection (gate_up_proj), split by TransformerLens' Phi-3 rule
    "phi3": ("Phi3Config", {"pad_token_id": None}, True),
    # Gemma3ForConditionalGeneration: a vision tower first, the language model's layers inside it
    "gemma3mm": ("Gemma3Config", {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 16}, True),
    # LlavaForConditionalGeneration: no causal-LM class; a CLIP tower, then a Llama language model
    "llava": ("LlamaConfig", {}, True),
    # mixture of experts
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}, True),
    "qwen2moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                    "shared_expert_intermediate_size": 40}, False),
    # the first layer dense (first_k_dense_replace), the others MoE with a shared expert
    "deepseek2": ("DeepseekV2Config", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                       "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": None,
                                       "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                       "v_head_dim": 16, "n_group": 1, "topk_group": 1,
                                       "num_key_value_heads": 2}, True),  # MLA: one KV head per head
}
MOE_ARCHS = ("mixtral", "olmoe", "qwen2moe", "deepseek2")


def tiny_config(arch: str, tokenizer, *, layers: int, d_model: int, d_mlp: int):
    """A transformers config of a tiny ``arch`` model for ``tokenizer``'s vocabulary."""
    import transformers

    config_class, extra, _ = ARCHS[arch]
    text = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text.update(extra)
    if arch == "gemma3mm":
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14)
        # Image placeholder ids past the text vocabulary: no corpus token is taken for an image.
        n = len(tokenizer)
        text["vocab_size"] = n + 3
        return transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text), vision_config=vision,
                                         mm_tokens_per_image=4, boi_token_index=n, eoi_token_index=n + 1,
                                         image_token_index=n + 2)
    if arch == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14)
        text["vocab_size"] = len(tokenizer) + 1
        return transformers.LlavaConfig(text_config=transformers.LlamaConfig(**text), vision_config=vision,
                                        image_token_index=len(tokenizer))
    return getattr(transformers, config_class)(**text)


def train_tokenizer(folder: Path, *, bos: bool, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, saved and reloaded from disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None,
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def make_model_dir(folder: Path, arch: str = "llama", *, layers: int = 2, d_model: int = 32,
                   d_mlp: int = 48, seed: int = 0) -> Path:
    """A save_pretrained folder (model and tokenizer) of a tiny random model of ``arch``."""
    import torch
    import transformers

    bos = ARCHS[arch][2]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, bos=bos)
    config = tiny_config(arch, tokenizer, layers=layers, d_model=d_model, d_mlp=d_mlp)
    torch.manual_seed(seed)
    if arch == "llava":
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives tiny weights (routers start at zero); scale the MLP projections and the
    # routers so activations spread over all four cases and tokens over all experts.
    mlp_names = ("gate_proj.weight", "up_proj.weight", "gate_up_proj.weight", "experts.gate_up_proj",
                 "gate.weight")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name and name.endswith(mlp_names) and "vision" not in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def write_corpus_files(folder: Path, texts=CORPUS) -> list[Path]:
    """The corpus as one .jsonl file and one .txt file per text."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return [jsonl]
