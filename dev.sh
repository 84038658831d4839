#!/usr/bin/env bash
# The two commands of the README. Both need only python3 (>= 3.10) and git on a fresh machine.
#   ./dev.sh demo   create/update .venv, compile the bundled example model with compression, run it
#                   (on the GPU when one is visible, else on the CPU)
#   ./dev.sh test   create/update .venv, then lint (ruff), type-check (mypy) and run the test suite
# Extra arguments after `test` go to pytest (e.g. ./dev.sh test -m gpu).
set -euo pipefail
cd "$(dirname "$0")"

PY=.venv/bin/python

setup() {
    [ -x "$PY" ] || python3 -m venv .venv
    # Reinstall only when the install recipe changed since the last successful install.
    local stamp
    stamp=$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)
    if [ "$(cat .venv/.tensorpress-installed 2>/dev/null)" != "$stamp" ]; then
        "$PY" -m pip install -q --upgrade pip
        # The CPU wheel of torch first, pinned, so nothing later can pull a CUDA build.
        "$PY" -m pip install -q "torch==2.13.0"
        "$PY" -m pip install -q -e ".[dev]"
        echo "$stamp" > .venv/.tensorpress-installed
    fi
}

case "${1:-}" in
    demo)
        setup
        shift
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
