"""kvpress presses through echokv's adapter give what kvpress itself gives (peers environment only)."""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import DynamicCache

from echokv.tiny import tiny_model
from echokv_lab.methods import MethodUnavailable, make_method
from echokv_lab.methods.kvpress import PRESSES, KVPressMethod

pytestmark = pytest.mark.peers

N_CTX, N_Q, MAX_NEW = 150, 6, 12


@pytest.fixture(scope="module")
def model():
    # a larger init than the default so that greedy answers depend on the (compressed) context
    return tiny_model("llama", initializer_range=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny vocabulary: token i <-> "t<i>", 0/1/2 = pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(3, 256)} | {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<pad>",
                                  pad_token="<pad>")
    tok.model_max_length = 2048
    return tok


@pytest.fixture(scope="module")
def sample():
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(3, 256, (N_CTX,), generator=g).tolist()
    q = torch.randint(3, 256, (N_Q,), generator=g).tolist()
    return ctx, q


def _text(ids):
    return " ".join(f"t{i}" for i in ids)


@pytest.mark.parametrize("press", ["snapkv", "streamingllm", "knorm", "expected_attention"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8])
def test_adapter_matches_kvpress_pipeline(press, ratio, model, tokenizer, sample):
    """Same answer tokens as kvpress' own KVPressTextGenerationPipeline on the same model and input."""
    ctx, q = sample
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    kv_press = getattr(kvpress, PRESSES[press])(compression_ratio=ratio)
    # the pipeline (no chat template) prefixes the context with BOS and appends "\n" to the question
    res = pipe(" " + _text(ctx), question=_text(q), press=kv_press, max_new_tokens=MAX_NEW)
    expected = [int(w[1:]) for w in res["answer"].split()]
    meth = KVPressMethod(ratio, name=f"kvpress:{press}", press=press)
    out, rep = meth.generate(model, [tokenizer.bos_token_id] + ctx, q, MAX_NEW, eos_ids=(tokenizer.eos_token_id,))
    assert out == expected
    n = N_CTX + 1
    kept_tokens = n if ratio == 0 else int(n * (1 - ratio))
    assert rep["context_kept_fraction"] == pytest.approx(kept_tokens / n)
    assert rep["tokens"] == n + N_Q + len(out) - 1 + (len(out) < MAX_NEW)
    assert rep["kept_fraction"] == pytest.approx(rep["cache_bytes"] / rep["full_cache_bytes"])


@pytest.mark.parametrize("press", ["snapkv", "streamingllm"])
def test_adapter_matches_press_context_manager(press, model, sample):
    """Same compressed cache and tokens as the press context manager around model.model + greedy decode."""
    ctx, q = sample
    kv_press = getattr(kvpress, PRESSES[press])(compression_ratio=0.5)
    cache = DynamicCache()
    with torch.no_grad():
        with kv_press(model):
            model.model(input_ids=torch.tensor([ctx]), past_key_values=cache)
        kept = [lay.keys.clone() for lay in cache.layers]
        pos = torch.arange(N_CTX, N_CTX + N_Q)[None]
        logits = model(input_ids=torch.tensor([q]), past_key_values=cache, position_ids=pos).logits
        expected = []
        for i in range(5):
            expected.append(int(logits[0, -1].argmax()))
            logits = model(input_ids=torch.tensor([[expected[-1]]]), past_key_values=cache,
                           position_ids=pos[:, -1:] + 1 + i).logits
    out, rep = KVPressMethod(0.5, press=press).generate(model, ctx, q, 5)
    assert out == expected
    per_token = sum(2 * k[0, :, 0].numel() * k.element_size() for k in kept)
    assert rep["context_cache_bytes"] == sum(2 * k.numel() * k.element_size() for k in kept)
    assert rep["context_full_cache_bytes"] == per_token * N_CTX


@pytest.mark.parametrize("press", list(PRESSES))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_every_press_runs_or_says_why(press, ratio, model, sample):
    ctx, q = sample
    meth = make_method(f"kvpress:{press}", ratio)
    assert isinstance(meth, KVPressMethod) and meth.press == press
    try:
        out, rep = meth.generate(model, ctx, q, 4)
    except MethodUnavailable as exc:
        assert press in str(exc) and len(str(exc)) > 30
        return
    assert len(out) <= 4 and all(isinstance(t, int) for t in out)
    assert 0 < rep["context_kept_fraction"] <= 1
    if press == "think":  # channels zeroed, not removed: the bytes stay; the report says so
        assert rep["context_kept_fraction"] == 1.0
        assert rep["nonzero_fraction"] == pytest.approx(1 - ratio, abs=0.02)
        assert rep["nominal_kept_fraction"] == 1 - ratio
    else:
        assert rep["context_kept_fraction"] == pytest.approx(int(N_CTX * (1 - ratio)) / N_CTX)


def test_unavailable_cases(model, sample):
    ctx, q = sample
    with pytest.raises(MethodUnavailable, match="think"):
        KVPressMethod(0.5, press="think").generate(model, ctx, q, 2)
    with pytest.raises(MethodUnavailable, match="sliding-window"):
        KVPressMethod(0.5, press="snapkv").generate(tiny_model("gemma3"), ctx, q, 2)
    with pytest.raises(MethodUnavailable, match="longer than 64"):
        KVPressMethod(0.5, press="snapkv").generate(model, ctx[:40], q, 2)
    with pytest.raises(MethodUnavailable, match="perplexity"):
        KVPressMethod(0.5, press="knorm").nll(model, torch.tensor([ctx]))
    with pytest.raises(ValueError, match="unknown kvpress press"):
        KVPressMethod(0.5, press="h2o")
