#!/usr/bin/env bash
# The two commands of the README. Both need only python3 (>= 3.10) and git on a fresh machine.
#   ./dev.sh demo   create/update .venv, compile the bundled example model with compression, run it
#                   (on the GPU when one is visible, else on the CPU)
#   ./dev.sh test   create/update .venv, then lint (ruff), type-check (mypy) and run the test suite
# Extra arguments after `test` go to pytest (e.g. ./dev.sh test -m gpu).
set -euo pipefail
cd "$(dirname "$0")"

PY=.venv/bin/python

say() { echo "dev.sh: $*" >&2; }

setup() {
    if [ ! -x "$PY" ]; then
        say "creating the virtual environment .venv"
        python3 -m venv .venv
    fi
    # Reinstall only when the install recipe changed since the last successful install.
    local stamp
    stamp=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
    if [ "$(cat .venv/.tensorpress-installed 2>/dev/null)" != "$stamp" ]; then
        say "installing into .venv (a few minutes the first time; later runs skip this)"
        say "  1/3 upgrading pip"
        "$PY" -m pip install -q --upgrade pip
        # The CPU wheel of torch first, pinned, so nothing later can pull a CUDA build.
        say "  2/3 torch 2.13.0 (the CPU build)"
        "$PY" -m pip install -q "torch==2.13.0"
        say "  3/3 tensorpress (editable) with TVM 0.27, onnx, transformers and the test tools"
        "$PY" -m pip install -q -e ".[dev]"
        echo "$stamp" > .venv/.tensorpress-installed
        say "installed"
    fi
}

case "${1:-}" in
    demo)
        setup
        shift
        say "running examples/demo.py"
        exec "$PY" examples/demo.py "$@"
        ;;
    test)
        setup
        shift
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        exec "$PY" -m pytest -n 2 "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
