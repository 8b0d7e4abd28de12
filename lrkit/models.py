"""Model builders shared by every notebook: a small LLaMA from a config (no hub) and the MiniLM encoder.

LLaMA sizes follow the official GaLore configs (hidden / intermediate / layers / heads), vocab from the
tokenizer. ``"nano"`` and ``"micro"`` are the kit's CPU-sized additions.
"""
from __future__ import annotations

import torch

LLAMA_SIZES = {
    # name: (hidden, intermediate, layers, heads)
    "pico": (32, 88, 2, 2),      # the scaling ladder's smallest rung (notebooks/*/scaling.ipynb)
    "nano": (64, 176, 2, 2),
    "micro": (128, 352, 4, 4),   # the official "9m" shape; 9M parameters with vocab 32000
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 6, 8),
    "60m": (512, 1376, 8, 8),    # config file's d_model 512 (the paper's text says 256)
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),  # LLaMA-1 13B-65B (AdaLomo / LOMO papers' models)
    "30b": (6656, 17920, 60, 52),
    "65b": (8192, 22016, 80, 64),
}


def llama_config(size: str, vocab_size: int, max_seq_len: int = 256):
    from transformers import LlamaConfig

    if size not in LLAMA_SIZES:
        raise ValueError(f"Invalid model size: {size!r} (expected one of {list(LLAMA_SIZES)})")
    hidden, inter, layers, heads = LLAMA_SIZES[size]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_seq_len, tie_word_embeddings=False,
                       attn_implementation="eager")


def build_llama(size: str, vocab_size: int, max_seq_len: int = 256, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (pre-training from scratch, as in the papers)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(size, vocab_size, max_seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def build_encoder_classifier(num_labels: int, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2 with a fresh classification head, and its tokenizer, loaded offline by path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrkit import data

    import transformers

    path = data.load("minilm")
    transformers.logging.set_verbosity_error()  # the load report lists the fresh head: expected here
    transformers.logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
