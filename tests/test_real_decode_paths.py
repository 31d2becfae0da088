"""The compressed cache answers as its reference does, on the real model (issue #28): the default artifact
(`echokv train --compression-ratio R`, nothing else) at 0.5 and 0.75, ten prompts, sixteen greedy steps each. At
every step the fast path and the explicit rebuild run from the same cache state (tests/test_decode_paths.py says
why): their logits within the bfloat16 rounding of one step (:func:`echokv.generation.near_tie`), and the same
greedy token wherever the reference's top-2 margin is above it.

The artifacts are trained once and kept in ``$ECHOKV_TEST_CACHE`` (default ``~/.cache/echokv/tests``), under a key
of the trainer's sources, so a later run reuses them (about 30 s each to train).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch

from echokv.attention import echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.generation import encode_prompt, near_tie

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly.",
    "List two planets closer to the Sun than Earth.",
    "Write a haiku about autumn leaves.",
]
STEPS = 16


def _trained(ratio: float) -> Path:
    import echokv

    src = Path(echokv.__file__).parent
    digest = hashlib.sha256()
    for name in ("mixes.py", "artifact.py", "config.py", "training.py", "selection.py"):
        digest.update((src / name).read_bytes())
    root = Path(os.environ.get("ECHOKV_TEST_CACHE", Path.home() / ".cache" / "echokv" / "tests"))
    out = root / f"smollm2-default-{ratio:g}-{digest.hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        from echokv.cli import main

        assert main(["train", "--compression-ratio", str(ratio), "--out", str(out), "--no-progress",
                     "--overwrite"]) == 0
    return out


def _steps(model, cache, ids: torch.Tensor, prompt: str, tol: float) -> tuple[float, int]:
    """Greedy steps from ``ids``: at each, the fast path and the explicit rebuild from the same cache state agree
    within ``tol`` and on every clear decision. Returns (the worst difference, the clear steps)."""
    worst, checked = 0.0, 0
    t = ids[:, -1:]
    for step in range(STEPS):
        explicit = model(t, past_key_values=copy.deepcopy(cache)).logits[0, -1].float()
        with echokv_attention(model):
            fast = model(t, past_key_values=cache).logits[0, -1].float()
        diff = float((fast - explicit).abs().max())
        worst = max(worst, diff)
        assert diff <= tol, f"{prompt!r} step {step}: logits differ by {diff:.3g} > {tol}"
        top = explicit.topk(2)
        if float(top.values[0] - top.values[1]) > tol:
            checked += 1
            assert int(fast.argmax()) == int(top.indices[0]), f"{prompt!r} step {step}: greedy token differs"
        t = top.indices[:1].view(1, 1)
    return worst, checked


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_fast_path_answers_as_the_explicit_path(smollm2, ratio):
    model, tok = smollm2
    artifact = _trained(ratio)
    tol = near_tie(torch.bfloat16)
    worst, checked = 0.0, 0
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        cache = EchoKVCache(model, artifact, mode="compressed")
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache)
            w, c = _steps(model, cache, ids, prompt, tol)
        worst, checked = max(worst, w), checked + c
    # a quarter of the steps at least are clear decisions, so the greedy check bites (measured: 72 / 160 at 0.5,
    # 59 / 160 at 0.75)
    assert checked >= STEPS * len(PROMPTS) // 4
    print(f"ratio {ratio}: worst one-step |fast - explicit| {worst:.3g} logits; {checked} clear steps equal")


@pytest.fixture(scope="module")
def context_ids(smollm2):
    """256 tokens of evaluation text before each question: EchoKV-Q stores whole blocks of 64 tokens, so a bare
    question would never reach its codes."""
    from echokv.data import token_blocks

    _, tok = smollm2
    return token_blocks(tok, "evaluation", 256, 256)[:1]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_fast_codec_answers_as_its_explicit_rebuild(smollm2, context_ids, ratio):
    """EchoKV-Q (2-bit classes included at 0.75): the one-call C++ decode step (16-bit fixed-point query and weights
    where the CPU has VNNI) against its codes decoded to K/V and stock attention, from the same cache state."""
    from echokv.cache import CompressedCache
    from echokv.codecs.headq import fit
    from echokv.data import token_blocks

    model, tok = smollm2
    codec = fit(model, token_blocks(tok, "calibration", 4096, 512), ratio)
    tol = near_tie(torch.bfloat16)
    worst, checked = 0.0, 0
    for prompt in PROMPTS[:5]:
        ids = torch.cat([context_ids, encode_prompt(tok, prompt)], dim=1)
        cache = CompressedCache(model, codec, mode="compressed", fast=True)
        with torch.no_grad():
            with echokv_attention(model):
                model(ids[:, :-1], past_key_values=cache)
            assert min(layer.store.n_tokens for layer in cache.layers) >= 256  # read from codes, not recent
            w, c = _steps(model, cache, ids, prompt, tol)
        worst, checked = max(worst, w), checked + c
    assert checked >= STEPS * 5 // 4
    print(f"EchoKV-Q {ratio}: worst one-step |fast - explicit| {worst:.3g} logits; {checked} clear steps equal")
