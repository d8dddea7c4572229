#!/usr/bin/env bash
# Create .venv and install cloudmail into it.
#   scripts/bootstrap.sh          what the demo needs
#   scripts/bootstrap.sh test     plus everything the test suite needs (npm packages too)
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:-demo}
venv=${VENV:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=69" wheel

stamp="$venv/.cloudmail-$want"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    if [ "$want" = test ]; then
        "$venv/bin/python" -m pip install -q -e ".[test]"
    else
        "$venv/bin/python" -m pip install -q -e .
    fi
    touch "$stamp"
fi

if [ "$want" = test ]; then
    # The Cloudflare Worker's tooling, pinned by its lock file.
    if [ ! -d lambda/node_modules ] || [ lambda/package-lock.json -nt lambda/node_modules ]; then
        (cd lambda && npm ci --no-audit --no-fund --loglevel=error)
    fi
    if [ -f package-lock.json ] && { [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; }; then
        npm ci --no-audit --no-fund --loglevel=error
    fi
fi
