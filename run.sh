#!/usr/bin/env bash
# faceid's one entry point. It sets everything up on first use (a virtual environment in .venv with
# the pinned dependencies), then runs what you ask:
#
#   ./run.sh generate --face photo.jpg --prompt "a photo of a person as an astronaut" --out outputs
#   ./run.sh test            # the whole test suite, offline (extra arguments go to pytest)
#   ./run.sh <any faceid command ...>
#
# FACEID_VENV chooses another environment folder. For a CUDA build of torch, see the README.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FACEID_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/faceid" ] || [ pyproject.toml -nt "$VENV/.faceid-installed" ]; then
  echo "faceid: setting up $VENV (first run only) ..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  touch "$VENV/.faceid-installed"
fi

if [ "${1:-}" = "test" ]; then
  shift
  # DeepSpeed (optional; tests/test_deepspeed.py) is an sdist built against the installed torch: with
  # --no-build-isolation, since an isolated build would fetch a multi-GB CUDA torch. Tried once per environment.
  if [ ! -e "$VENV/.faceid-deepspeed-tried" ]; then
    touch "$VENV/.faceid-deepspeed-tried"
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps deepspeed==0.19.8 hjson==3.1.0 \
        py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 ninja==1.13.2 \
      || echo "faceid: DeepSpeed could not be installed; tests/test_deepspeed.py will be skipped" >&2
  fi
  # Tests never touch the network: every model they use is built by the tests or ships on disk.
  export HF_HUB_OFFLINE=1
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/faceid" "$@"
