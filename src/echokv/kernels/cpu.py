"""Builds and loads the C++ decode-attention kernel (``csrc/decode_attention.cpp``) with PyTorch's JIT extension
builder.

An installed ``echokv_kernels`` wheel (``scripts/build_kernels.py``: the kernel prebuilt for three x86 levels) is
used first when one of its builds matches this source, torch, Python and CPU, so that no compiler is needed.
Otherwise the build is cached under ``$ECHOKV_KERNEL_CACHE`` or ``~/.cache/echokv/kernels``, in a folder named after the torch
version and a hash of the source, the compiler flags and the CPU (the code is built with ``-march=native``, or
``-march=$ECHOKV_KERNEL_ARCH``), so it reruns only when one of them changes. A file lock keeps two processes from
building at once. The build is silent unless it fails; a failure is remembered for the process, so it is paid once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
NAME = "echokv_decode_attention"

_module = None
_error: str | None = None
#: where the loaded kernel came from: "prebuilt (<build>)" (an installed ``echokv_kernels`` wheel) or "built here"
origin = ""


#: overrides -march=native on x86 (for example x86-64-v3: the AVX2 path; x86-64: plain C++), so that one machine
#: can build and test every instruction-set path
ARCH_ENV = "ECHOKV_KERNEL_ARCH"


def _arch_flags() -> list[str]:
    """Tune for this CPU (AVX-512 where it has it, else AVX2); nothing special on an unknown architecture."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return [f"-march={os.environ.get(ARCH_ENV, '').strip() or 'native'}"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def cflags() -> list[str]:
    """Compiler flags. -fopenmp: at::parallel_for's OpenMP backend is inlined into the extension, so without it
    the kernel would run on one thread (the torch wheel's libgomp is reused at load time, by its soname)."""
    return ["-O3", "-fopenmp", "-fno-math-errno", *_arch_flags()]


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and flags (a shared home folder may serve several machines)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def build_dir() -> Path:
    """The cache folder of this source, torch version, flags and CPU."""
    root = os.environ.get("ECHOKV_KERNEL_CACHE") or str(Path.home() / ".cache" / "echokv" / "kernels")
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cflags()).encode(), _cpu_fingerprint().encode(),
                 sys.version.encode()):
        h.update(part)
        h.update(b"\0")
    return Path(root) / f"{torch.__version__}-{h.hexdigest()[:16]}"


def compiler() -> str | None:
    """The C++ compiler the build would use ($CXX or c++/g++/clang++), None when there is none."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder``/build.lock for the duration (released by the OS if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: rely on torch's own lock file
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load():
    """The compiled module (building it on first use), or RuntimeError with the reason in one line."""
    global _module, _error, origin
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    try:
        _module, origin = _prebuilt() or (_build(), "built here")
    except Exception as exc:  # any build failure becomes one line, not a compiler log
        _error = f"the C++ kernel did not build ({_short(exc)})"
        raise RuntimeError(_error) from exc
    return _module


def _prebuilt() -> tuple | None:
    """(module, origin) from an installed ``echokv_kernels`` wheel matching this source, torch, Python and CPU; None
    without one, with ``ECHOKV_KERNEL_ARCH`` set (a build of its own), or where none fits (one line saying why)."""
    if os.environ.get(ARCH_ENV, "").strip() or importlib.util.find_spec("echokv_kernels") is None:
        return None
    import echokv_kernels

    try:
        module, name = echokv_kernels.load(hashlib.sha256(SOURCE.read_bytes()).hexdigest(), torch.__version__)
    except (ValueError, ImportError, OSError) as exc:
        print(f"echokv: the installed echokv_kernels wheel is not used ({exc}); building the kernel here "
              "(scripts/build_kernels.py makes a matching wheel)", file=sys.stderr)
        return None
    return module, f"prebuilt ({name})"


def _build():
    if compiler() is None:
        raise RuntimeError("no C++ compiler found: install g++ or set CXX")
    if not SOURCE.exists():
        raise RuntimeError(f"{SOURCE} is missing")
    from torch.utils import cpp_extension

    folder = build_dir()
    with _locked(folder):
        # torch's own lock file is left behind by a build that was killed; under our lock nobody else builds
        (folder / "lock").unlink(missing_ok=True)
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=cflags(),
                                  extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


def _short(exc: BaseException) -> str:
    """The first informative line of a build error (torch's message carries the whole compiler log)."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "error" in line.lower() and "Error building extension" not in line:
            return line.strip()[:300]
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def plain() -> bool:
    """Whether the loaded kernel is the plain C++ build (no AVX2 or AVX-512): it runs, but reads 16-bit K/V slower
    than PyTorch's SDPA, so full mode keeps SDPA and coded caches warn."""
    return load().simd() == "portable"


def available() -> tuple[bool, str]:
    """(True, "") when the kernel loads, else (False, the reason)."""
    try:
        load()
    except RuntimeError as exc:
        return False, str(exc)
    return True, ""
