"""The Triton decode kernel (echokv.kernels.triton_decode) against the PyTorch reference, run on CPU under Triton's
interpreter, plus one compile of the real kernels for sm_90 (no GPU needed; in a child process) so that what the
interpreter does not check (static branches, loop-carried types, dot shapes, registers) is checked too. Sizes are
tiny: the interpreter runs every program in Python.

Triton reads TRITON_INTERPRET once, when ``triton.language`` is defined, for the whole process. So this module sets
it before the first ``import triton`` (and leaves it set: the process's Triton is interpreted from then on). If
another module imported Triton first in compiled mode, the interpreted tests run in a child process instead."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from echokv.kernels import reference as ref

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

MODULE = "echokv.kernels.triton_decode"
MIX = ((16, 8), (8, 16), (4, 8))
ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = not isinstance(triton.language.zeros, triton.runtime.JITFunction)


def _child_env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return {**env, "TRITON_INTERPRET": "1"} if interpret else env


@pytest.mark.skipif(INTERPRETED, reason="the interpreted tests run in this process")
def test_in_child_process():
    """The interpreted tests, in a fresh process (this one's Triton was built for compiling)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not child_process and not compiles"], env=_child_env(True), cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@pytest.fixture(scope="module")
def td():
    """The kernel module, built for the interpreter (reimported if it was first built for compiling)."""
    if not INTERPRETED:
        pytest.skip("triton was imported in compiled mode before this module; test_in_child_process runs this test")
    module = importlib.import_module(MODULE)
    if not module.interpreting():
        module = importlib.reload(module)
    assert module.interpreting() and module.available()[0]
    return module


def _view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x as a strided view into a larger buffer (extra heads, tokens and channels around it), last dim contiguous."""
    pad = (0, 3) if x.dim() == 4 else ()
    shape = [x.shape[0] + 1, x.shape[1] + 2, x.shape[2] + 5, *(x.shape[3] + p for p in pad[1:])]
    buf = torch.empty(shape, dtype=x.dtype)
    if x.dtype == torch.uint8:
        buf.random_(0, 256, generator=gen)
    else:
        buf.normal_(generator=gen)
    view = buf[1:, 2:, 3:3 + x.shape[2]]
    view = view[..., : x.shape[3]] if x.dim() == 4 else view
    view.copy_(x)
    return view


def make_store(batch, heads, tokens, widths, gen, dtype=torch.bfloat16, chan=False) -> dict:
    """A store of random channels coded by ``widths``, every tensor a strided view; ``chan``: quantized classes with a
    scale and zero per channel and block of tokens (keys)."""
    x = torch.randn(batch, heads, tokens, ref.kept(widths), generator=gen) * 2 + 0.5
    store, first = {}, 0
    for width, n in widths:
        if not n:
            continue
        part = x[..., first:first + n]
        first += n
        quantize = ref.quantize_channels if chan else ref.quantize_class
        store.update({"16": part.to(dtype)} if width == 16 else quantize(part, width))
    return {name: _view(t, gen) for name, t in store.items()}


def check(td, batch=2, heads=2, rows=3, tokens=40, k_widths=MIX, v_widths=MIX, mask=None, dtype=torch.bfloat16,
          seed=0, atol=2e-5, chan=False, **kwargs):
    """Run both on the same inputs and compare (q has more channels than the keys keep, and is a strided view)."""
    gen = torch.Generator().manual_seed(seed)
    k_store = make_store(batch, heads, tokens, k_widths, gen, dtype, chan)
    v_store = make_store(batch, heads, tokens, v_widths, gen, dtype)
    q = torch.randn(batch, rows, heads, ref.kept(k_widths) + 5, generator=gen).transpose(1, 2) * 0.3
    out, lse = td.attend(q, k_store, v_store, k_widths, v_widths, mask, **kwargs)
    want_out, want_lse = ref.attend(q, k_store, v_store, k_widths, v_widths, mask)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == (batch, heads, rows, ref.kept(v_widths)) and lse.shape == (batch, heads, rows)
    torch.testing.assert_close(out, want_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse, want_lse, atol=atol, rtol=atol)
    return out, lse


@pytest.mark.parametrize("k_widths,v_widths", [
    (((16, 16),), ((16, 16),)),
    (((8, 16),), ((8, 16),)),
    (((4, 16),), ((4, 16),)),
    (MIX, MIX),
    (((16, 8), (8, 8)), ((4, 12),)),  # keys and values in different classes, n_v != n_k
    (((8, 24),), ((16, 4), (4, 6))),  # a 4-bit class of 3 bytes (padded nibble halves)
    (((16, 0), (8, 16), (4, 0)), ((16, 16), (8, 0))),  # classes listed with 0 channels
])
def test_class_mixes(td, k_widths, v_widths):
    check(td, k_widths=k_widths, v_widths=v_widths, block_n=16, num_splits=2)


def test_float16_class(td):
    check(td, k_widths=((16, 16), (8, 16)), v_widths=((16, 16),), dtype=torch.float16, block_n=16, num_splits=2)


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_query_rows(td, rows):
    check(td, batch=1, rows=rows, tokens=24, block_n=16, num_splits=1)


def test_ragged_left_padding_and_fully_masked_row(td):
    tokens = 37  # not a multiple of the block
    mask = torch.zeros(3, tokens, dtype=torch.bool)
    mask[0, :] = True
    mask[1, 9:] = True  # left padding
    # mask[2] stays empty: out 0, lse -inf
    out, lse = check(td, batch=3, heads=1, tokens=tokens, mask=mask, block_n=16, num_splits=2)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()
    assert torch.isfinite(lse[:2]).all()


def test_masked_tokens_are_not_read(td):
    """Padding may hold garbage (NaN) where the mask hides it; the reference would propagate it, the kernel does not."""
    gen = torch.Generator().manual_seed(1)
    k_store, v_store = make_store(1, 1, 20, MIX, gen), make_store(1, 1, 20, MIX, gen)
    q = torch.randn(1, 1, 3, ref.kept(MIX), generator=gen)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, :6] = False
    want = ref.attend(q, k_store, v_store, MIX, MIX, mask)
    for store in (k_store, v_store):
        store["16"][0, 0, :6] = float("nan")
        store["8.s"][0, 0, :6] = float("nan")
    out, lse = td.attend(q, k_store, v_store, MIX, MIX, mask, block_n=16)
    torch.testing.assert_close((out, lse), want, atol=2e-5, rtol=2e-5)


def test_one_token(td):
    check(td, tokens=1, block_n=16)


def test_empty_splits(td):
    # 20 tokens = 2 blocks of 16 cut into 5 splits: splits 2..4 hold no token
    check(td, tokens=20, block_n=16, num_splits=5)
    check(td, tokens=20, block_n=32, num_splits=3, mask=torch.ones(2, 20, dtype=torch.bool))


def test_no_tokens(td):
    out, lse = check(td, tokens=0, block_n=16)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_default_tuning_and_fast_mode(td):
    check(td, batch=1, tokens=70)  # default block and splits
    check(td, batch=1, tokens=40, block_n=16, precise=False, atol=3e-3)  # fp16/tf32 rounding


def test_import_without_triton_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes "import triton" fail
    spec = importlib.util.find_spec(MODULE)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        spec.loader.exec_module(module)


COMPILE = textwrap.dedent("""
    import sys
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    import echokv.kernels.triton_decode as td
    from echokv.kernels import reference as ref
    from test_triton_kernel import MIX, make_store

    class Driver:  # what JITFunction.run asks of the driver before it launches
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = []
    class Warmup:  # compile, do not launch
        def __init__(self, kernel):
            self.kernel = kernel
        def __getitem__(self, grid):
            return lambda *args, **kwargs: compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))

    try:
        driver.set_active(Driver())
        td._split_kernel, td._merge_kernel = Warmup(td._split_kernel), Warmup(td._merge_kernel)
        td.interpreting = lambda: True  # let CPU tensors through
        gen = torch.Generator().manual_seed(0)
        values = ((8, 32), (4, 32))
        k_store, v_store = make_store(2, 2, 40, MIX, gen), make_store(2, 2, 40, values, gen)
        q = torch.randn(2, 2, 3, ref.kept(MIX))
        td.attend(q, k_store, v_store, MIX, values, torch.ones(2, 40, dtype=torch.bool), num_splits=2)
    except (AttributeError, TypeError, ImportError) as error:  # the stand-in no longer matches this Triton
        print(f"SKIP {error!r}")
        sys.exit(0)
    assert len(compiled) == 2 and all(kernel.asm.get("cubin") for kernel in compiled), compiled
    assert "mma" in compiled[0].asm["ptx"]
    print("COMPILED")
