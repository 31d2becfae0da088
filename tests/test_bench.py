"""``echokv bench`` on a tiny model: what it measures and reports (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from echokv.tiny import tiny_model
from echokv_lab.bench import EXPLICIT, FAST, FULL, STOCK, VARIANTS, bench_context
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
                "explicit_vs_full_decode_ratio", "fast_vs_explicit_decode_ratio", "fast_vs_stock_prefill_ratio",
                "fast_exact_prompt_vs_stock_prefill_ratio"):
        assert r[key] > 0
    assert set(r["prefill_seconds"]) == {"stock", "chunks", "exact"}
    full, fast = r["variants"][FULL]["cache_bytes"], r["variants"][FAST]["cache_bytes"]
    # after the untimed pass (3 steps) the full cache holds 48 + 3 tokens of K and V for every layer and head, in float32
    geo = model.config
    assert full == 4 * 51 * 2 * geo.num_key_value_heads * geo.head_dim * 4
    assert r["variants"][STOCK]["cache_bytes"] == full
    assert abs(r["kv_bytes_ratio"] - recon.layout.kept_fraction()) < 0.01 and fast < full
    # allocated memory: the stored tokens plus spare room of at most 1/64 (none yet at 51 tokens)
    assert fast <= r["variants"][FAST]["reserved_cache_bytes"] <= fast * (1 + 1 / 64) + 1
    assert r["kv_reserved_bytes_ratio"] >= r["kv_bytes_ratio"] - 1e-12


def test_bench_context_times_each_fast_codec_decode_and_prefill():
    from echokv.codecs.headq import fit

    model = tiny_model("llama", seed=0, num_hidden_layers=2)
    recon, _ = train_tiny(model, steps=1, compression_ratio=0.5)
    ids = torch.randint(3, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    codec = fit(model, torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(1)), 0.75)
    r = bench_context(model, recon, ids, decode_tokens=2, repeats=1, chunk=32, codecs={"echokv-q@0.75": codec})
    c = r["codecs"]["echokv-q@0.75"]
    assert c["q_vs_full_decode_ratio"] > 0 and c["q_vs_stock_decode_ratio"] > 0 and c["q_vs_stock_prefill_ratio"] > 0
    assert c["kernel_path"] in ("cpp", "torch") and 0 < c["kv_bytes_ratio"] < 1
    assert c["q_exact_prompt_vs_stock_prefill_ratio"] > 0
    assert set(r["prefill_seconds"]) == {"stock", "chunks", "exact", "echokv-q@0.75", "echokv-q@0.75 exact"}


def test_dtype_context_times_the_default_cache_in_two_dtypes():
    from echokv_lab.bench import dtype_context

    models = {"bfloat16": tiny_model("llama", dtype=torch.bfloat16), "float32": tiny_model("llama")}
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    r = dtype_context(models, ids, decode_tokens=3, repeats=2, chunk=16)
    assert r["context"] == 40 and list(r["dtypes"]) == ["bfloat16", "float32"]
    assert all(d["prefill_seconds"] > 0 and d["decode_tokens_per_second"] > 0 for d in r["dtypes"].values())
    assert r["decode_ratio"] > 0 and r["prefill_ratio"] > 0


def test_parse_budget_reads_bytes_units_and_full_sequences():
    import pytest

    from echokv_lab.bench import parse_budget

    assert parse_budget("190000000") == ("bytes", 190e6)
    assert parse_budget("190MB") == ("bytes", 190e6)
    assert parse_budget("1.5GiB") == ("bytes", 1.5 * 2**30)
    assert parse_budget(" 4x ") == ("full", 4.0)
    for bad in ("0", "-3MB", "x", "fourx", "3.5x", "12 parsecs", "inf", "1e999"):
        with pytest.raises(ValueError, match="is not a positive size"):
            parse_budget(bad)


def test_budget_batches_are_the_largest_that_fit_the_bytes_actually_held():
    from echokv.cache import accounting
    from echokv_lab.bench import BUDGET_VARIANTS, _batch, _decode, budget_context, parse_budget

    model = tiny_model("llama", seed=0, num_hidden_layers=4)
    recon, _ = train_tiny(model, steps=1, compression_ratio=0.5)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    budgets = [parse_budget("1x"), parse_budget("3x"), 20_000, 10]
    r = budget_context(model, recon, ids, budgets, decode_tokens=3, repeats=1, chunk=16)
    rows = r["budgets"]
    assert [b["budget"] for b in rows] == ["1x full", "3x full", "20000 bytes", "10 bytes"]
    assert rows[0]["budget_bytes"] == rows[0]["variants"][FULL]["per_sequence_bytes"]

    # the batch each variant got, rebuilt here: it fits after the timed tokens, one more sequence does not
    prefilled = {}
    for v in BUDGET_VARIANTS:
        from echokv.generation import prefill
        from echokv_lab.bench import _attention_for, _new_cache

        with _attention_for(model, v):
            cache = _new_cache(model, v, recon)
            prefilled[v] = (cache, prefill(model, cache, ids, chunk_size=16)[:, None].argmax(-1))

    def held(v, batch):
        work, tok = _batch(prefilled[v], batch)
        _decode(model, work, tok, 3, v)
        return accounting.reserved_nbytes(work)

    for row in rows:
        limit = row["budget_bytes"]
        for v in BUDGET_VARIANTS:
            got = row["variants"][v]
            assert got["cache_bytes"] <= limit and got["fits"] == (got["batch"] > 0)
            if got["batch"]:
                assert got["cache_bytes"] == held(v, got["batch"]) and got["decode_tokens_per_second"] > 0
            assert held(v, got["batch"] + 1) > limit
    # "3x" is what full mode holds for 3 sequences; about half the bytes per sequence fit about twice as many
    assert rows[1]["budget_bytes"] == held(FULL, 3) and rows[1]["variants"][FULL]["batch"] == 3
    assert rows[1]["variants"][FAST]["batch"] in (5, 6)
    assert rows[1]["budget_throughput_vs_full"][FULL] == 1.0 and rows[1]["budget_throughput_vs_full"][FAST] > 0
    assert rows[3]["budget_throughput_vs_full"] == {STOCK: None, FULL: None, FAST: None}


def test_bench_refuses_a_bad_budget_before_loading_the_model(monkeypatch, capsys, tmp_path):
    from echokv.cli import main

    def boom(config):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("echokv.models.load_configured", boom)
    base = ["bench", "--artifact", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*base, "--kv-budget", "4x,lots"]) == 2
    assert "--kv-budget entry 'lots' is not a positive size" in capsys.readouterr().err
    assert main([*base, "--contexts", "none"]) == 2
    assert "--contexts none needs --kv-budget" in capsys.readouterr().err


@pytest.mark.parametrize(("budget", "message"), [
    ("1e99", "more than this machine's memory"),
    ("1000000GB", "more than this machine's memory"),
    ("1e30x", "more than this machine's memory"),
    ("10", "less than one sequence of 2080 tokens holds in full mode"),
    ("1KB", "full mode, the reference, would hold nothing"),
])
def test_budgets_that_parse_but_cannot_run_are_refused_before_the_model_loads(monkeypatch, capsys, tmp_path, budget,
                                                                              message):
    # issue #29: a huge budget failed with a traceback after the prefills, a tiny one wrote an empty plot
    from echokv import artifact
    from echokv.cli import main

    model = tiny_model()
    recon, report = train_tiny(model, steps=0)
    art = artifact.save(recon, model, tmp_path / "art", report)

    def boom(config, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("echokv.models.load_configured", boom)
    argv = ["bench", "--artifact", str(art), "--out", str(tmp_path / "out"), "--contexts", "none",
            "--kv-budget", f"2x,{budget}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and budget in err
