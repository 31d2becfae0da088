"""The GPU check of the Triton decode kernel (echokv.kernels.triton_decode): one run, a few minutes, no network.

1. Correctness against the PyTorch reference on CUDA: ragged batches (left padding, one fully masked row), int8,
   int4 and mixed classes, both head geometries, precise and fast modes.
2. A small tuning sweep (tokens per block, warps) at B = 16, T = 32K.
3. Timing with CUDA events (20 iterations after warm-up, median) at (B, T) in {1, 16} x {4096, 32768} for SmolLM2's
   geometry (H = 3, R = 3, d = 64) and Llama-3-8B's (H = 8, R = 4, d = 128), against bf16
   ``F.scaled_dot_product_attention`` with packed GQA (q as [B, H, R, d]), printed as ratios (kernel / SDPA: lower
   is faster) and written as JSON to ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set).

Needs torch with CUDA and triton; echokv is imported from this checkout's ``src``. Exit status: 0 checked (see the
"pass" lines), 1 a correctness failure, 2 no CUDA device (nothing checked). ``--smoke`` runs the same code paths on
CPU under TRITON_INTERPRET=1 with tiny sizes, to check this script without a GPU.

    python scripts/gpu_check.py [--out FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GEOMETRIES = {"smollm2": {"heads": 3, "rows": 3, "dim": 64}, "llama3-8b": {"heads": 8, "rows": 4, "dim": 128}}
SHAPES = [(1, 4096), (1, 32768), (16, 4096), (16, 32768)]
CONFIGS = [(64, 4), (64, 8), (128, 8), (32, 4)]  # (block_n, num_warps)
TARGETS = {"int8": 0.65, "int4": 0.45}  # fast.md 4.3: kernel / bf16 SDPA at B = 16, T = 32K
BUDGET_S = 240  # stop optional work past this, so one run stays within 5 minutes


def codecs(dim: int) -> dict:
    """Key/value classes per codec name (the same for keys and values)."""
    return {
        "int8": ((8, dim),),
        "int4": ((4, dim),),
        "mix": ((16, dim // 8), (8, 3 * dim // 8), (4, dim // 2)),
        "mix-chan": ((16, dim // 8), (8, 3 * dim // 8), (4, dim // 2)),  # keys per channel and block (EchoKV-Q)
    }


def quantize(x, width: int) -> dict:
    """x [..., n] float -> the stored tensors of one class of width 8 or 4 (any valid codes do for the check)."""
    import torch

    levels = 2**width - 1
    zero = x.amin(-1).half()
    scale = ((x.amax(-1) - zero.float()) / levels).clamp_min(1e-4).half()
    codes = ((x - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    if width == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {str(width): codes.contiguous(), f"{width}.s": scale, f"{width}.z": zero}


def make_store(batch: int, heads: int, tokens: int, widths, device, real: bool) -> dict:
    """A store in the reference layout; ``real``: quantized random data, else random codes (cheap, for timing).

    The 8/4-bit tensors are views into one buffer per class, as a growing cache holds them."""
    import torch

    store = {}
    for width, n in widths:
        if width == 16:
            store["16"] = torch.randn(batch, heads, tokens, n, device=device).to(torch.bfloat16)
            continue
        if real:
            store.update(quantize(torch.randn(batch, heads, tokens, n, device=device) * 2, width))
            continue
        cols = n * width // 8
        buf = torch.randint(0, 256, (batch, heads, tokens + 64, cols), dtype=torch.uint8, device=device)
        store[str(width)] = buf[:, :, :tokens]
        store[f"{width}.s"] = torch.rand(batch, heads, tokens, device=device).half() * 0.05
        store[f"{width}.z"] = -torch.rand(batch, heads, tokens, device=device).half()
    return store


def make_chan_store(batch: int, heads: int, tokens: int, widths, device, ref) -> dict:
    """Keys as EchoKV-Q stores them: quantized classes with a scale and zero per channel and block of 64 tokens."""
    import torch

    store = {}
    for width, n in widths:
        x = torch.randn(batch, heads, tokens, n, device=device) * 2
        store.update({"16": x.to(torch.bfloat16)} if width == 16 else ref.quantize_channels(x, width))
    return store


def ragged_mask(batch: int, tokens: int, device):
    """Left padding: sequence i keeps its last tokens - i * tokens / (batch + 1); the last sequence sees nothing."""
    import torch

    mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for i in range(batch - 1):
        mask[i, i * tokens // (batch + 1):] = True
    return mask


def correctness(td, ref, device, smoke: bool) -> list[dict]:
    """Max errors against the reference (float32 on the same device), per geometry, codec and mode."""
    import torch

    rows = []
    batch, tokens = (3, 40) if smoke else (5, 1500)
    for geo, g in GEOMETRIES.items():
        for name, widths in codecs(g["dim"]).items():
            torch.manual_seed(0)
            chan = name.endswith("-chan")
            k = (make_chan_store(batch, g["heads"], tokens, widths, device, ref) if chan else
                 make_store(batch, g["heads"], tokens, widths, device, real=True))
            v = make_store(batch, g["heads"], tokens, widths, device, real=True)
            q = torch.randn(batch, g["heads"], g["rows"], g["dim"], device=device) * g["dim"] ** -0.5
            mask = ragged_mask(batch, tokens, device)
            want_out, want_lse = ref.attend(q, k, v, widths, widths, mask)
            for precise, tol in ((True, 1e-4), (False, 5e-3)):
                out, lse = td.attend(q, k, v, widths, widths, mask, precise=precise)
                seen = torch.isfinite(want_lse)
                err_out = (out - want_out).abs().max().item()
                err_lse = (lse[seen] - want_lse[seen]).abs().max().item()
                empty_ok = bool((lse[~seen] == float("-inf")).all() and (out[~seen] == 0).all())
                scale = want_out.abs().max().item()
                ok = err_out <= tol * max(scale, 1.0) and err_lse <= tol * 10 and empty_ok
                rows.append({"geometry": geo, "codec": name, "precise": precise, "batch": batch, "tokens": tokens,
                             "max_err_out": err_out, "max_err_lse": err_lse, "out_scale": scale,
                             "empty_rows_ok": empty_ok, "ok": ok})
                print(f"correct {geo:9s} {name:4s} precise={precise!s:5s} out {err_out:.2e} (of {scale:.2f}) "
                      f"lse {err_lse:.2e} empty rows {'ok' if empty_ok else 'WRONG'}  {'ok' if ok else 'FAIL'}",
                      flush=True)
    return rows


def timer(device, smoke: bool):
    """time_it(fn) -> median milliseconds over 20 iterations after warm-up (CUDA events; perf_counter in smoke)."""
    import torch

    iters, warm = (2, 1) if smoke else (20, 5)

    def time_it(fn) -> float:
        for _ in range(warm):
            fn()
        times = []
        for _ in range(iters):
            if smoke:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return time_it


def inputs(batch, tokens, g, widths, device, smoke, chan=False, ref=None):
    """(q fp32, coded K, coded V, q/k/v bf16 for SDPA) of one timing shape; ``chan``: keys per channel and block."""
    import torch

    k = (make_chan_store(batch, g["heads"], tokens, widths, device, ref) if chan else
         make_store(batch, g["heads"], tokens, widths, device, real=smoke))
    v = make_store(batch, g["heads"], tokens, widths, device, real=smoke)
    q = torch.randn(batch, g["heads"], g["rows"], g["dim"], device=device) * g["dim"] ** -0.5
    return q, k, v


def sweep(td, ref, device, smoke, time_it, started) -> tuple[list[dict], dict]:
    """Kernel time per (block_n, num_warps) at the largest shape; the best config per (geometry, codec)."""
    rows, best = [], {}
    batch, tokens = (2, 40) if smoke else SHAPES[-1]
    for geo, g in GEOMETRIES.items():
        for name, widths in codecs(g["dim"]).items():
            chan = name.endswith("-chan")
            q, k, v = inputs(batch, tokens, g, widths, device, smoke, chan, ref)
            for block_n, warps in CONFIGS:
                if chan and block_n != td.BLOCK_N:  # per-channel key scales serve 64-token blocks
                    continue
                if time.time() - started > BUDGET_S / 2:
                    print("sweep: out of time, keeping the defaults for the rest", flush=True)
                    return rows, best
                ms = time_it(partial(td.attend, q, k, v, widths, widths, block_n=block_n, num_warps=warps))
                rows.append({"geometry": geo, "codec": name, "batch": batch, "tokens": tokens, "block_n": block_n,
                             "num_warps": warps, "ms": ms})
                print(f"sweep   {geo:9s} {name:4s} B={batch} T={tokens} block_n={block_n:3d} warps={warps} "
                      f"{ms * 1e3:9.1f} us", flush=True)
                if ms < best.get((geo, name), (None, float("inf")))[1]:
                    best[(geo, name)] = ((block_n, warps), ms)
            del q, k, v
    return rows, best


def timing(td, ref, device, smoke, time_it, started, best) -> list[dict]:
    """Kernel and bf16 SDPA (packed GQA) times per geometry, shape, codec and mode."""
    import torch
    import torch.nn.functional as F

    rows = []
    shapes = [(1, 40), (2, 64)] if smoke else SHAPES
    for geo, g in GEOMETRIES.items():
        for batch, tokens in shapes:
            if time.time() - started > BUDGET_S:
                print(f"timing: out of time before {geo} B={batch} T={tokens}", flush=True)
                return rows
            qh = torch.randn(batch, g["heads"], g["rows"], g["dim"], device=device, dtype=torch.bfloat16)
            kh = torch.randn(batch, g["heads"], tokens, g["dim"], device=device, dtype=torch.bfloat16)
            vh = torch.randn_like(kh)
            sdpa = time_it(partial(F.scaled_dot_product_attention, qh, kh, vh))
            del qh, kh, vh
            for name, widths in codecs(g["dim"]).items():
                q, k, v = inputs(batch, tokens, g, widths, device, smoke, name.endswith("-chan"), ref)
                (block_n, warps), _ = best.get((geo, name), ((td.BLOCK_N, 4), 0.0))
                for precise in (True, False):
                    ms = time_it(partial(td.attend, q, k, v, widths, widths, precise=precise, block_n=block_n,
                                         num_warps=warps))
                    rows.append({"geometry": geo, "batch": batch, "tokens": tokens, "codec": name, "precise": precise,
                                 "block_n": block_n, "num_warps": warps, "ms": ms, "sdpa_bf16_ms": sdpa,
                                 "ratio": ms / sdpa})
                del q, k, v
            print(f"timed   {geo:9s} B={batch:2d} T={tokens:5d} (sdpa {sdpa * 1e3:.1f} us)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """kernel / SDPA ratios: one line per geometry and shape, one column per codec and mode."""
    cols = sorted({(r["codec"], r["precise"]) for r in rows}, key=lambda c: (c[0], not c[1]))
    head = f"{'geometry':10s} {'B':>3s} {'T':>6s} {'sdpa us':>9s} " + " ".join(
        f"{c + ('' if p else '/fast'):>10s}" for c, p in cols)
    lines = [head, "-" * len(head)]
    keys = sorted({(r["geometry"], r["batch"], r["tokens"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for geo, batch, tokens in keys:
        cell = {(r["codec"], r["precise"]): r for r in rows if (r["geometry"], r["batch"], r["tokens"]) ==
                (geo, batch, tokens)}
        sdpa = next(iter(cell.values()))["sdpa_bf16_ms"]
        lines.append(f"{geo:10s} {batch:3d} {tokens:6d} {sdpa * 1e3:9.1f} " + " ".join(
            f"{cell[c]['ratio']:10.3f}" if c in cell else f"{'-':>10s}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON results (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny sizes (tests this script)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing checked", flush=True)
        return 2
    import triton

    from echokv.kernels import reference as ref
    from echokv.kernels import triton_decode as td

    device = torch.device("cpu" if args.smoke else "cuda")
    started = time.time()
    name = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke}
    out_path = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)

    def save():
        result["seconds"] = round(time.time() - started, 1)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(result, indent=1))

    try:
        result["correctness"] = correctness(td, ref, device, args.smoke)
        save()
        time_it = timer(device, args.smoke)
        result["sweep"], best = sweep(td, ref, device, args.smoke, time_it, started)
        result["best_config"] = {f"{g}/{c}": {"block_n": b, "num_warps": w} for (g, c), ((b, w), _) in best.items()}
        save()
        result["timing"] = timing(td, ref, device, args.smoke, time_it, started, best)
    except Exception as error:  # keep what was measured, and say what broke
        result["error"] = f"{type(error).__name__}: {error}"
        save()
        raise
    rows = result["timing"]
    print("\nkernel time / bf16 SDPA time (packed GQA); lower is faster\n" + table(rows))
    verdicts = {}
    for codec, target in TARGETS.items():
        at = [r["ratio"] for r in rows if r["codec"] == codec and r["precise"] and (r["batch"], r["tokens"]) ==
              SHAPES[-1]]
        if at:
            verdicts[codec] = {"target": target, "ratios": at, "ok": max(at) <= target}
            print(f"pass {codec}: ratio at B=16 T=32K {', '.join(f'{x:.3f}' for x in at)} "
                  f"(target <= {target}) {'PASS' if max(at) <= target else 'MISS'}")
    result["targets"] = verdicts
    correct = all(r["ok"] for r in result["correctness"])
    print(f"pass correctness: {'PASS' if correct else 'FAIL'}; {time.time() - started:.0f} s"
          + (f"; JSON: {out_path}" if out_path else ""))
    save()
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
