"""Decode attention over per-head coded K/V: one entry point, three implementations.

:func:`attend` takes the stored layout of :mod:`echokv.kernels.reference` and returns ``(out, lse)`` exactly as
:func:`echokv.kernels.reference.attend` does, through

* ``"cpp"``: the fused C++ kernel (``csrc/decode_attention.cpp``, built on first use by :mod:`.cpu`), CPU tensors;
* ``"triton"``: ``echokv.kernels.triton_decode`` (imported lazily; it may be absent), CUDA tensors;
* ``"torch"``: the PyTorch reference, anywhere.

``kernel="auto"`` (the default) takes cpp on CPU and triton on CUDA when they run, else torch, and then logs one
warning per process naming the path and why. ``$ECHOKV_KERNEL`` (torch, cpp, triton or auto) overrides ``"auto"``.
Forcing a kernel that cannot run raises RuntimeError.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from . import cpu, reference

KERNELS = ("auto", "cpp", "triton", "torch")
ENV = "ECHOKV_KERNEL"

log = logging.getLogger("echokv")
_warned: set[str] = set()
_checked: set[str] = set()  # checks made once per process
_triton = None
_triton_error: str | None = None


def _choice(kernel: str) -> str:
    """The requested kernel after the environment override; ValueError for an unknown name."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        env = os.environ.get(ENV, "").strip().lower() or "auto"
        if env not in KERNELS:
            raise ValueError(f"${ENV} must be one of {', '.join(KERNELS)}, got {env!r}")
        return env
    return kernel


def _load_triton():
    """The Triton module, or None with the reason in ``_triton_error``."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            mod = importlib.import_module(f"{__name__}.triton_decode")
            ok = getattr(mod, "available", None)
            res = ok() if callable(ok) else True
            good, why = res if isinstance(res, tuple) else (bool(res), "")
            if not good:
                raise RuntimeError(why or "triton_decode reports it cannot run")
            _triton = mod
        except Exception as exc:  # noqa: BLE001 - an absent or broken optional module means "not available"
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            _triton_error = f"the Triton kernel is not available ({why})"
    return _triton


def _cpp_reason() -> str | None:
    ok, why = cpu.available()
    if ok and "plain" not in _checked:  # once: a plain build runs, but no faster than PyTorch, so say so
        _checked.add("plain")
        if cpu.plain():
            _warn_once("echokv kernels: the C++ kernel was built for a CPU without AVX2 or AVX-512 (plain C++): "
                       "coded caches decode slower than full mode here")
    return None if ok else why


#: class widths the Triton kernel reads (2-bit classes run the C++ kernel or the PyTorch path)
TRITON_WIDTHS = (16, 8, 4)


def _resolve(kernel: str, device: torch.device, widths=()) -> str:
    """The path taken for ``kernel`` on ``device`` and stored classes of ``widths`` (any of them; (width, n) pairs):
    "cpp", "triton" or "torch" (warns on an auto fallback)."""
    which = _resolve_device(kernel, device)
    if which == "triton":
        odd = sorted({w for w, n in widths if n and w not in TRITON_WIDTHS})
        if odd:
            why = f"the Triton kernel does not read {'/'.join(map(str, odd))}-bit classes"
            if _choice(kernel) == "triton":
                raise RuntimeError(f"echokv kernels: {why}; use kernel='torch' (or auto)")
            _warn_once(f"echokv kernels: {why}; using the PyTorch path (slower)")
            return "torch"
    return which


def _resolve_device(kernel: str, device: torch.device) -> str:
    want = _choice(kernel)
    dev = device.type
    if want == "torch":
        return "torch"
    if want == "cpp":
        if dev != "cpu":
            raise RuntimeError(f"echokv kernels: the C++ kernel runs on CPU tensors, got {dev} tensors")
        why = _cpp_reason()
        if why:
            raise RuntimeError(f"echokv kernels: {why}")
        return "cpp"
    if want == "triton":
        if _load_triton() is None:
            raise RuntimeError(f"echokv kernels: {_triton_error}")
        interpreting = getattr(_triton, "interpreting", lambda: False)()  # TRITON_INTERPRET=1 runs on CPU
        if dev != "cuda" and not interpreting:
            raise RuntimeError(f"echokv kernels: the Triton kernel runs on CUDA tensors, got {dev} tensors")
        return "triton"
    # auto
    if dev == "cpu":
        why = _cpp_reason()
        if why is None:
            return "cpp"
    elif dev == "cuda":
        if _load_triton() is not None:
            return "triton"
        why = _triton_error
    else:
        why = f"no compiled kernel for {dev} tensors"
    _warn_once(f"echokv kernels: {why}; using the PyTorch path (slower)")
    return "torch"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def path(kernel: str = "auto", device: str | torch.device = "cpu", widths=()) -> str:
    """The implementation :func:`attend` takes for ``kernel`` on ``device`` over classes of ``widths`` ((width, n)
    pairs): "cpp", "triton" or "torch"."""
    return _resolve(kernel, torch.device(device), widths)


def instructions(kernel: str = "auto", device: str | torch.device = "cpu") -> str | None:
    """What the C++ kernel was compiled to use ("avx512-vnni": integer dot products, 16-bit fixed-point query and
    weights; "avx512"; "avx2": 8 lanes, integer reads with vpmaddwd; "portable": plain C++), or None when another path
    runs."""
    if path(kernel, device) != "cpp":
        return None
    return cpu.load().simd()


def _classes(store: dict, widths) -> tuple[list[torch.Tensor], list[int]]:
    """The C++ kernel's per-class arguments: (codes, scale, zero) triples and (width, n) pairs."""
    tensors, meta = [], []
    for width, n in widths:
        if not n:
            continue
        key = str(width)
        data = store[key]
        if width == 16:
            empty = data.new_empty(0, dtype=torch.float16)
            tensors += [data, empty, empty]
        else:
            tensors += [data, store[key + ".s"], store[key + ".z"]]
        meta += [int(width), int(n)]
    return tensors, meta


