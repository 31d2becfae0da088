"""The prebuilt kernel wheel (``scripts/build_kernels.py``): loaded where it matches the kernel source, torch, Python
and CPU; refused in one line where it does not; and the committed one kept in step with the kernel source."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from echokv.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_kernels.py"
PROBE = """
import torch
from echokv.kernels import cpu
try:
    m = cpu.load()
except RuntimeError as exc:
    print("failed:", exc)
else:
    q, k = torch.ones(1, 1, 3, 64), torch.arange(64 * 70, dtype=torch.float32).reshape(1, 1, 70, 64) / 4000
    out = m.attend_full(q, 0.125, k.bfloat16(), k.bfloat16(), None)
    print(cpu.origin, "|", m.simd(), "|", float(out.sum()))
"""


def _wheel(tmp_path: Path) -> Path:
    ok, why = cpu.available()
    if not ok:
        pytest.skip(why)
    so = Path(cpu.load().__file__)
    res = subprocess.run([sys.executable, str(SCRIPT), "--from-so", str(so), "--out", str(tmp_path / "dist")],
                         capture_output=True, text=True, check=True)
    return Path(res.stdout.strip().splitlines()[-1])


def _probe(site: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != cpu.ARCH_ENV}
    environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**environ, **env},
                          timeout=600, check=True)


def test_a_matching_wheel_is_loaded_and_a_stale_one_refused_in_one_line(tmp_path):
    wheel = _wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        for row in z.read(next(n for n in z.namelist() if n.endswith("RECORD"))).decode().splitlines():
            path, digest, _ = row.split(",")
            if digest:  # the wheel's own record of its files holds
                data = z.read(path)
                want = hashlib.sha256(data).digest()
                assert digest == "sha256=" + base64.urlsafe_b64encode(want).rstrip(b"=").decode()
    here = _probe(site)
    origin, simd, total = here.stdout.strip().splitlines()[-1].split(" | ")
    assert origin == "prebuilt (here)", here.stdout + here.stderr
    assert simd == cpu.load().simd()
    q, k = torch.ones(1, 1, 3, 64), torch.arange(64 * 70, dtype=torch.float32).reshape(1, 1, 70, 64) / 4000
    assert float(total) == float(cpu.load().attend_full(q, 0.125, k.bfloat16(), k.bfloat16(), None).sum())

    # another kernel source: not used, one line says why; without a compiler the load then fails in one line
    manifest = site / "echokv_kernels" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "source_sha256": "0" * 64}))
    stale = _probe(site, CXX="/nonexistent/c++")
    said = [ln for ln in stale.stderr.splitlines() if "echokv_kernels" in ln]
    assert len(said) == 1 and "another kernel source" in said[0] and "build_kernels.py" in said[0], stale.stderr
    assert stale.stdout.strip().startswith("failed: the C++ kernel did not build (no C++ compiler found")
    # another torch, likewise
    manifest.write_text(json.dumps({**m, "torch": "1.0.0"}))
    other = _probe(site, CXX="/nonexistent/c++")
    assert "built for torch 1.0.0" in other.stderr


def test_the_committed_wheel_was_built_from_this_kernel_source():
    # (rebuild it after any change to decode_attention.cpp: .venv/bin/python scripts/build_kernels.py)
    wheels = sorted((ROOT / "prebuilt").glob("echokv_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        manifest = json.loads(z.read("echokv_kernels/manifest.json"))
        names = set(z.namelist())
    assert manifest["source_sha256"] == hashlib.sha256(cpu.SOURCE.read_bytes()).hexdigest()
    assert [b["name"] for b in manifest["builds"]] == ["avx512-vnni", "avx2", "x86-64"]
    assert all(f"echokv_kernels/{b['file']}" in names for b in manifest["builds"])
