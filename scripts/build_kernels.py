"""Prebuilt C++ decode kernels: one wheel, ``echokv_kernels``, holding the kernel compiled for three x86 levels, so
that ``bash scripts/setup.sh`` needs no compiler where one of them matches this kernel source, torch, Python and CPU.

    .venv/bin/python scripts/build_kernels.py [--out prebuilt]      # three builds, ~1.5 min each on 2 cores

``echokv.kernels.cpu`` loads the best build the CPU runs when the wheel is installed, and builds the kernel itself
(cached, ``-march=native``) when none fits: the source changed since the wheel was made (one line says so), another
torch or Python, or ``ECHOKV_KERNEL_ARCH`` set. Rebuild the wheel whenever ``decode_attention.cpp`` changes
(``tests/test_prebuilt.py`` fails until then). ``--from-so FILE`` packages one existing build instead (the tests).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv.kernels import cpu

# best first: name -> (compiler flags, the /proc/cpuinfo flags a CPU needs to run the build)
BUILDS = {
    "avx512-vnni": (["-march=x86-64-v4", "-mavx512vnni", "-mavx512vbmi"],
                    ["avx2", "fma", "f16c", "bmi2", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                     "avx512_vnni", "avx512vbmi"]),
    "avx2": (["-march=x86-64-v3"], ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]),
    "x86-64": (["-march=x86-64"], []),
}

# the wheel's package: picks a build, loads it under the kernel's module name
INIT = '''"""Prebuilt builds of echokv's C++ decode kernel (written by echokv's scripts/build_kernels.py)."""

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
MANIFEST = json.loads((HERE / "manifest.json").read_text())


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def load(source_sha256: str, torch_version: str):
    """(module, build name): the best build this CPU runs; ValueError naming why none fits."""
    m = MANIFEST
    if m["source_sha256"] != source_sha256:
        raise ValueError("it was built from another kernel source than this echokv's")
    if m["torch"] != torch_version:
        raise ValueError(f"it was built for torch {m['torch']}, this is {torch_version}")
    if m["python"] != sys.implementation.cache_tag:
        raise ValueError(f"it was built for {m['python']}, this is {sys.implementation.cache_tag}")
    have = _cpu_flags()
    for build in m["builds"]:
        if set(build["needs"]) <= have:
            path = str(HERE / build["file"])
            loader = importlib.machinery.ExtensionFileLoader(m["module"], path)
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(m["module"], path,
                                                                                            loader=loader))
            loader.exec_module(module)
            return module, build["name"]
    raise ValueError("none of its builds runs on this CPU")
'''


def _build_one(name: str, folder: Path) -> Path:
    """Compile the kernel with one build's flags, without loading it (an AVX-512 build dies of SIGILL on import on
    a CPU without AVX-512; torch's own builder, which ``cpp_extension.load`` runs before importing)."""
    from torch.utils import cpp_extension

    flags = [f for f in cpu.cflags() if not f.startswith(("-march", "-mcpu"))] + BUILDS[name][0]
    cpp_extension._write_ninja_file_and_build_library(
        name=cpu.NAME, sources=[str(cpu.SOURCE)], extra_cflags=flags, extra_cuda_cflags=None, extra_sycl_cflags=None,
        extra_ldflags=["-fopenmp"], extra_include_paths=None, build_directory=str(folder), verbose=False,
        with_cuda=False, with_sycl=False)
    return folder / f"{cpu.NAME}.so"


def _record(files: dict[str, bytes], dist: str) -> bytes:
    rows = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    return ("\n".join(rows + [f"{dist}/RECORD,,"]) + "\n").encode()


def write_wheel(out: Path, builds: list[tuple[str, Path, list[str]]]) -> Path:
    """The wheel of ``builds`` (name, .so file, CPU flags it needs; best first) in ``out``, written whole or not at
    all (a temporary name, then renamed)."""
    ver = version("echokv")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dist = f"echokv_kernels-{ver}.dist-info"
    manifest = {"module": cpu.NAME, "source_sha256": hashlib.sha256(cpu.SOURCE.read_bytes()).hexdigest(),
                "torch": torch.__version__, "python": sys.implementation.cache_tag,
                "builds": [{"name": n, "file": f"{n}/{cpu.NAME}.so", "needs": needs} for n, _, needs in builds]}
    files = {"echokv_kernels/__init__.py": INIT.encode(),
             "echokv_kernels/manifest.json": (json.dumps(manifest, indent=1) + "\n").encode()}
    for n, so, _ in builds:
        files[f"echokv_kernels/{n}/{cpu.NAME}.so"] = so.read_bytes()
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: echokv-kernels\nVersion: {ver}\nSummary: prebuilt "
                                 f"C++ decode kernels of echokv for torch {torch.__version__}\n").encode()
    files[f"{dist}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: echokv scripts/build_kernels.py\nRoot-Is-Purelib: "
                              f"false\nTag: {tag}-{tag}-linux_x86_64\n").encode()
    files[f"{dist}/RECORD"] = _record(files, dist)
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"echokv_kernels-{ver}-{tag}-{tag}-linux_x86_64.whl"
    tmp = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    os.replace(tmp, wheel)
    return wheel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("prebuilt"), help="folder of the wheel (default: prebuilt)")
    ap.add_argument("--from-so", type=Path, default=None, help="package this one build (named 'here', no CPU needs)")
    args = ap.parse_args()
    if args.from_so is not None:
        if not args.from_so.is_file():
            sys.exit(f"--from-so {args.from_so}: no such file (a built {cpu.NAME}.so)")
        print(write_wheel(args.out, [("here", args.from_so, [])]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        builds = []
        for name, (_, needs) in BUILDS.items():
            print(f"building {name} ...", flush=True)
            folder = Path(tmp) / name
            folder.mkdir()
            builds.append((name, _build_one(name, folder), needs))
        print(write_wheel(args.out, builds))


if __name__ == "__main__":
    main()
