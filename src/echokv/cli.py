"""The ``echokv`` command line: info, train, generate, analyze, eval, bench, demo.

Cheap checks (ranges, files, folders) run before the model is loaded; checks that need the model
(geometry, artifact fingerprint, context length) run right after loading, before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import DEFAULT_MODEL


class UsageError(ValueError):
    """Bad command-line input."""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"compression ratio must be in [0, 1) (fraction of the cache removed), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _model_arg(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, Hub id, folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


# -- info -------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .models import kv_geometry, load_model

    if args.model.startswith("tiny-"):
        from .tiny import tiny_model

        model = tiny_model(args.model.removeprefix("tiny-"))
    else:
        model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    geo = kv_geometry(model)
    info = {"model": args.model, **geo.to_dict()}
    if args.json:
        print(json.dumps(info))
        return 0
    sliding = ", ".join(map(str, geo.sliding_layers)) or "none"
    print(f"model              {args.model} ({geo.model_type})")
    print(f"layers             {geo.num_layers}")
    print(f"query heads        {geo.num_attention_heads}")
    print(f"KV heads           {geo.num_kv_heads}")
    print(f"head_dim           {geo.head_dim}")
    print(f"sliding layers     {sliding}" + (f" (window {geo.sliding_window})" if geo.sliding_layers else ""))
    print(f"max context        {geo.max_context}")
    print(f"KV bytes / token   {geo.kv_bytes_per_token} ({geo.dtype})")
    return 0


# -- train ------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from . import artifact
    from .training import TrainConfig, train

    out = Path(args.out)
    artifact.check_output_dir(out, args.overwrite)
    cfg = TrainConfig(
        compression_ratio=args.compression_ratio,
        k_ratio=args.k_ratio,
        v_ratio=args.v_ratio,
        layout=args.layout,
        variant=args.variant,
        group_size=args.group_size,
        m=args.m,
        inputs=args.inputs,
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        heldout_tokens=args.heldout_tokens,
        stage2_steps=args.steps,
        stage2_lr=args.lr,
        seed=args.seed,
        text_paths=args.text,
        progress=not args.no_progress,
    )
    cfg.ratios()
    model, tokenizer = _load(args)
    cfg.validate(model)
    from .data import require_tokens

    require_tokens(tokenizer, "calibration", cfg.calib_tokens, cfg.seq_len, args.text)
    require_tokens(tokenizer, "evaluation", cfg.heldout_tokens, cfg.seq_len, args.text)
    recon, report = train(model, tokenizer, cfg)
    artifact.save(recon, model, out, report, overwrite=args.overwrite)
    s1, s2 = report["stage1"], report["stage2"]
    print(
        f"wrote {out}: kept fraction {report['kept_fraction']:.3f} (K {report['kept_fraction_k']:.3f}, "
        f"V {report['kept_fraction_v']:.3f}), network {report['reconstructor_bytes'] / 1e6:.2f} MB"
    )
    print(f"stage 1: {s1['seconds']:.1f} s, calibration rel. error {s1['final_loss']:.4f}")
    print(
        f"stage 2: {s2['seconds']:.1f} s, held-out output MSE {s2['omse_before']:.4f} -> {s2['omse_after']:.4f}"
        + (" (reverted to stage 1: stage 2 did not help on its training data)" if s2["reverted_to_stage1"] else "")
    )
    print(f"total {report['total_seconds']:.1f} s; report in {out / 'train_report.json'}")
    return 0


# -- generate ---------------------------------------------------------------------------------------
def _read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        text = args.prompt
    if text is None or not text.strip():
        raise UsageError("the prompt is empty; pass --prompt TEXT or --prompt-file FILE with some text")
    return text


def encode_prompt(tokenizer, text: str, chat: bool | None = None):
    """Token ids [1, T] of a user prompt, through the chat template when the tokenizer has one."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        msgs = [{"role": "user", "content": text}]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def run_generation(model, tokenizer, input_ids, cache, max_new_tokens: int, sample=False, temperature=1.0,
                   top_p=1.0, seed=0, stream=False):
    import torch
    from transformers import TextStreamer

    from .cache import prefill
    from .models import cache_kwarg

    torch.manual_seed(seed)
    if input_ids.shape[1] > 1:  # long prompts: chunked, so a compressing cache compresses between chunks
        prefill(model, cache, input_ids[:, :-1])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "streamer": streamer,
              "pad_token_id": tokenizer.pad_token_id, **cache_kwarg(model, cache)}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[0, input_ids.shape[1]:]


