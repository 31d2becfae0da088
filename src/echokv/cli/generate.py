"""``echokv generate``: text through the full or the compressed cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import GenerateConfig
from ._args import UsageError, from_args

CONFIGS = (GenerateConfig,)
HELP = "generate text with the full or the compressed cache"


def _read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file).expanduser()
        if path.is_dir():
            raise UsageError(f"--prompt-file {path} is a folder; pass a text file")
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"prompt file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position "
                             f"{exc.start}); save it as UTF-8") from None
    else:
        text = cfg.prompt
    if text is None or not text.strip():
        raise UsageError("the prompt is empty; pass --prompt TEXT or --prompt-file FILE with some text")
    return text


def run(args) -> int:
    from transformers import TextStreamer

    from ..generation import encode_prompt, generate
    from ..models import kv_geometry, load_configured
    from ..placement import input_device

    cfg = from_args(args, GenerateConfig)
    text = _read_prompt(cfg)
    switch = [flag for flag, v in (("--switch-at", cfg.switch_at), ("--memory-budget", cfg.memory_budget)) if v]
    if cfg.mode is None:  # as the library does: a switch condition means auto mode; a codec asked for, compressed
        cfg.mode = "auto" if switch else "compressed" if cfg.echokv_q and not cfg.artifact else "full"
    elif switch and cfg.mode != "auto":
        raise UsageError(f"{' and '.join(switch)} set(s) when auto mode switches, but --mode {cfg.mode} never "
                         "switches; drop --mode (auto is the default with them) or the switch")
    if cfg.mode in ("compressed", "auto") and not cfg.artifact and cfg.echokv_q is None:
        raise UsageError(f"--mode {cfg.mode} needs --artifact DIR (train one with `echokv train`) or --echokv-q RATIO "
                         "(the fast codec, no training)")
    if cfg.mode == "auto" and cfg.switch_at is None and cfg.memory_budget is None:
        raise UsageError("--mode auto needs --switch-at N (tokens) or --memory-budget BYTES")
    if cfg.echokv_q == 0:
        raise UsageError("--echokv-q 0 removes nothing: leave it out (full mode) or pass a ratio such as 0.5")
    tiers = cfg.artifact is not None and cfg.echokv_q is not None
    if tiers and (cfg.memory_budget is None or cfg.switch_at is not None):
        raise UsageError("--echokv-q with --artifact makes tiers (full, then EchoKV-Q, then the artifact's mix), "
                         "which switch on memory: pass --memory-budget BYTES"
                         + (" instead of --switch-at" if cfg.switch_at is not None else ""))
    groups = None
    if cfg.artifact:
        from ..artifact import read_config

        groups = read_config(cfg.artifact)["layout"]["groups"]  # complete and well-formed, before the model loads
    model, tokenizer = load_configured(cfg, groups=groups)
    ids = encode_prompt(tokenizer, text, None if cfg.chat == "auto" else cfg.chat == "on").to(input_device(model))
    ctx = kv_geometry(model).max_context
    if ctx and ids.shape[1] + cfg.max_new_tokens > ctx:
        raise UsageError(
            f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens {cfg.max_new_tokens} it exceeds the "
            f"model's context of {ctx} tokens: shorten the prompt or ask for fewer tokens"
        )
    cache = _cache(cfg, model, tokenizer, tiers)
    streamer = None if cfg.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    new = generate(model, ids, cache, max_new_tokens=cfg.max_new_tokens, sample=cfg.sample,
                   temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, streamer=streamer,
                   pad_token_id=tokenizer.pad_token_id)[0]
    report = cache.memory_report()
    if cfg.json:
        print(json.dumps({
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "mode_at_end": report["mode"],
            **({"tier_at_end": report["tier"], "tier_changes": report["tier_changes"]} if tiers else {}),
            "switched_at": report["switched_at"],
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": int(new.shape[0]),
            "cache_bytes": report["cache_bytes"],
            "full_cache_bytes": report["full_cache_bytes"],
            "kept_fraction": report["kept_fraction"],
        }))
    else:
        tier = f" (tier {report['tier']})" if tiers else ""
        print(
            f"\n[{report['mode']} mode at end{tier}; cache {report['cache_bytes'] / 1e6:.2f} MB of "
            f"{report['full_cache_bytes'] / 1e6:.2f} MB full (kept {report['kept_fraction']:.3f})]",
            file=sys.stderr,
        )
    return 0


def _cache(cfg: GenerateConfig, model, tokenizer, tiers: bool):
    """The cache the flags ask for: full; the artifact's mix; EchoKV-Q; or the ladder full -> EchoKV-Q -> the mix."""
    from ..cache import CompressedCache, FullCache, TieredCache
    from ..codecs.mix import EchoKVCache, mix_codec

    if cfg.echokv_q is None:
        if not cfg.artifact:
            return FullCache(model)
        return EchoKVCache(model, cfg.artifact, mode=cfg.mode, switch_at_tokens=cfg.switch_at,
                           memory_budget_bytes=cfg.memory_budget, full_window=cfg.full_window)
    from ..codecs.headq import fit_calibrated

    try:
        fast = fit_calibrated(model, tokenizer, cfg.echokv_q, progress=True)
    except ValueError as exc:  # a model whose attention the fused kernel cannot serve
        raise UsageError(str(exc)) from None
    if tiers:
        return TieredCache(model, {f"echokv-q@{cfg.echokv_q:g}": fast, "echokv": mix_codec(model, cfg.artifact)},
                           memory_budget_bytes=cfg.memory_budget, full_window=cfg.full_window)
    # fit refuses a model the fused kernel cannot serve, so the fast path always applies here
    return CompressedCache(model, fast, mode=cfg.mode, switch_at_tokens=cfg.switch_at,
                           memory_budget_bytes=cfg.memory_budget, full_window=cfg.full_window, fast=True)
