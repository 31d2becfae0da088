"""Tiny randomly initialised models of the architectures users run, for tests and examples.

Nothing is downloaded: each model is built from a small config written here (a few layers, GQA,
head_dim 16-32), so a test that needs "a Llama" or "a Gemma3" runs in a second on a CPU.
"""

from __future__ import annotations

import torch

#: Qwen3 normalises queries and keys per head (QK-norm) before RoPE; Phi-3 fuses the Q/K/V projections (``qkv_proj``)
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "qwen3", "phi3")


def tiny_config(arch: str = "llama", **overrides):
    import transformers

    common = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    # per architecture: its configuration class and what it changes of the common settings
    configs = {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
        "gemma3": ("Gemma3TextConfig", {"num_hidden_layers": 6, "head_dim": 32, "sliding_window": 16,
                                        "layer_types": ["sliding_attention"] * 2 + ["full_attention"]
                                        + ["sliding_attention"] * 2 + ["full_attention"],
                                        "query_pre_attn_scalar": 32}),
        "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
        "phi3": ("Phi3Config", {"sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                "attention_dropout": 0.0}),
    }
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    name, changes = configs[arch]
    cfg = getattr(transformers, name)(**{**common, **changes, **overrides})
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of architecture ``arch`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    model.eval()
    model.echokv_name = f"tiny-{arch}"
    return model
