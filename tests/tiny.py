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
    "qwen2": ("Qwen2Config", {}, False),
}


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

    config_class, extra, bos = ARCHS[arch]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, bos=bos)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives tiny weights; scale the MLP so activations spread over all four cases.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def write_corpus_files(folder: Path, texts=CORPUS) -> list[Path]:
    """The corpus as one .jsonl file and one .txt file per text."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return [jsonl]
