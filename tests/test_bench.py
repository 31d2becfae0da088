"""``echokv bench`` on a tiny model: what it measures and reports (no timing assertions)."""

from __future__ import annotations

import torch

from echokv.bench import EXPLICIT, FAST, FULL, STOCK, VARIANTS, bench_context
from echokv.tiny import tiny_model
from helpers import train_tiny


def test_bench_context_reports_every_variant_and_the_real_cache_bytes():
    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    recon, _ = train_tiny(model, steps=1, compression_ratio=0.5)
    ids = torch.randint(3, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    r = bench_context(model, recon, ids, decode_tokens=3, repeats=2, chunk=16)

    assert r["context"] == 48 and set(r["variants"]) == set(VARIANTS)
    for v in r["variants"].values():
        assert len(v["decode_seconds"]) == 2 and v["decode_tokens_per_second"] > 0 and v["prefill_seconds"] > 0
    assert VARIANTS == (STOCK, FULL, EXPLICIT, FAST) == ("stock", "echokv-full", "echokv-explicit", "echokv-fast")
    for key in ("full_vs_stock_decode_ratio", "fast_vs_full_decode_ratio", "fast_vs_stock_decode_ratio",
                "explicit_vs_full_decode_ratio", "fast_vs_explicit_decode_ratio"):
        assert r[key] > 0
    full, fast = r["variants"][FULL]["cache_bytes"], r["variants"][FAST]["cache_bytes"]
    # after the untimed pass (3 steps) the full cache holds 48 + 3 tokens of K and V for every layer and head, in float32
    geo = model.config
    assert full == 4 * 51 * 2 * geo.num_key_value_heads * geo.head_dim * 4
    assert r["variants"][STOCK]["cache_bytes"] == full
    assert abs(r["kv_bytes_ratio"] - recon.layout.kept_fraction()) < 0.01 and fast < full
    # allocated memory: the stored tokens plus spare room of at most 1/64 (none yet at 51 tokens)
    assert fast <= r["variants"][FAST]["reserved_cache_bytes"] <= fast * (1 + 1 / 64) + 1
    assert r["kv_reserved_bytes_ratio"] >= r["kv_bytes_ratio"] - 1e-12


def test_dtype_context_times_the_default_cache_in_two_dtypes():
    from echokv.bench import dtype_context

    models = {"bfloat16": tiny_model("llama", dtype=torch.bfloat16), "float32": tiny_model("llama")}
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    r = dtype_context(models, ids, decode_tokens=3, repeats=2, chunk=16)
    assert r["context"] == 40 and list(r["dtypes"]) == ["bfloat16", "float32"]
    assert all(d["prefill_seconds"] > 0 and d["decode_tokens_per_second"] > 0 for d in r["dtypes"].values())
    assert r["decode_ratio"] > 0 and r["prefill_ratio"] > 0
