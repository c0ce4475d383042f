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
    # -- the families of 2025-26 (issue 18) --
    # Llama 4: a dense layer, then an MoE layer (interleave step 2) whose experts see score-scaled tokens
    "llama4": ("Llama4TextConfig", {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 40,
                                    "interleave_moe_layer_step": 2, "head_dim": 16, "attention_chunk_size": 64}, True),
    # Llama4ForConditionalGeneration: a vision tower, then the same language model
    "llama4mm": ("Llama4TextConfig", {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 40,
                                      "interleave_moe_layer_step": 2, "head_dim": 16, "attention_chunk_size": 64}, True),
    "qwen3moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                    "head_dim": 16}, False),
    # sigmoid routing, group-limited top-k (2 groups, 1 chosen), a shared expert, a dense first layer
    "deepseek3": ("DeepseekV3Config", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                       "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": None,
                                       "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                       "v_head_dim": 16, "n_group": 2, "topk_group": 1, "num_key_value_heads": 2},
                  True),
    "glm4moe": ("Glm4MoeConfig", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                  "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                  "head_dim": 16}, True),
    "phimoe": ("PhimoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    # JetMoE: parallel experts (input_linear/output_linear), its attention experts left alone
    "jetmoe": ("JetMoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "kv_channels": 16,
                                "num_key_value_heads": 2}, True),
    # hybrids: Mamba and attention layers; Jamba's feed-forwards alternate dense and MoE
    "jamba": ("JambaConfig", {"num_experts": 4, "num_experts_per_tok": 2, "expert_layer_period": 2,
                              "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
                              "mamba_d_state": 4, "mamba_d_conv": 2, "mamba_expand": 2, "use_mamba_kernels": False},
              True),
    # Granite-4.0: a Mamba layer and an attention layer, each with an MoE block beside a fused shared MLP
    "granitehybrid": ("GraniteMoeHybridConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                 "shared_intermediate_size": 40, "layer_types": ["mamba", "attention"],
                                                 "mamba_d_state": 4, "mamba_d_conv": 2, "mamba_expand": 2,
                                                 "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1}, True),
    "qwen3next": ("Qwen3NextConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                      "shared_expert_intermediate_size": 40, "head_dim": 16,
                                      "layer_types": ["linear_attention", "full_attention"],
                                      "linear_num_value_heads": 2, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                                      "linear_value_head_dim": 8}, False),
    # Falcon-H1: attention and Mamba side by side, a dense MLP whose gate is scaled before its activation
    "falconh1": ("FalconH1Config", {"mamba_d_state": 4, "mamba_d_conv": 2, "mamba_expand": 2, "mamba_n_heads": 4,
                                    "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_n_groups": 1, "head_dim": 16,
                                    "mamba_chunk_size": 16, "mlp_multipliers": [0.75, 0.5]}, True),
    # gpt-oss: interleaved, biased, clamped experts (in + 1)
    "gptoss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                "intermediate_size": 24}, True),
    # Nemotron-H: Mamba, attention, MLP and MoE layers whose MLPs are not gated (relu2): refused
    "nemotronh": ("NemotronHConfig", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                      "hybrid_override_pattern": "M*-E", "mamba_num_heads": 4, "mamba_head_dim": 16,
                                      "ssm_state_size": 4, "n_groups": 1, "head_dim": 16}, True),
}
MOE_ARCHS = ("mixtral", "olmoe", "qwen2moe", "deepseek2")
#: The families of issue 18 (and Llama 4's multimodal wrapper); nemotronh is refused (not gated).
NEW_FAMILIES = ("llama4", "llama4mm", "qwen3moe", "deepseek3", "glm4moe", "phimoe", "granitemoe", "jetmoe", "jamba",
                "granitehybrid", "qwen3next", "falconh1", "gptoss")


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
    if arch == "llama4mm":
        vision = transformers.Llama4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14,
                                                 vision_output_dim=16, projector_input_dim=16,
                                                 projector_output_dim=d_model, pixel_shuffle_ratio=0.5)
        text["vocab_size"] = len(tokenizer) + 1
        return transformers.Llama4Config(text_config=transformers.Llama4TextConfig(**text), vision_config=vision,
                                         image_token_index=len(tokenizer))
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
    if arch in ("llava", "llama4mm"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives tiny weights (routers and Llama 4's experts start at zero); scale the MLP
    # projections and the routers so activations spread over all four cases and tokens over all experts.
    mlp_names = ("gate_proj.weight", "up_proj.weight", "gate_up_proj.weight", "experts.gate_up_proj",
                 "gate.weight", "router.weight", "router.layer.weight", "input_linear.weight")
    blocks = (".mlp.", ".feed_forward.", ".block_sparse_moe.", ".shared_mlp.")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(b in name for b in blocks) and name.endswith(mlp_names) and "vision" not in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def write_corpus_files(folder: Path, texts=CORPUS) -> list[Path]:
    """The corpus as one .jsonl file and one .txt file per text."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return [jsonl]
