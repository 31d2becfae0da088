"""A/B of two builds of the C++ decode kernel, interleaved call by call: the default build against one made with
extra compiler flags (for example ``-DECHOKV_FLOAT_KEYS`` or ``-DECHOKV_FLOAT_VALUES``, which keep an AVX2 build on
the float paths), on SmolLM2's EchoKV-Q layouts at 2064 tokens (0.5: keys 8:40 + 4:24 per channel, values 8:64;
0.75: keys 4:32 + 2:24, values 4:64), int8 and bf16.

    flock /tmp/echokv-timing.lock .venv/bin/python scripts/kernel_ab.py --flags=-DECHOKV_FLOAT_KEYS [--calls 300]

``--source`` builds B from another file (say the last commit's: ``git show HEAD:src/echokv/kernels/csrc/
decode_attention.cpp > /tmp/old.cpp``); ``--sinks 4`` masks the first tokens off the codes, as EchoKV-Q's cache
does (its sinks are read from exact copies).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernel import coded

from echokv import kernels
from echokv.kernels import cpu

CASES = {"q0.5": (((8, 40), (4, 24)), ((8, 64),)), "q0.75": (((4, 32), (2, 24)), ((4, 64),)),
         "int8": (((8, 64),), ((8, 64),)), "bf16": (((16, 64),), ((16, 64),))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flags", default="", help="extra compiler flags of build B, one string (--flags=-DX)")
    ap.add_argument("--source", default=None, help="build B from this C++ file (default: the library's)")
    ap.add_argument("--sinks", type=int, default=0, help="mask this many first tokens, as the cache's sinks")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8000])
    args = ap.parse_args()
    from torch.utils import cpp_extension

    torch.set_num_threads(args.threads)
    a = cpu.load()
    if not args.flags and not args.source:
        ap.error("give --flags or --source (else B is A)")
    b = cpp_extension.load(name="echokv_decode_attention_b", sources=[args.source or str(cpu.SOURCE)],
                           extra_cflags=cpu.cflags() + args.flags.split(), extra_ldflags=["-fopenmp"],
                           build_directory=tempfile.mkdtemp(prefix="echokv-ab-"), verbose=False)
    print(f"A: default ({a.simd()}, fixed point {a.fixed_point()}/{a.fixed_point_values()}); "
          f"B: {args.source or 'same source'} {args.flags} "
          f"({b.simd()}, fixed point {b.fixed_point()}/{b.fixed_point_values()}); {args.threads} threads, "
          f"32 MB written between calls")
    flush = torch.ones(32 << 18)
    for T in args.T:
        g = torch.Generator().manual_seed(0)
        k = torch.randn(1, 3, T, 64, generator=g) * torch.linspace(0.2, 4, 64)
        v = torch.randn(1, 3, T, 64, generator=g)
        q = torch.randn(1, 3, 3, 64, generator=g) * 0.125
        mask = None
        if args.sinks:
            mask = torch.ones(1, T, dtype=torch.bool)
            mask[:, : args.sinks] = False
        for name, (kw, vw) in CASES.items():
            kt, km = kernels._classes(coded(k, kw, 256, chan=True), kw)
            vt, vm = kernels._classes(coded(v, vw, 256), vw)
            times = {"A": [], "B": []}
            for i in range(args.calls):
                for label, mod in (("A", a), ("B", b)) if i % 2 else (("B", b), ("A", a)):
                    flush.add_(1.0)
                    start = time.perf_counter()
                    mod.attend(q, kt, km, vt, vm, mask)
                    times[label].append(time.perf_counter() - start)
            ta, tb = (statistics.median(times[x]) * 1e6 for x in "AB")
            print(f"T={T:5d} {name:6s} A {ta:7.1f} us  B {tb:7.1f} us  B/A time {tb / ta:.3f}")


if __name__ == "__main__":
    main()
