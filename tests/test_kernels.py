"""The decode-attention kernels against the PyTorch specification (echokv/kernels/reference.py): every class mix,
strided views into larger buffers, ragged masks, empty rows and splits, and the dispatcher's choices."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echokv import kernels
from echokv.kernels import cpu, reference

if cpu.compiler() is None:
    pytest.skip("no C++ compiler: the C++ kernel cannot be built", allow_module_level=True)
#: the kernel's fixed-point query on quantized key classes and softmax weights on quantized value classes (16 with
#: AVX512-VNNI or AVX2, else 0: float; the two differ only in builds made for A/B timings)
FIXED_POINT = cpu.load().fixed_point()
FIXED_POINT_V = cpu.load().fixed_point_values()


def _store(B, H, T, widths, dtype16=torch.bfloat16, seed=0, chan=False):
    """Random stored tensors for ``widths``, each a view into a larger buffer (more sequences, heads and tokens);
    ``chan``: scales and zeros per channel and block of tokens (keys), not per token."""
    g = torch.Generator().manual_seed(seed)
    store = {}
    for width, n in widths:
        if not n:
            continue
        last = n if width == 16 else n * width // 8
        key = str(width)
        if width == 16:
            buf = torch.randn(B + 2, H + 1, T + 37, last, generator=g).to(dtype16)
        else:
            buf = torch.randint(0, 2**width, (B + 2, H + 1, T + 37, last), generator=g, dtype=torch.uint8)
            if chan:
                rows = -(-T // reference.BLOCK)
                s = (torch.rand(B + 2, H + 1, rows + 3, n + 5, generator=g) * 0.04 + 0.005).half()
                z = (torch.randn(B + 2, H + 1, rows + 3, n + 5, generator=g) * 0.5).half()
                store[key + ".s"] = s[1 : B + 1, 1:, 2 : rows + 2, 3 : n + 3]
                store[key + ".z"] = z[1 : B + 1, 1:, 1 : rows + 1, 2 : n + 2]
            else:
                s = (torch.rand(B + 2, H + 1, T + 37, generator=g) * 0.04 + 0.005).half()
                z = (torch.randn(B + 2, H + 1, T + 37, generator=g) * 0.5).half()
                store[key + ".s"] = s[1 : B + 1, 1:, 5 : T + 5]
                store[key + ".z"] = z[1 : B + 1, 1:, 5 : T + 5]
        store[key] = buf[1 : B + 1, 1:, 5 : T + 5]
    return store


def _check(B=3, H=2, T=200, R=3, k_widths=((8, 64),), v_widths=None, dtype16=torch.bfloat16, mask="ragged",
           dq=64, seed=0, chan=False, **kw):
    v_widths = k_widths if v_widths is None else v_widths
    k = _store(B, H, T, k_widths, dtype16, seed, chan)
    v = _store(B, H, T, v_widths, dtype16, seed + 1)
    q = torch.randn(B, H, R, dq, generator=torch.Generator().manual_seed(seed + 2))
    m = None
    if mask == "ragged":  # left padding: sequence b starts at b * T // (B + 1)
        m = torch.arange(T)[None, :] >= (torch.arange(B) * T // (B + 1))[:, None]
    elif mask is not None:
        m = mask
    want_out, want_lse = reference.attend(q, k, v, k_widths, v_widths, m, fixed_point=FIXED_POINT,
                                           fixed_point_values=FIXED_POINT_V)
    if "splits" in kw:
        kt, km = kernels._classes(k, k_widths)
        vt, vm = kernels._classes(v, v_widths)
        out, lse = cpu.load().attend(q, kt, km, vt, vm, m, kw["splits"])
    else:
        out, lse = kernels.attend(q, k, v, k_widths, v_widths, m, kernel="cpp")
    scale = want_out.abs().max().clamp_min(1e-3)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4 * scale.item())
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    return out, lse


MIXES = {
    "16": (((16, 64),), None),
    "8": (((8, 64),), None),
    "4": (((4, 64),), None),
    "16+8+4": (((16, 4), (8, 40), (4, 16)), ((16, 8), (8, 24), (4, 32))),
    "8+4": (((8, 32), (4, 32)), None),
    "values-other-classes": (((16, 16), (8, 48)), ((4, 64),)),
    "nv-ne-nk": (((8, 40),), ((16, 6), (4, 10))),
    "odd-tails": (((16, 3), (8, 5), (4, 18)), ((8, 17), (4, 46), (16, 35))),
    "order-4-8-16": (((4, 32), (8, 16), (16, 16)), None),
    "wide-128": (((8, 128),), ((4, 96), (16, 32))),
    "2": (((2, 64),), None),
    "8+4+2": (((8, 24), (4, 16), (2, 24)), ((8, 8), (4, 32), (2, 24))),
    "2-odd-tails": (((16, 3), (2, 12), (4, 18)), ((2, 4), (8, 17), (4, 8))),
    "2-wide-160": (((2, 160),), ((4, 32), (2, 128))),
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_class_mixes_match_reference(mix):
    k_widths, v_widths = MIXES[mix]
    _check(k_widths=k_widths, v_widths=v_widths, dq=max(64, reference.kept(k_widths)))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130, 1000])
@pytest.mark.parametrize("R", [1, 3, 12])
def test_lengths_and_rows(T, R):
    _check(B=1, H=3, T=T, R=R, k_widths=((16, 8), (8, 24), (4, 32)), mask=None, seed=T + R)


@pytest.mark.parametrize("dtype16", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3])
def test_16bit_dtypes_and_batches(dtype16, B):
    _check(B=B, T=150, k_widths=((16, 32), (4, 32)), v_widths=((16, 48), (8, 16)), dtype16=dtype16)


def test_many_rows_and_wider_query():
    """48 query rows (a short prefill), q wider than the kept key channels."""
    _check(B=2, H=1, T=300, R=48, k_widths=((8, 40),), v_widths=((4, 64),), dq=80)


def test_all_masked_rows_give_zero_and_minus_inf():
    B, T = 3, 130
    m = torch.ones(B, T, dtype=torch.bool)
    m[1] = False  # sequence 1 sees nothing
    m[2, :70] = False
    out, lse = _check(B=B, T=T, mask=m, k_widths=((8, 32), (4, 32)))
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert torch.isfinite(lse[[0, 2]]).all()


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_explicit_splits_including_empty_ones(splits):
    """More splits than 64-token blocks leaves some splits empty; the merge must ignore them."""
    _check(B=2, H=3, T=70, k_widths=((16, 8), (8, 24), (4, 32)), splits=splits)


def test_no_mask_equals_all_true_mask():
    out1, lse1 = _check(B=2, T=90, mask=None)
    out2, lse2 = _check(B=2, T=90, mask=torch.ones(2, 90, dtype=torch.bool))
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(lse1, lse2)


def test_views_are_not_copied():
    """The stored tensors are read in place: a view into a larger buffer sees later writes to that buffer."""
    buf = torch.randint(0, 256, (1, 1, 100, 64), dtype=torch.uint8)
    s, z = torch.full((1, 1, 100), 0.01).half(), torch.zeros(1, 1, 100).half()
    store = {"8": buf[:, :, :50], "8.s": s[:, :, :50], "8.z": z[:, :, :50]}
    q = torch.randn(1, 1, 3, 64)
    before, _ = kernels.attend(q, store, store, ((8, 64),), ((8, 64),), kernel="cpp")
    buf[:, :, :50] = 0
    after, _ = kernels.attend(q, store, store, ((8, 64),), ((8, 64),), kernel="cpp")
    assert before.abs().sum() > 0 and (after == 0).all()


def test_dispatcher_paths(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.path("cpp") == "cpp"
    assert kernels.path("auto") == "cpp"
    assert kernels.path("torch") == "torch"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.path("auto") == "torch"
    called = []
    real = reference.attend
    monkeypatch.setattr(reference, "attend", lambda *a, **k: called.append(1) or real(*a, **k))
    q = torch.randn(1, 1, 3, 64)
    store = _store(1, 1, 10, ((8, 64),))
    kernels.attend(q, store, store, ((8, 64),), ((8, 64),))
    assert called == [1]
    with pytest.raises(ValueError):
        kernels.attend(q, store, store, ((8, 64),), ((8, 64),), kernel="nonsense")
    monkeypatch.setenv(kernels.ENV, "nonsense")
    with pytest.raises(ValueError):
        kernels.path("auto")


def test_forced_cpp_refuses_other_devices_and_failed_builds(monkeypatch, caplog):
    monkeypatch.delenv(kernels.ENV, raising=False)
    with pytest.raises(RuntimeError, match="CPU tensors"):
        kernels.path("cpp", device="meta")
    monkeypatch.setattr(cpu, "available", lambda: (False, "the C++ kernel did not build (test)"))
    with pytest.raises(RuntimeError, match="did not build"):
        kernels.path("cpp")
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="echokv"):
        assert kernels.path("auto") == "torch"
        assert kernels.path("auto") == "torch"
    lines = [r.getMessage() for r in caplog.records if "PyTorch path" in r.getMessage()]
    assert len(lines) == 1 and "did not build (test)" in lines[0]


# -- the stored tokens merged with exact ones (attend_merged) ---------------------------------------------------------
def _exact(B, H, Te, d, dtype, seed):
    """Exact keys and values [B, H, Te, d] in ``dtype``, views into larger buffers (strided on every axis but the
    last)."""
    g = torch.Generator().manual_seed(seed)
    kbuf = torch.randn(B + 1, H + 2, Te + 9, d + 16, generator=g).to(dtype)
    vbuf = torch.randn(B + 1, H + 2, Te + 9, d + 16, generator=g).to(dtype)
    return kbuf[1:, 2:, 4 : Te + 4, 8 : d + 8], vbuf[1:, 2:, 3 : Te + 3, :d]


def _check_merged(B=2, H=2, T=200, R=3, Te=5, d=64, k_widths=((8, 40), (4, 24)), v_widths=((8, 64),),
                  mask="ragged", exact_mask="ragged", exact_dtype=torch.bfloat16, dtype16=torch.bfloat16, seed=0,
                  peaked=1.0, chan=False):
    v_widths = k_widths if v_widths is None else v_widths
    k = _store(B, H, T, k_widths, dtype16, seed, chan)
    v = _store(B, H, T, v_widths, dtype16, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    nk, nv = reference.kept(k_widths), reference.kept(v_widths)
    q_basis = torch.randn(B, H, R, max(nk, 1), generator=g) * peaked
    q_exact = torch.randn(B, H, R, d, generator=g) * 0.2 * peaked
    mean_score = torch.randn(B, H, R, generator=g)
    v_dec = torch.randn(H, nv, d, generator=g) * 0.3
    v_mean = torch.randn(H, d, generator=g)
    ek, ev = _exact(B, H, Te, d, exact_dtype, seed + 3)
    m = None
    if isinstance(mask, str) and mask == "ragged":
        m = torch.arange(T)[None, :] >= (torch.arange(B) * T // (B + 1))[:, None]
    elif mask is not None:
        m = mask
    em = None
    if isinstance(exact_mask, str) and exact_mask == "ragged":  # sequence b misses its first b exact tokens
        em = torch.arange(Te)[None, :] >= torch.arange(B)[:, None]
    elif exact_mask is not None:
        em = exact_mask
    want = reference.attend_merged(q_basis, q_exact, mean_score, k, v, k_widths, v_widths, m, ek, ev, em, v_dec,
                                   v_mean, fixed_point=FIXED_POINT, fixed_point_values=FIXED_POINT_V)
    got = kernels.attend_merged(q_basis, q_exact, mean_score, k, v, k_widths, v_widths, m, ek, ev, em, v_dec, v_mean,
                                kernel="cpp")
    args = kernels.prepared(k, v, k_widths, v_widths)
    got2 = kernels.attend_merged_prepared(q_basis, q_exact, mean_score, args, m, ek, ev, em, v_dec, v_mean)
    assert got.shape == (B, H, R, d) and got.dtype == torch.float32
    scale = want.abs().max().clamp_min(1e-3).item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    return got, want


@pytest.mark.parametrize("mix", list(MIXES))
def test_merged_class_mixes_match_reference(mix):
    k_widths, v_widths = MIXES[mix]
    _check_merged(k_widths=k_widths, v_widths=v_widths)


@pytest.mark.parametrize("Te", [0, 1, 5, 63])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("exact_dtype", [torch.bfloat16, torch.float32])
def test_merged_exact_lengths_batches_rows_dtypes(Te, B, R, exact_dtype):
    _check_merged(B=B, R=R, Te=Te, T=130, exact_dtype=exact_dtype, seed=Te + 7 * B + R)


@pytest.mark.parametrize("d", [48, 64, 80, 128])
def test_merged_head_dims_and_float16_exact(d):
    _check_merged(d=d, Te=17, exact_dtype=torch.float16, k_widths=((16, 8), (8, 24), (4, 32)),
                  v_widths=((16, 6), (4, 10)))


@pytest.mark.parametrize("mask", [None, "ragged"])
@pytest.mark.parametrize("exact_mask", [None, "ragged", "per-row"])
def test_merged_masks(mask, exact_mask):
    B, R, Te = 3, 3, 6
    if exact_mask == "per-row":  # a causal window: row r sees the exact tokens up to Te - R + r
        exact_mask = (torch.arange(Te)[None, :] <= torch.arange(R)[:, None] + Te - R)[None].expand(B, R, Te)
    _check_merged(B=B, R=R, Te=Te, mask=mask, exact_mask=exact_mask)


def test_merged_rows_seeing_nothing():
    """Sequence 1 sees no stored token (only exact ones), sequence 2 nothing at all (0), sequence 0 every token;
    a peaked query stresses the merge."""
    B, T, Te = 3, 130, 4
    m = torch.ones(B, T, dtype=torch.bool)
    m[1] = False
    m[2] = False
    em = torch.ones(B, Te, dtype=torch.bool)
    em[2] = False
    got, _ = _check_merged(B=B, T=T, Te=Te, mask=m, exact_mask=em, peaked=4.0)
    assert (got[2] == 0).all() and got[[0, 1]].abs().sum() > 0
    # sequence 1: the exact tokens alone
    got0, _ = _check_merged(B=B, T=T, Te=0, mask=m, exact_mask=None)
    assert (got0[[1, 2]] == 0).all()


def test_merged_equals_attend_then_pytorch_epilogue():
    """The fused call equals attend() followed by the epilogue written out in PyTorch (log-sum-exp merge)."""
    B, H, R, T, Te, d = 1, 3, 3, 300, 9, 64
    kw, vw = ((8, 40), (4, 24)), ((8, 64),)
    k, v = _store(B, H, T, kw, seed=5), _store(B, H, T, vw, seed=6)
    g = torch.Generator().manual_seed(7)
    qs = torch.randn(B, H, R, d, generator=g) * 0.3
    ku, km = torch.randn(H, d, 64, generator=g), torch.randn(H, d, 1, generator=g) * 0.1
    vu, vm = torch.randn(H, 64, d, generator=g) * 0.3, torch.randn(H, 1, d, generator=g)
    ek, ev = _exact(B, H, Te, d, torch.bfloat16, 8)
    out, lse = kernels.attend(qs @ ku, k, v, kw, vw, kernel="cpp")
    recent = qs @ ek.transpose(-1, -2).float()
    p = torch.softmax(torch.cat([(qs @ km).add_(lse[..., None]), recent], dim=-1), dim=-1)
    want = (out @ vu).add_(vm).mul_(p[..., :1]).add_(p[..., 1:] @ ev.float())
    got = kernels.attend_merged(qs @ ku, qs, qs @ km, k, v, kw, vw, None, ek, ev, None, vu, vm, kernel="cpp")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_merged_torch_path_and_bad_shapes():
    B, H, R, T, Te, d = 1, 2, 1, 40, 3, 64
    kw = ((8, 64),)
    k, v = _store(B, H, T, kw), _store(B, H, T, kw, seed=1)
    q = torch.randn(B, H, R, 64)
    ek, ev = _exact(B, H, Te, d, torch.float32, 2)
    vd, vm = torch.randn(H, 64, d), torch.randn(H, d)
    a = kernels.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek, ev, None, vd, vm, kernel="torch")
    b = kernels.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek, ev, None, vd, vm, kernel="cpp")
    # the torch path is the float specification; the C++ kernel's reads the codes in fixed point where it does
    want = reference.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek, ev, None, vd, vm,
                                   fixed_point=FIXED_POINT, fixed_point_values=FIXED_POINT_V)
    torch.testing.assert_close(a, reference.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek, ev, None, vd, vm))
    torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="v_dec"):
        kernels.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek, ev, None, vd[:, :10], vm, kernel="cpp")
    with pytest.raises(RuntimeError, match="exact_k"):
        kernels.attend_merged(q, q, q[..., 0], k, v, kw, kw, None, ek[..., :32], ev, None, vd, vm, kernel="cpp")


# -- keys with a scale and zero per channel and block of 64 tokens (KIVI's layout) ------------------------------
@pytest.mark.parametrize("mix", list(MIXES))
def test_per_channel_key_scales_match_reference(mix):
    k_widths, v_widths = MIXES[mix]
    _check(k_widths=k_widths, v_widths=v_widths, dq=max(64, reference.kept(k_widths)), chan=True)
    _check_merged(k_widths=k_widths, v_widths=v_widths, d=64, chan=True)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 300])
@pytest.mark.parametrize("splits", [None, 3, 7])
def test_per_channel_key_scales_lengths_and_splits(T, splits):
    kw = {} if splits is None else {"splits": splits}
    _check(B=2, H=3, T=T, k_widths=((16, 8), (8, 24), (4, 32)), v_widths=((8, 64),), chan=True, seed=T, **kw)


def test_per_channel_scales_are_refused_for_values():
    v = _store(1, 1, 70, ((8, 64),), chan=True)
    k = _store(1, 1, 70, ((8, 64),))
    with pytest.raises(RuntimeError, match="per channel only for keys"):
        kernels.attend(torch.randn(1, 1, 2, 64), k, v, ((8, 64),), ((8, 64),), kernel="cpp")


def test_quantize_channels_round_trips_within_half_a_step_and_skips_sinks():
    x = torch.randn(2, 3, 150, 16, generator=torch.Generator().manual_seed(0))
    x[..., :2, :] *= 50  # sinks: far out of range, not counted in block 0's range
    st = reference.quantize_channels(x, 4, skip=2)
    assert st["4.s"].shape == (2, 3, 3, 16) and st["4"].shape == (2, 3, 150, 8)
    back = reference.dequantize(st, ((4, 16),))
    step = st["4.s"].float().repeat_interleave(64, dim=-2)[..., :150, :]
    assert ((back - x)[..., 2:, :].abs() <= step[..., 2:, :] / 2 + 1e-3).all()
    assert st["4.s"][..., 0, :].float().max() < 5  # the sinks did not widen block 0


#: -march values that select each x86 path of the kernel, the name it reports, and the CPU flags it needs to run
TIERS = {"x86-64-v3": ("avx2", {"avx2", "fma", "f16c", "bmi2"}), "x86-64": ("portable", set())}


def test_instructions_name_what_the_cpp_kernel_runs():
    assert kernels.instructions("torch") is None
    assert kernels.instructions("cpp") in ("avx512-vnni", "avx512", "avx2", "portable")
    assert (kernels.instructions("cpp") in ("avx512-vnni", "avx2")) == (FIXED_POINT == 16)
    assert (kernels.instructions("cpp") in ("avx512-vnni", "avx2")) == (FIXED_POINT_V == 16)
    arch = os.environ.get(cpu.ARCH_ENV)
    if arch in TIERS:  # a rerun of this file by the test below: the build is the path asked for
        assert kernels.instructions("cpp") == TIERS[arch][0]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or bool(os.environ.get(cpu.ARCH_ENV)),
                    reason="x86 only, and not inside the rerun itself")
@pytest.mark.parametrize("arch", list(TIERS))
def test_every_instruction_set_path_matches_the_reference(arch):
    """This file again on a build for another x86 level (a user's CPU may lack what this one has): the AVX2 path
    on an AVX-512 machine, the plain C++ path everywhere."""
    name, needs = TIERS[arch]
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run {arch} code")
    if kernels.instructions("cpp") == name:
        pytest.skip(f"the default build is the {name} path, tested by the rest of this file")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         env={**os.environ, cpu.ARCH_ENV: arch}, capture_output=True, text=True, timeout=1200,
                         check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Ts,Tr,masked", [(4, 5, False), (4, 5, True), (0, 7, True), (3, 0, False)])
def test_step_equals_merged_on_the_folded_query(q_dtype, Ts, Tr, masked):
    """attend_step folds q into the key basis and mean and reads the sinks as a segment of their own: the same as
    attend_merged on those tensors built in PyTorch, with the sinks concatenated before the recent tokens."""
    B, H, R, d, T = 2, 3, 3, 64, 150
    k_widths, v_widths = ((8, 40), (4, 16)), ((8, 64),)
    k = _store(B, H, T, k_widths, chan=True)
    v = _store(B, H, T, v_widths, seed=1)
    g = torch.Generator().manual_seed(5)
    nk = reference.kept(k_widths)
    q = (torch.randn(B, H * R, 1, d, generator=g) * 2).to(q_dtype).transpose(1, 2)  # the model's [B, 1, Hq, d] view
    q = q.reshape(B, H, R, d)
    scaling = d**-0.5
    k_basis = torch.randn(H, d, nk, generator=g) * 0.3
    k_mean = torch.randn(H, d, generator=g) * 0.1
    v_dec, v_mean = torch.randn(H, 64, d, generator=g) * 0.3, torch.randn(H, d, generator=g)
    sk, sv = _exact(B, H, Ts, d, torch.bfloat16, 7)
    rk, rv = _exact(B, H, Tr, d, torch.bfloat16, 8)
    mask = torch.arange(T)[None, :] >= torch.tensor([0, 40])[:, None] if masked else None
    exact_mask = torch.rand(B, Ts + Tr, generator=g) > 0.3 if masked else None
    args = kernels.prepared(k, v, k_widths, v_widths)
    got = kernels.attend_step(q, scaling, k_basis, k_mean, args, mask, sk if Ts else None, sv if Ts else None, rk,
                              rv, exact_mask, v_dec, v_mean)
    qs = q.float() * scaling
    want = kernels.attend_merged_prepared(qs @ k_basis, qs, (qs * k_mean[:, None]).sum(-1), args, mask,
                                          torch.cat([sk, rk], dim=-2), torch.cat([sv, rv], dim=-2), exact_mask,
                                          v_dec, v_mean)
    assert got.dtype == q_dtype and got.shape == (B, H, R, d)
    tol = 1e-4 if q_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.to(q_dtype).float(), rtol=tol, atol=tol * want.abs().max().item())


def test_step_refuses_bad_bases():
    B, H, R, d = 1, 2, 3, 64
    k = _store(B, H, 64, ((8, 64),), chan=True)
    args = kernels.prepared(k, k, ((8, 64),), ((8, 64),))
    q = torch.randn(B, H, R, d)
    ek, ev = _exact(B, H, 2, d, torch.bfloat16, 1)
    with pytest.raises(RuntimeError, match="k_basis must be"):
        kernels.attend_step(q, 0.125, torch.randn(H + 1, d, 64), torch.randn(H, d), args, None, None, None, ek, ev,
                            None, torch.randn(H, 64, d), torch.randn(H, d))
    with pytest.raises(RuntimeError, match="sink_k and sink_v must be"):
        kernels.attend_step(q, 0.125, torch.randn(H, d, 64), torch.randn(H, d), args, None, ek[:, :, :1, :32],
                            ev[:, :, :1, :32], ek, ev, None, torch.randn(H, 64, d), torch.randn(H, d))


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_full_step_equals_one_16bit_class(q_dtype):
    B, H, R, d, T = 2, 3, 3, 64, 130
    kv = _store(B, H, T, ((16, 64),))
    vv = _store(B, H, T, ((16, 64),), seed=1)
    q = torch.randn(B, H, R, d, generator=torch.Generator().manual_seed(3)).to(q_dtype)
    mask = torch.arange(T)[None, :] >= torch.tensor([0, 17])[:, None]
    got = cpu.load().attend_full(q, 0.125, kv["16"], vv["16"], mask)
    want, _ = kernels.attend(q.float() * 0.125, kv, vv, ((16, 64),), ((16, 64),), mask, kernel="cpp")
    assert got.dtype == q_dtype
    torch.testing.assert_close(got, want.to(q_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("width", [8, 4, 2])
@pytest.mark.parametrize("T,skip", [(64, 0), (64, 4), (70, 4), (5, 2), (130, 70), (3, 5)])
def test_cpp_encoding_equals_the_reference_bit_for_bit(width, T, skip):
    g = torch.Generator().manual_seed(T + width)
    z = torch.randn(2, 3, T, 40, generator=g) * torch.logspace(-3, 5, 40)  # tiny to past float16's range
    z[0, 1, :, :8] = 0.25  # constant channels and rows: scale 0 -> 1
    z[1, 2, min(2, T - 1)] = -7.0
    part = z[..., 4:36]  # a view, as the codec's classes are
    for per_channel in (True, False):
        want = (reference.quantize_channels(part, width, skip=skip) if per_channel
                else reference.quantize_class(part, width))
        got = kernels.quantize(part, width, per_channel, skip=skip, cpp=True)
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert torch.equal(got[key], want[key]), (key, per_channel)
