"""Helpers the tests import: tiny models with planted exact relations, a one-head layout, quick training."""

from __future__ import annotations

import torch


def train_cli(out, *extra) -> None:
    """`echokv train` at ratio 0.5 on the embedded SmolLM2 with small calibration sizes."""
    from echokv.cli import main

    rc = main(["train", "--compression-ratio", "0.5", "--calib-tokens", "4096", "--heldout-tokens", "1024",
               "--out", str(out), "--no-progress", *extra])
    assert rc == 0


def exact_tiny_llama(seed: int = 0, layers: int = 4):
    """A tiny Llama where KV head 1 of every layer is an exact function of head 0: a RoPE-commuting
    (per-frequency complex) map for keys and a linear map for values."""
    from echokv.tiny import tiny_model

    model = tiny_model("llama", seed=seed, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(seed + 1)
    d = model.config.head_dim
    f = d // 2
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            wk, wv = attn.k_proj.weight, attn.v_proj.weight
            k0 = wk[:d].clone()
            a, b = torch.randn(f, 1, generator=g), torch.randn(f, 1, generator=g)
            wk[d : d + f] = a * k0[:f] - b * k0[f:]
            wk[d + f : 2 * d] = b * k0[:f] + a * k0[f:]
            wv[d:] = (torch.randn(d, d, generator=g) * 0.3) @ wv[:d]
    return model


def one_head_layout(num_layers: int = 4):
    """Keep KV head 0 of every layer; reconstruct head 1 from it (groups of one layer)."""
    from echokv.selection import HeadLayout

    kept = [(layer, 0) for layer in range(num_layers)]
    return HeadLayout(list(range(num_layers)), 2, [[layer] for layer in range(num_layers)], kept, kept, "all", "custom")


def train_tiny(model, layout=None, steps: int = 3, seed: int = 0, **cfg):
    """Train an EchoKV network on random token blocks of a tiny model (seconds): the default variant (mix) unless
    ``variant`` (or a head ``layout``) says otherwise."""
    from echokv.training import TrainConfig, train

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    calib = torch.randint(3, vocab, (8, 64), generator=g)
    held = torch.randint(3, vocab, (4, 64), generator=g)
    # the product's default network (mix) unless a test names another; ``layout`` means the retained heads of it
    if layout is not None:
        cfg.setdefault("variant", "heads")
    config = TrainConfig(stage2_steps=steps, progress=False, seed=seed, **cfg)
    return train(model, None, config, calib=calib, held=held, layout=layout)
