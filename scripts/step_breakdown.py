"""Where a decode step's time goes, and the most compression can save of it at batch 1.

    flock /tmp/echokv-timing.lock .venv/bin/python scripts/step_breakdown.py [--contexts 64 2048 8000]

For stock transformers, echokv's full mode and EchoKV-Q at each ratio (fitted on the calibration text at the
context), one greedy decode step at a time, the variants in rotating order (as ``echokv bench``: each step finds the
others' data in the caches, as a server does): the step's milliseconds, those spent in the attention kernel (full
mode's fused bf16 read, EchoKV-Q's ``kernels.attend_step``) and in the cache's ``update``, and the rest (the
model's own matmuls, norms and Python). Then the byte ceiling: if every byte a step reads (the bf16 weights of the
linear layers, lm_head included, and the K/V) streamed at one rate, a codec keeping a share k of the K/V could be
at most (W + KV) / (W + k KV) times faster than full mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv import attention, kernels
from echokv.cache import CompressedCache, FullCache

SPENT: dict[str, float] = {}


def _timed(owner, name: str, key: str) -> None:
    inner = getattr(owner, name)

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[key] = SPENT.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, call)


_timed(attention, "packed_decode", "kernel")
_timed(kernels, "attend_step", "kernel")
_timed(CompressedCache, "update", "cache")


def main() -> None:
    from transformers import DynamicCache

    from echokv.codecs.headq import fit
    from echokv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
    from echokv.data import token_blocks
    from echokv.generation import prefill
    from echokv.models import cache_kwarg, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 2048, 8000])
    ap.add_argument("--codec-ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per variant (64: every codec flushes a block "
                    "once, which a median of steps leaves out and the ratio of sums counts)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype="bfloat16")
    calibration = token_blocks(tokenizer, "calibration", CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN)
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    print(f"kernel path: {kernels.path('auto')}; {args.threads} threads; bf16 linear weights read per step: "
          f"{weights / 1e6:.1f} MB")
    for context in args.contexts:
        ids = token_blocks(tokenizer, "evaluation", context, context)
        # below a few blocks the codec stores nothing: the short context shows the step without attention
        codecs = {} if context < 256 else {f"echokv-q@{r:g}": fit(model, calibration, r, context=context + args.steps)
                                           for r in args.codec_ratios}
        caches = {}
        for name in ("stock", "full", *codecs):
            scope = attention.implementation(model, "sdpa") if name == "stock" else attention.echokv_attention(model)
            with scope:
                cache = (DynamicCache(config=model.config) if name == "stock" else FullCache(model) if name == "full"
                         else CompressedCache(model, codecs[name], mode="compressed", fast=True))
                caches[name] = [cache, prefill(model, cache, ids)[:, None].argmax(-1)]
        names = list(caches)
        spent = {n: {"step": [], "kernel": 0.0, "cache": 0.0} for n in names}
        with torch.no_grad():
            for i in range(args.steps):
                for j in range(len(names)):
                    name = names[(i + j) % len(names)]
                    cache, tok = caches[name]
                    scope = (attention.implementation(model, "sdpa") if name == "stock"
                             else attention.echokv_attention(model))
                    SPENT.clear()
                    with scope:
                        start = time.perf_counter()
                        logits = model(input_ids=tok, use_cache=True, **cache_kwarg(model, cache)).logits
                        spent[name]["step"].append(time.perf_counter() - start)
                    caches[name][1] = logits[:, -1:].argmax(-1)
                    for key in ("kernel", "cache"):
                        spent[name][key] += SPENT.get(key, 0.0)
        full_kv = caches["full"][0].nbytes()
        print(f"\ncontext {context}: full K/V {full_kv / 1e6:.1f} MB")
        print(f"{'variant':<16} {'step ms':>8} {'kernel':>8} {'cache':>7} {'rest':>7} {'vs full':>8} {'sums':>6} "
              f"{'ceiling':>8}")
        base = spent["full"]["step"]
        for name in names:
            s = spent[name]
            step = statistics.median(s["step"]) * 1e3
            kernel, upd = s["kernel"] / args.steps * 1e3, s["cache"] / args.steps * 1e3
            ratio = statistics.median(b / a for a, b in zip(s["step"], base))
            sums = sum(base) / sum(s["step"])
            kept = 1.0 if name in ("stock", "full") else caches[name][0].nbytes() / caches["full"][0].nbytes()
            ceiling = (weights + full_kv) / (weights + kept * full_kv)
            print(f"{name:<16} {step:>8.1f} {kernel:>8.1f} {upd:>7.1f} {step - kernel - upd:>7.1f} {ratio:>8.3f} "
                  f"{sums:>6.3f} {ceiling:>8.3f}")
    print("\n(kernel and cache: means per step; step: median; vs full: median of per-step ratios, above 1 faster; "
          "sums: full mode's summed step time over the variant's (the steps that flush a block included); ceiling: (W + KV) / (W + kept KV); stock's attention and cache are in its rest)")


if __name__ == "__main__":
    main()
