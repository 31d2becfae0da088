"""Micro benchmark of one decode-attention call (one layer, SmolLM2-135M geometry by default): the C++ kernel over
coded K/V against bfloat16 full attention, interleaved, as medians of per-round speed ratios.

    flock /tmp/echokv-timing.lock .venv/bin/python scripts/bench_kernel.py [--threads 2] [--rounds 15] [--flush 32]

Baselines: (a) packed-GQA bf16 SDPA, q viewed as [B, H, R, d] (no enable_gqa), K/V bf16 [B, H, T, d]; (b) explicit
bf16 ``q @ k^T`` -> float softmax -> ``p @ v``. Kernel variants: int8 (all channels at 8 bit), int4, int2, mixed class
sets (int2 classes included), and bf16 codes (the kernel at 16 bit). The kernel reads views into buffers with room for more tokens, as a
growing cache does. Speed = t(packed bf16 SDPA) / t(x): above 1 is faster than the packed baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv import kernels
from echokv.kernels import cpu
from echokv.kernels.reference import quantize_channels, quantize_class

MIXES = {
    "int8": ((8, 64),),
    "int4": ((4, 64),),
    "int2": ((2, 64),),
    "mix 16:4,8:40,4:16": ((16, 4), (8, 40), (4, 16)),
    "mix 8:8,4:24,2:24": ((8, 8), (4, 24), (2, 24)),
    "bf16 (kernel)": ((16, 64),),
}
#: the same classes with keys scaled per channel and 64-token block (EchoKV-Q's keys)
CHAN = ("int8", "int4", "int2", "mix 16:4,8:40,4:16", "mix 8:8,4:24,2:24")


def coded(x: torch.Tensor, widths, room: int, chan: bool = False) -> dict[str, torch.Tensor]:
    """x [B, H, T, d] float -> the stored tensors of ``widths``, as views into buffers of T + room tokens (rows);
    ``chan``: scales per channel and block of tokens."""
    store, off = {}, 0
    for width, n in widths:
        part = x[..., off : off + n]
        off += n
        quantize = quantize_channels if chan else quantize_class
        parts = {"16": part.bfloat16()} if width == 16 else quantize(part, width)
        for key, val in parts.items():
            rows = val.shape[2]
            buf = val.new_zeros(*val.shape[:2], rows + room, *val.shape[3:])
            buf[:, :, :rows] = val
            store[key] = buf[:, :, :rows]
    return store


#: with --flush: a buffer written between timed calls, so that each call finds its K/V out of L2, as between the
#: layers of a model (whose weights pass through the caches in between)
FLUSH: torch.Tensor | None = None


def timeit(fn, calls: int) -> float:
    if FLUSH is None:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls
    spent = 0.0
    for _ in range(calls):
        FLUSH.add_(1.0)
        t = time.perf_counter()
        fn()
        spent += time.perf_counter() - t
    return spent / calls


def bench(B: int, T: int, H: int, R: int, d: int, rounds: int, budget: float) -> dict[str, tuple[float, float]]:
    """{variant: (median seconds per call, median per-round speed vs packed SDPA)}."""
    g = torch.Generator().manual_seed(0)
    # keys with outlier-ish channels, as real keys have
    k = torch.randn(B, H, T, d, generator=g) * torch.linspace(0.2, 4, d)
    v = torch.randn(B, H, T, d, generator=g)
    q = torch.randn(B, H, R, d, generator=g) * d**-0.5
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def explicit():
        p = torch.softmax((qb @ kb.transpose(-1, -2)).float(), dim=-1)
        return p.bfloat16() @ vb

    fns = {"packed bf16 SDPA": lambda: sdpa(qb, kb, vb), "explicit bf16 matmul": explicit}
    for name, widths in MIXES.items():
        ks, vs = coded(k, widths, 256), coded(v, widths, 256)
        fns[name] = lambda ks=ks, vs=vs, w=widths: kernels.attend(q, ks, vs, w, w, kernel="cpp")
        if name in CHAN:
            kc = coded(k, widths, 256, chan=True)
            fns[name + ", keys per channel"] = lambda kc=kc, vs=vs, w=widths: kernels.attend(q, kc, vs, w, w,
                                                                                             kernel="cpp")
    calls = {}
    for name, fn in fns.items():  # warm up, then size each variant's loop to ~budget seconds
        fn()
        calls[name] = max(1, int(budget / max(timeit(fn, 3), 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timeit(fn, calls[name]))
    base = times["packed bf16 SDPA"]
    return {name: (statistics.median(ts), statistics.median(b / t for b, t in zip(base, ts, strict=True)))
            for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=0.01, help="seconds per variant per round")
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--B", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--heads", type=int, default=3, help="KV heads")
    ap.add_argument("--rows", type=int, default=3, help="query rows per KV head (the GQA group)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--flush", type=int, default=0, metavar="MB",
                    help="write a buffer of MB megabytes between timed calls (evicts L2; 0: calls back to back)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global FLUSH
    FLUSH = torch.ones(args.flush * (1 << 18)) if args.flush else None
    t0 = time.perf_counter()
    mod = cpu.load()
    print(f"kernel path: {kernels.path('auto')} ({mod.simd()}), load {time.perf_counter() - t0:.1f} s; "
          f"torch {torch.__version__}, {args.threads} threads, H={args.heads} R={args.rows} d={args.dim}, "
          f"{args.rounds} rounds" + (f", {args.flush} MB written between calls" if args.flush else ""))
    print("speed = t(packed bf16 SDPA) / t(x), median of per-round ratios; time = median per call")
    # other processes on the cores distort multi-thread timings (a descheduled thread stalls the whole call)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    header = f"{'B':>2} {'T':>5}  {'variant':<22} {'time us':>9} {'speed':>7}"
    print(header)
    print("-" * len(header))
    for B in args.B:
        for T in args.T:
            res = bench(B, T, args.heads, args.rows, args.dim, args.rounds, args.budget)
            for name, (sec, speed) in res.items():
                print(f"{B:>2} {T:>5}  {name:<22} {sec * 1e6:>9.1f} {speed:>7.2f}")
            print()
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
