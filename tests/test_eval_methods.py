"""The evaluation's methods in bfloat16 (the reference dtype): measured bytes per method, quantizers (``quant``,
``kivi``, transformers' ``hf-quant``), the fidelity suite, and every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from echokv.models import kv_geometry
from echokv.stats.collect import Calibration
from echokv.tiny import ARCHITECTURES, tiny_model
from echokv_lab.methods import MethodUnavailable, make_method
from echokv_lab.methods.hf_quant import hqq_available

CONTEXT, QUESTION = list(range(3, 203)), [5, 6, 7]


@pytest.fixture(scope="module")
def bf16():
    return tiny_model("llama", dtype=torch.bfloat16, head_dim=32, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def calib():
    return Calibration(blocks=torch.randint(3, 256, (4, 48), generator=torch.Generator().manual_seed(0)))


def _full_bytes(model, tokens):
    geo = kv_geometry(model)
    return 2 * geo.num_layers * geo.num_kv_heads * tokens * geo.head_dim * 2  # bfloat16


METHODS = ["full", "quant", "kivi", "lowrank", "xlayer-svd", "headdrop"] + (["hf-quant"] if hqq_available() else [])


@pytest.mark.parametrize("name", METHODS)
def test_bf16_bytes_are_measured_against_the_bf16_full_cache(name, bf16, calib):
    meth = make_method(name, 0.5)
    meth.prepare(bf16, None, calib)
    new, report = meth.generate(bf16, CONTEXT, QUESTION, 2)
    tokens = len(CONTEXT) + len(QUESTION) + len(new)  # every generated token is fed back
    assert report["full_cache_bytes"] == _full_bytes(bf16, tokens)
    assert report["kept_fraction"] == pytest.approx(report["cache_bytes"] / report["full_cache_bytes"])
    if name == "full":
        assert report["kept_fraction"] == 1.0
    else:  # near the target; quantizers a little above it (scales, and a full-precision residual for kivi/hf-quant)
        assert 0.45 <= report["kept_fraction"] <= 0.66, report


@pytest.mark.parametrize(("ratio", "bits"), [(0.5, 8), (0.75, 4), (0.875, 2)])
def test_quant_picks_8_4_2_bits_in_bf16(ratio, bits, bf16, calib):
    meth = make_method("quant", ratio)
    meth.prepare(bf16, None, calib)
    assert meth.info()["bits"] == bits
    _, report = meth.generate(bf16, CONTEXT, QUESTION, 1)
    # codes b / 16 of the cache plus an fp16 scale and zero per group of 32 channels (the head): 4 / 64 bytes
    assert report["kept_fraction"] == pytest.approx(bits / 16 + 4 / 64, abs=0.01)


def test_kivi_keys_per_channel_and_residual(bf16, calib):
    from echokv.codecs.quant import KiviCodec

    meth = make_method("kivi", 0.75, token_group=32)
    meth.prepare(bf16, None, calib)
    cache = meth.new_cache(bf16)
    assert isinstance(meth.make_codec(bf16), KiviCodec)
    with torch.no_grad():
        bf16(input_ids=torch.tensor([CONTEXT]), use_cache=True, past_key_values=cache)
    cache.compress()
    # 200 tokens: 6 groups of 32 quantized, 8 tokens stay in full precision (the residual)
    layer = cache.layers[0]
    assert cache.stores[0].n_tokens == 192 and layer.recent_length() == 8
    # round trip: keys quantized per channel over token groups stay close
    x = torch.randn(1, 2, 64, 32, dtype=torch.float32) * torch.logspace(-1, 1, 32)  # outlier channels
    codec = KiviCodec([0], 4, 32, 32, torch.float32)
    k, v = codec.decode(0, codec.encode(0, [x], [x]))
    assert k.shape == x.shape and v.shape == x.shape
    per_channel = (k - x).abs().amax(dim=(0, 1, 2)) / x.abs().amax(dim=(0, 1, 2))
    assert float(per_channel.max()) < 0.1  # each channel within ~1/15 of its own range
    with pytest.raises(ValueError, match="whole groups"):
        codec.encode(0, [x[:, :, :10]], [x[:, :, :10]])


@pytest.mark.skipif(not hqq_available(), reason="hqq is not installed (pip install 'echokv[hfquant]')")
def test_hf_quant_is_transformers_quantized_cache(bf16):
    from transformers import QuantizedCache

    meth = make_method("hf-quant", 0.5)
    meth.prepare(bf16, None, None)
    assert meth.info()["bits"] == 8 and isinstance(meth.new_cache(bf16), QuantizedCache)
    for ratio, bits in ((0.75, 4), (0.875, 2)):
        m = make_method("hf-quant", ratio)
        m.prepare(bf16, None, None)
        assert m.info()["bits"] == bits
    _nll, n, report = meth.nll(bf16, torch.tensor([CONTEXT]), 64)
    assert n == len(CONTEXT) - 1 and report["kept_fraction"] < 0.7


def test_fidelity_is_exactly_zero_for_full_and_not_for_quant(bf16, calib, tmp_path):
    from echokv_lab.eval.fidelity import fidelity_row, fidelity_section

    blocks = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    full = make_method("full", 0.0)
    row = fidelity_row(bf16, full, blocks, 32)
    assert row["kl"] == 0.0 and row["hidden_error"] == 0.0 and set(row["attn_error"]) == {0.0}
    assert row["tokens"] == 2 * 64 and len(row["attn_error"]) == kv_geometry(bf16).num_layers
    quant = make_method("quant", 0.875)
    quant.prepare(bf16, None, calib)
    lossy = fidelity_row(bf16, quant, blocks, 32)
    assert lossy["kl"] > 0 and lossy["hidden_error"] > 0 and lossy["ci_low"] <= lossy["kl"] <= lossy["ci_high"]
    assert lossy["kept_fraction"] < 0.3
    text, pngs = fidelity_section([{"method": "full", "compression_ratio": 0.0, **row},
                                   {"method": "quant", "compression_ratio": 0.875, **lossy}], tmp_path)
    assert "| full | 0 | 1.000 | 0.0000 |" in text and pngs[0].is_file()


def test_fidelity_suite_through_the_runner(bf16, smollm2_tokenizer, tmp_path):
    from echokv_lab.eval import runner

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16, head_dim=64)
    rows = runner.run_eval(model, smollm2_tokenizer, "fidelity", "full,quant", "0.75", context_lengths="160",
                           samples=1, out=tmp_path / "f", progress=False)
    by = {r["method"]: r for r in rows}
    assert by["full"]["kl"] == 0.0 and by["quant"]["kl"] > 0
    assert "## Fidelity" in (tmp_path / "f" / "report.md").read_text()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", ["quant", "kivi", "lowrank", "xlayer-svd", "headdrop"])
def test_every_tiny_architecture(arch, name, calib):
    model = tiny_model(arch, dtype=torch.bfloat16)
    meth = make_method(name, 0.5)
    meth.prepare(model, None, calib)
    new, report = meth.generate(model, CONTEXT, QUESTION, 2)
    assert len(new) <= 2 and 0.3 < report["kept_fraction"] < 0.8


def test_unreachable_ratio_is_a_row_not_an_exception(bf16, calib, smollm2_tokenizer):
    from echokv_lab.eval import runner

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16, head_dim=64)
    rows = runner.run_eval(model, smollm2_tokenizer, "quick", "full,quant", "0.5,0.97", tasks="niah_single_1",
                           context_lengths="200", samples=1, progress=False)
    far = [r for r in rows if r["method"] == "quant" and r["compression_ratio"] == 0.97]
    assert far and all("cannot reach ratio 0.97" in r["skipped"] for r in far)
    assert [r for r in rows if r["method"] == "quant" and r["compression_ratio"] == 0.5 and "score" in r]
    with pytest.raises(MethodUnavailable):
        make_method("quant", 0.97).prepare(model, None, None)
