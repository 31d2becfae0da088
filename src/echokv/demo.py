"""``echokv demo``: the main job on one screen.

Train (or reuse) a reconstructor at the given ratio, answer a few chat prompts with the full cache and
with the compressed cache, measure held-out perplexity through both caches, and print a comparison.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


def _artifact(model, tokenizer, ratio: float, out: Path, steps: int) -> tuple[str, dict]:
    from . import artifact as art
    from .training import TrainConfig, train

    path = out / f"artifact-{ratio:g}"
    if path.exists():
        try:
            art.check_compatible(art.read_config(path), model, str(path))
            report = json.loads((path / "train_report.json").read_text())
            same = report["layout"].get("variant") == TrainConfig.variant and report["stage2"]["steps"] == steps
            if abs(report["compression_ratio"] - ratio) < 1e-9 and same:
                print(f"reusing {path}")
                return str(path), report
        except (art.ArtifactError, OSError, KeyError, json.JSONDecodeError):
            pass
    print(f"training a reconstructor at compression ratio {ratio:g} (stage 1 + {steps} stage-2 steps) ...")
    recon, report = train(model, tokenizer, TrainConfig(compression_ratio=ratio, stage2_steps=steps))
    art.save(recon, model, path, report, overwrite=True)
    return str(path), report


def _perplexity(model, method, ids) -> tuple[float, dict]:
    total, count, mem = method.nll(model, ids, chunk_size=128)
    return math.exp(total / count), mem


def cmd_demo(args) -> int:
    from .baselines.base import Method
    from .cache import EchoKVCache
    from .cli import _load, encode_prompt, run_generation
    from .data import token_blocks
    from .methods import EchoKVMethod

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load(args)
    path, report = _artifact(model, tokenizer, args.compression_ratio, out, args.steps)

    rows = []
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        answers = {}
        for mode in ("full", "compressed"):
            cache = EchoKVCache(model, path, mode=mode)
            t = time.perf_counter()
            new = run_generation(model, tokenizer, ids, cache, max_new_tokens=32)
            secs = time.perf_counter() - t
            answers[mode] = (tokenizer.decode(new, skip_special_tokens=True).strip(), cache.memory_report(), secs)
        rows.append((prompt, answers))

    held = token_blocks(tokenizer, "evaluation", 1024, 1024)
    full_ppl, _ = _perplexity(model, Method(0.0), held[:1])
    echo = EchoKVMethod(args.compression_ratio, artifact=path)
    echo.prepare(model, tokenizer, None)
    echo_ppl, echo_mem = _perplexity(model, echo, held[:1])

    bar = "=" * 100
    print(bar)
    print(f"echokv demo: {getattr(model, 'echokv_name', args.model)}, EchoKV-{report['layout'].get('variant', 'echo')}, "
          f"compression ratio {args.compression_ratio:g} (kept {report['kept_fraction']:.3f} of K/V: "
          f"K {report['kept_fraction_k']:.2f}, V {report['kept_fraction_v']:.2f}), artifact {path}")
    s1, s2 = report["stage1"], report["stage2"]
    print(f"training: stage 1 {s1['seconds']:.0f} s, stage 2 {s2['seconds']:.0f} s; held-out output MSE "
          f"stage 1 {s2['omse_before']:.3f} -> stage 2 {s2['omse_after']:.3f} "
          f"(mean fill {report['heldout']['omse_mean_fill']:.3f}, zero fill {report['heldout']['omse_zero_fill']:.3f})")
    print(bar)
    for prompt, answers in rows:
        print(f"Q: {prompt}")
        for mode, (text, mem, secs) in answers.items():
            print(f"  {mode:<10} {text[:70]!r:<74} cache {mem['cache_bytes'] / 1e6:6.2f} MB (kept {mem['kept_fraction']:.2f})")
    print(bar)
    print(f"held-out perplexity (1024 tokens, chunks of 128 through the cache): full {full_ppl:.2f}, "
          f"echokv {echo_ppl:.2f} (kept {echo_mem['kept_fraction']:.3f})")
    print(bar)
    summary = {
        "artifact": path,
        "compression_ratio": args.compression_ratio,
        "kept_fraction": report["kept_fraction"],
        "perplexity": {"full": full_ppl, "echokv": echo_ppl},
        "answers": [{"prompt": p, **{m: a[0] for m, a in ans.items()}} for p, ans in rows],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"written {out / 'demo.json'}")
    return 0