""")


def test_compiles_for_sm90():
    """Compile both kernels for an H100 (PTX, and cubin through the bundled ptxas) through the normal launch path
    (warmup: compile, no launch) with a stand-in driver, in a child process where Triton is not interpreted."""
    run = subprocess.run([sys.executable, "-c", COMPILE], env=_child_env(False), cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    if run.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile without a GPU on this triton: {run.stdout.strip()}")
    assert "COMPILED" in run.stdout


@pytest.mark.parametrize("k_widths", [MIX, ((8, 16),), ((4, 24),), ((16, 8), (4, 6))])
def test_per_channel_key_scales(td, k_widths):
    mask = torch.arange(130)[None, :] >= torch.tensor([0, 50])[:, None]  # left padding into the second block
    check(td, tokens=130, k_widths=k_widths, chan=True, num_splits=2, mask=mask)
    check(td, batch=1, tokens=64, k_widths=k_widths, chan=True, num_splits=3)  # one block, empty splits


def test_per_channel_scales_need_64_token_blocks_and_keys(td):
    gen = torch.Generator().manual_seed(0)
    k, v = make_store(1, 1, 70, MIX, gen, chan=True), make_store(1, 1, 70, MIX, gen)
    q = torch.randn(1, 1, 2, ref.kept(MIX))
    with pytest.raises(ValueError, match="block_n must be 64"):
        td.attend(q, k, v, MIX, MIX, block_n=16)
    with pytest.raises(ValueError, match="only for keys"):
        td.attend(q, v, k, MIX, MIX)
