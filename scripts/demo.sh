#!/usr/bin/env bash
# Set up the main environment and run the main job on the embedded SmolLM2-135M: train an EchoKV network at
# compression ratio 0.5, answer prompts with the full and the compressed cache, print a comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
.venv/bin/echokv demo "$@"