def cmd_generate(args) -> int:
    from .cache import CompressedCache, EchoKVCache
    from .models import kv_geometry

    text = _read_prompt(args)
    if args.mode in ("compressed", "auto") and not args.artifact:
        raise UsageError(f"--mode {args.mode} needs --artifact DIR (train one with `echokv train`)")
    if args.mode == "auto" and args.switch_at is None and args.memory_budget is None:
        raise UsageError("--mode auto needs --switch-at N (tokens) or --memory-budget BYTES")
    if args.artifact:
        from .artifact import read_config

        read_config(args.artifact)  # complete and well-formed, before the model loads
    model, tokenizer = _load(args)
    ids = encode_prompt(tokenizer, text, None if args.chat == "auto" else args.chat == "on")
    ctx = kv_geometry(model).max_context
    if ctx and ids.shape[1] + args.max_new_tokens > ctx:
        raise UsageError(
            f"the prompt has {ids.shape[1]} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds the "
            f"model's context of {ctx} tokens: shorten the prompt or ask for fewer tokens"
        )
    if args.artifact:
        cache = EchoKVCache(model, args.artifact, mode=args.mode, switch_at_tokens=args.switch_at,
                            memory_budget_bytes=args.memory_budget, full_window=args.full_window)
    else:
        from .baselines.base import _FullCache

        cache = _FullCache(model)
    assert isinstance(cache, CompressedCache)
    new = run_generation(model, tokenizer, ids, cache, args.max_new_tokens, args.sample, args.temperature,
                         args.top_p, args.seed, stream=not args.json)
    report = cache.memory_report()
    if args.json:
        print(json.dumps({
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "mode_at_end": report["mode"],
            "switched_at": report["switched_at"],
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": int(new.shape[0]),
            "cache_bytes": report["cache_bytes"],
            "full_cache_bytes": report["full_cache_bytes"],
            "kept_fraction": report["kept_fraction"],
        }))
    else:
        print(
            f"\n[{report['mode']} mode at end; cache {report['cache_bytes'] / 1e6:.2f} MB of "
            f"{report['full_cache_bytes'] / 1e6:.2f} MB full (kept {report['kept_fraction']:.3f})]",
            file=sys.stderr,
        )
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echokv", description="EchoKV KV-cache compression for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="KV geometry of a model")
    _model_arg(s)
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train a reconstructor (stage 1 + stage 2) and write an artifact")
    _model_arg(s)
    s.add_argument("--compression-ratio", type=_ratio, default=0.5, help="fraction of the KV cache removed (default 0.5)")
    s.add_argument("--k-ratio", type=_ratio, default=None, help="compression ratio of keys (default: --compression-ratio)")
    s.add_argument("--v-ratio", type=_ratio, default=None, help="compression ratio of values")
    s.add_argument("--layout", choices=["paper", "data"], default="data",
                   help="data (default): greedy choice of retained heads from calibration; "
                   "paper: first layer of each group + first m heads (loses answers on SmolLM2 at 0.5)")
    s.add_argument("--variant", choices=["hybrid", "echo"], default="hybrid",
                   help="hybrid (default, EchoKV-Hybrid): keys as a low-rank latent that commutes with RoPE, values "
                   "rebuilt by Echo; keys get 60%% of the kept budget unless --k-ratio/--v-ratio are given. "
                   "echo: rebuild discarded K and V heads (loses retrieval on SmolLM2 at 0.5, measured)")
    s.add_argument("--group-size", "-S", type=_positive, default=None, help="layers per group S (default: searched)")
    s.add_argument("--m", type=int, default=None, help="paper layout: heads kept in each non-first layer (default: searched)")
    s.add_argument("--inputs", choices=["global+local", "all", "global", "local"], default=None,
                   help="which retained heads feed a discarded one (paper: global+local)")
    s.add_argument("--calib-tokens", type=_positive, default=8192)
    s.add_argument("--seq-len", type=_positive, default=512)
    s.add_argument("--heldout-tokens", type=_positive, default=2048)
    s.add_argument("--steps", type=int, default=60, help="stage-2 steps (0: stage 1 only)")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--text", nargs="+", default=None, help="your own text files/folders instead of the bundled text")
    s.add_argument("--out", required=True, help="artifact folder to create")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="generate text with the full or the compressed cache")
    _model_arg(s)
    s.add_argument("--artifact", default=None, help="trained artifact folder (needed for compressed/auto)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    s.add_argument("--mode", choices=["full", "compressed", "auto"], default="full")
    s.add_argument("--switch-at", type=_positive, default=None, help="auto mode: compress from this many tokens")
    s.add_argument("--memory-budget", type=_positive, default=None, help="auto mode: compress above this many bytes")
    s.add_argument("--full-window", type=_non_negative, default=0, help="keep the last W tokens uncompressed")
    s.add_argument("--max-new-tokens", type=_positive, default=64)
    s.add_argument("--chat", choices=["auto", "on", "off"], default="auto", help="use the chat template")
    s.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("analyze", help="head-similarity analysis: JSON and heatmaps")
    _model_arg(s)
    s.add_argument("--calib-tokens", type=_positive, default=4096)
    s.add_argument("--seq-len", type=_positive, default=512)
    s.add_argument("--layers", default=None, help="range of layers to compare, e.g. 0-7 (default: all)")
    s.add_argument("--text", nargs="+", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_lazy("similarity", "cmd_analyze"))

    s = sub.add_parser("eval", help="evaluate methods side by side (quick, ruler, longbench, ppl)")
    _model_arg(s)
    s.add_argument("--suite", default="quick", choices=["quick", "ruler", "longbench", "ppl"])
    s.add_argument("--methods", default="full,echokv", help="comma-separated list, or 'all'")
    s.add_argument("--compression-ratios", default="0.5", help="comma-separated, e.g. 0.5,0.7")
    s.add_argument("--artifacts", nargs="+", default=None, help="echokv artifacts (matched by ratio)")
    s.add_argument("--data", default=None, help="LongBench folder of <task>.jsonl files")
    s.add_argument("--tasks", default=None, help="comma-separated task names (default: the suite's)")
    s.add_argument("--context-lengths", default=None, help="comma-separated token counts")
    s.add_argument("--samples", type=_positive, default=None, help="samples per task and length")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/eval")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_lazy("eval.runner", "cmd_eval"))

    s = sub.add_parser("bench", help="speed and memory: stock vs full vs compressed")
    _model_arg(s)
    s.add_argument("--artifact", required=True)
    s.add_argument("--contexts", default="512,2048,4096")
    s.add_argument("--decode-tokens", type=_positive, default=32)
    s.add_argument("--repeats", type=_positive, default=3)
    s.add_argument("--out", default="runs/bench")
    s.set_defaults(func=_lazy("bench", "cmd_bench"))

    s = sub.add_parser("demo", help="the main job: train at ratio 0.5, generate full vs compressed, compare")
    _model_arg(s)
    s.add_argument("--compression-ratio", type=_ratio, default=0.5)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--steps", type=int, default=60)
    s.set_defaults(func=_lazy("demo", "cmd_demo"))
    return p


def _lazy(module: str, func: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(f"echokv.{module}"), func)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    from .artifact import ArtifactError
    from .models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, ModelLoadError, ArtifactError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"echokv: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