def prepared(k_store: dict, v_store: dict, k_widths, v_widths) -> tuple:
    """The C++ kernel's class arguments for one stored snapshot, for :func:`attend_prepared` (a decode step of every
    layer calls the kernel on the same tensors until the store grows: built once, not once per call)."""
    return (*_classes(k_store, k_widths), *_classes(v_store, v_widths))


def attend_prepared(q: torch.Tensor, args: tuple, mask: torch.Tensor | None = None):
    """The C++ kernel on :func:`prepared` arguments (the caller resolved the path to "cpp" with :func:`path`)."""
    return cpu.load().attend(q.float().contiguous(), *args, mask)


def attend(q: torch.Tensor, k_store: dict, v_store: dict, k_widths, v_widths, mask: torch.Tensor | None = None,
           kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, R, n_v], lse [B, H, R]) float32 over the stored tokens; see :mod:`echokv.kernels.reference`.

    q [B, H, R, d >= kept keys] (already in the key basis and scaled); ``mask`` bool [B, T] or None; ``kernel``:
    "auto", "cpp", "triton" or "torch"."""
    which = _resolve(kernel, q.device, (*k_widths, *v_widths))
    if which == "torch":
        return reference.attend(q, k_store, v_store, k_widths, v_widths, mask)
    if which == "triton":
        return _triton.attend(q, k_store, v_store, k_widths, v_widths, mask)
    kt, km = _classes(k_store, k_widths)
    vt, vm = _classes(v_store, v_widths)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.bool()
    return cpu.load().attend(q.float().contiguous(), kt, km, vt, vm, mask)


def _merged_args(q_exact, mean_score, exact_mask, v_dec, v_mean, B, H, R):
    """The merge's tensors in the C++ kernel's forms (no copy where they already are)."""
    if exact_mask is not None and exact_mask.dtype != torch.bool:
        exact_mask = exact_mask.bool()
    return (q_exact.float().contiguous(), mean_score.float().reshape(B, H, R).contiguous(), exact_mask,
            v_dec.float().contiguous(), v_mean.float().reshape(v_mean.shape[0], -1).contiguous())


def attend_merged_prepared(q_basis: torch.Tensor, q_exact: torch.Tensor, mean_score: torch.Tensor, args: tuple,
                           mask: torch.Tensor | None, exact_k: torch.Tensor, exact_v: torch.Tensor,
                           exact_mask: torch.Tensor | None, v_dec: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:
    """The C++ kernel's :func:`attend_merged` on :func:`prepared` arguments (the caller resolved the path to "cpp"
    with :func:`path`): out [B, H, R, d] float32."""
    B, H, R = q_basis.shape[:3]
    qe, ms, em, vd, vm = _merged_args(q_exact, mean_score, exact_mask, v_dec, v_mean, B, H, R)
    return cpu.load().attend_merged(q_basis.float().contiguous(), qe, ms, *args, mask, exact_k, exact_v, em, vd, vm)


_NONE = torch.empty(0)


def quantize(z: torch.Tensor, width: int, per_channel: bool, skip: int = 0, cpp: bool = False) -> dict:
    """One class of a block of tokens (z [B, H, T, n] float32) as stored: :func:`reference.quantize_channels`
    (``per_channel``) or :func:`reference.quantize_class`, bit for bit; ``cpp``: by the C++ kernel (the caller
    resolved the path to "cpp"), one call instead of ~30."""
    if not cpp:
        return (reference.quantize_channels(z, width, skip=skip) if per_channel
                else reference.quantize_class(z, width))
    codes, scale, zero = cpu.load().quantize(z, width, per_channel, skip)
    key = str(width)
    return {key: codes, key + ".s": scale, key + ".z": zero}


def attend_step(q: torch.Tensor, scaling: float, k_basis: torch.Tensor, k_mean: torch.Tensor, args: tuple,
                mask: torch.Tensor | None, sink_k: torch.Tensor | None, sink_v: torch.Tensor | None,
                exact_k: torch.Tensor, exact_v: torch.Tensor, exact_mask: torch.Tensor | None, v_dec: torch.Tensor,
                v_mean: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step in one C++ call (the caller resolved the path to "cpp"): out [B, H, R, d] in q's dtype, the
    same as :func:`attend_merged_prepared` on ``q_basis = (q * scaling) @ k_basis``, ``q_exact = q * scaling``,
    ``mean_score = q_exact . k_mean`` and the exact tokens ``cat([sink_k, exact_k])`` (likewise for values, in that
    order for ``exact_mask``), without those tensors being built in PyTorch. q [B, H, R, d] (any float dtype,
    contiguous in the last dimension); k_basis [H, d, n_k], k_mean, v_mean [H, d], v_dec [H, n_v, d] float32
    contiguous; sinks None or [B, H, Ts, d]. ``table`` int64 [B, blocks]: the stored tensors are pages of blocks
    (codes [P, H, 64, *], per-channel scales [P, H, 1, n], per-token ones [P, H, 64]) and row b's j-th block of 64
    tokens is block ``table[b, j]`` (a serving engine's layout, :mod:`echokv.serving.pages`; ``mask`` [B, 64 blocks])."""
    return cpu.load().attend_step(q, scaling, k_basis, k_mean, *args, mask, _NONE if sink_k is None else sink_k,
                                  _NONE if sink_v is None else sink_v, exact_k, exact_v, exact_mask, v_dec, v_mean,
                                  table=table)


