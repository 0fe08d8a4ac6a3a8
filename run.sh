#!/usr/bin/env bash
# The project's two entry points on a fresh machine:
#   bash run.sh demo   # the main job: a local elastic EP cluster on an embedded Ray
#   bash run.sh test   # the test suite (GPU tests skip where no CUDA device is visible)
# Both create ./.venv on first use. torch is pinned to the CPU build first, so that
# resolving the project's own requirements never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EEP_VENV:-.venv}"

setup() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
      "import elastic_ep, actors, ray, torch, safetensors, pytest_timeout, hypothesis, transformers, matplotlib" 2>/dev/null; then
    return
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==${EEP_TORCH_VERSION:-2.13.0}"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[test]"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/elastic-ep" demo "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash run.sh demo|test|setup [args...]" >&2
    exit 2
    ;;
esac
