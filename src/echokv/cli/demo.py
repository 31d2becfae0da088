"""``echokv demo``: the main job on one screen.

Train (or reuse) an EchoKV network at the given ratio, answer a few chat prompts with the full cache and
with the compressed cache, measure held-out perplexity through both caches, and print a comparison.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..config import DemoConfig, TrainConfig
from ._args import from_args

CONFIGS = (DemoConfig,)
HELP = "the main job: train at ratio 0.5, generate full vs compressed, compare"

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


def _perplexity(model, cache, ids) -> tuple[float, dict]:
    from ..attention import echokv_attention
    from ..generation import nll

    with echokv_attention(model):
        total, count = nll(model, cache, ids, chunk_size=128)
    return math.exp(total / count), cache.memory_report()


def _verdict(split: dict | None, tokenizer, tol: float) -> str:
    """One line: does the compressed answer follow full mode's, and where it does not, why."""
    if split is None:
        return "check: the compressed answer follows full mode's token for token"
    ref, ans = (repr(tokenizer.decode([split[k]])) for k in ("reference_token", "answer_token"))
    margin = split["reference_margin"]
    where = f"check: the compressed answer leaves full mode's at token {split['index']} ({ans} for {ref}); full mode "
    where += (f"preferred {ref} by {margin:.3g} logits" if margin >= 0 else
              f"replayed one step at a time prefers {ans} too, by {-margin:.3g} logits")
    if split["near_tie"]:
        return where + f", a near tie (within the dtype's rounding, {tol:g}): either answer is the model's"
    return where + f", beyond the dtype's rounding ({tol:g}): a loss from compression"


def run(args) -> int:
    from ..attention import serves
    from ..cache import CompressedCache
    from ..codecs.headq import fit_calibrated
    from ..codecs.mix import EchoKVCache
    from ..data import token_blocks
    from ..generation import divergence, encode_prompt, generate, near_tie
    from ..models import load_configured
    from ..training import artifact_dir, train_or_reuse
    from ..util import atomic_dir, check_output_dir

    cfg = from_args(args, DemoConfig)
    out = Path(cfg.out).expanduser()
    train_cfg = TrainConfig(compression_ratio=cfg.compression_ratio, stage2_steps=cfg.steps)
    train_cfg.ratios()
    check_output_dir(out, overwrite=True, replace=False)  # writable, before any work
    if out.is_dir():  # the artifact kept there is reused or replaced: only if it is echokv's own
        check_output_dir(artifact_dir(out, train_cfg), overwrite=True)
    model, tokenizer = load_configured(cfg)
    path, report = train_or_reuse(model, tokenizer, artifact_dir(out, train_cfg), train_cfg)

    rows = []
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        answers, tokens = {}, {}
        for mode in ("full", "compressed"):
            cache = EchoKVCache(model, path, mode=mode)
            t = time.perf_counter()
            new = generate(model, ids, cache, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)[0]
            secs = time.perf_counter() - t
            answers[mode] = (tokenizer.decode(new, skip_special_tokens=True).strip(), cache.memory_report(), secs)
            tokens[mode] = new
        # the compressed answer checked against full mode's: where it leaves it, and whether that was a near tie
        split = divergence(model, ids, tokens["full"], tokens["compressed"],
                           lambda: EchoKVCache(model, path, mode="compressed"))
        rows.append((prompt, answers, split))

    held = token_blocks(tokenizer, "evaluation", 1024, 1024)
    full_ppl, _ = _perplexity(model, EchoKVCache(model, path, mode="full"), held[:1])
    echo_ppl, echo_mem = _perplexity(model, EchoKVCache(model, path, mode="compressed"), held[:1])
    # the fast codec at the same ratio (fitted in seconds): the tier to take first where decode speed matters
    fast = None
    if serves(model):
        codec = fit_calibrated(model, tokenizer, cfg.compression_ratio)
        fast = _perplexity(model, CompressedCache(model, codec, mode="compressed", fast=True), held[:1])

    bar = "=" * 100
    print(bar)
    print(f"echokv demo: {getattr(model, 'echokv_name', cfg.model)}, EchoKV-{train_cfg.variant}, "
          f"compression ratio {cfg.compression_ratio:g} (kept {report['kept_fraction']:.3f} of K/V: "
          f"K {report['kept_fraction_k']:.2f}, V {report['kept_fraction_v']:.2f}), artifact {path}")
    s1, s2 = report["stage1"], report["stage2"]
    fills = report["heldout"]
    print(f"training: stage 1 {s1['seconds']:.0f} s, stage 2 {s2['seconds']:.0f} s; held-out output error "
          f"stage 1 {s2['omse_before']:.4g} -> stage 2 {s2['omse_after']:.4g}"
          + (f" (stage 2 skipped: {s2['skipped']})" if s2.get("skipped") else "")
          + (f" (mean fill {fills['omse_mean_fill']:.3f}, zero fill {fills['omse_zero_fill']:.3f})"
             if "omse_mean_fill" in fills else ""))
    print(bar)
    tol = near_tie(next(model.parameters()).dtype)
    for prompt, answers, split in rows:
        print(f"Q: {prompt}")
        for mode, (text, mem, secs) in answers.items():
            print(f"  {mode:<10} {text[:70]!r:<74} cache {mem['cache_bytes'] / 1e6:6.2f} MB (kept {mem['kept_fraction']:.2f})")
        print("  " + _verdict(split, tokenizer, tol))
    print(bar)
    print(f"held-out perplexity (1024 tokens, chunks of 128 through the cache): full {full_ppl:.2f}, "
          f"echokv {echo_ppl:.2f} (kept {echo_mem['kept_fraction']:.3f})"
          + (f", echokv-q (the fast codec: `echokv generate --echokv-q {cfg.compression_ratio:g}`) {fast[0]:.2f} "
             f"(kept {fast[1]['kept_fraction']:.3f})" if fast else ""))
    print(bar)
    summary = {
        "artifact": path,
        "compression_ratio": cfg.compression_ratio,
        "kept_fraction": report["kept_fraction"],
        "perplexity": {"full": full_ppl, "echokv": echo_ppl, **({"echokv-q": fast[0]} if fast else {})},
        "near_tie_tolerance": tol,
        "answers": [{"prompt": p, **{m: a[0] for m, a in ans.items()}, "divergence": split} for p, ans, split in rows],
    }
    with atomic_dir(out, overwrite=True, replace=False) as tmp:
        (tmp / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"written {out / 'demo.json'}")
    return 0