def attend_merged(q_basis: torch.Tensor, q_exact: torch.Tensor, mean_score: torch.Tensor, k_store: dict,
                  v_store: dict, k_widths, v_widths, mask: torch.Tensor | None, exact_k: torch.Tensor,
                  exact_v: torch.Tensor, exact_mask: torch.Tensor | None, v_dec: torch.Tensor, v_mean: torch.Tensor,
                  kernel: str = "auto") -> torch.Tensor:
    """out [B, H, R, d] float32: the stored tokens and ``Te`` exact ones under one softmax, in the head's space;
    see :func:`echokv.kernels.reference.attend_merged`.

    q_basis [B, H, R, >= kept keys] (the query in the key basis, scaled), q_exact [B, H, R, d] (the scaled query),
    mean_score [B, H, R] (or [B, H, R, 1]): the key mean's score; ``mask`` bool [B, T] or None; exact_k/exact_v
    [B, H, Te, d]; ``exact_mask`` bool [B, Te] (or [B, R, Te]) or None; v_dec [H, n_v, d]; v_mean [H, d] (or
    [H, 1, d]); ``kernel``: "auto", "cpp", "triton" or "torch"."""
    which = _resolve(kernel, q_basis.device, (*k_widths, *v_widths))
    if which == "torch":
        return reference.attend_merged(q_basis, q_exact, mean_score, k_store, v_store, k_widths, v_widths, mask,
                                       exact_k, exact_v, exact_mask, v_dec, v_mean)
    if which == "triton":
        parts = _triton.attend(q_basis, k_store, v_store, k_widths, v_widths, mask)
        return reference.attend_merged(q_basis, q_exact, mean_score, k_store, v_store, k_widths, v_widths, mask,
                                       exact_k, exact_v, exact_mask, v_dec, v_mean, parts=parts)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.bool()
    args = prepared(k_store, v_store, k_widths, v_widths)
    return attend_merged_prepared(q_basis, q_exact, mean_score, args, mask, exact_k, exact_v, exact_mask, v_dec,
                                  v_mean)
