"""The decode-attention kernels against the PyTorch specification (echokv/kernels/reference.py): every class mix,
strided views into larger buffers, ragged masks, empty rows and splits, and the dispatcher's choices."""

from __future__ import annotations

import logging

import pytest
import torch

from echokv import kernels
from echokv.kernels import cpu, reference

if cpu.compiler() is None:
    pytest.skip("no C++ compiler: the C++ kernel cannot be built", allow_module_level=True)


def _store(B, H, T, widths, dtype16=torch.bfloat16, seed=0):
    """Random stored tensors for ``widths``, each a view into a larger buffer (more sequences, heads and tokens)."""
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
            s = (torch.rand(B + 2, H + 1, T + 37, generator=g) * 0.04 + 0.005).half()
            z = (torch.randn(B + 2, H + 1, T + 37, generator=g) * 0.5).half()
            store[key + ".s"] = s[1 : B + 1, 1:, 5 : T + 5]
            store[key + ".z"] = z[1 : B + 1, 1:, 5 : T + 5]
        store[key] = buf[1 : B + 1, 1:, 5 : T + 5]
    return store


def _check(B=3, H=2, T=200, R=3, k_widths=((8, 64),), v_widths=None, dtype16=torch.bfloat16, mask="ragged",
           dq=64, seed=0, **kw):
    v_widths = k_widths if v_widths is None else v_widths
    k = _store(B, H, T, k_widths, dtype16, seed)
    v = _store(B, H, T, v_widths, dtype16, seed + 1)
    q = torch.randn(B, H, R, dq, generator=torch.Generator().manual_seed(seed + 2))
    m = None
    if mask == "ragged":  # left padding: sequence b starts at b * T // (B + 1)
        m = torch.arange(T)[None, :] >= (torch.arange(B) * T // (B + 1))[:, None]
    elif mask is not None:
        m = mask
    want_out, want_lse = reference.attend(q, k, v, k_widths, v_widths, m)
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
