#!/usr/bin/env bash
# Set up both environments, lint, and run the test suite: everything in the main environment, then the tests that
# touch transformers' cache/attention, the mixes codec and the kvpress adapter in the peers environment (transformers 5.2.x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
bash scripts/setup.sh peers
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "== lint"
.venv/bin/ruff check src tests
echo "== main environment: whole suite"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== peers environment: cache, attention, baselines, kvpress"
.venv-peers/bin/python -m pytest -q -p no:cacheprovider -m "not real_model" \
  tests/test_cache.py tests/test_method.py tests/test_hybrid.py tests/test_fast_path.py tests/test_baselines.py tests/test_kvpress.py tests/test_mixes.py \
  tests/test_models.py::test_gemma3_loads_with_correct_tokenizer "$@"
