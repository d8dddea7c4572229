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
        "$venv/bin/python" -m pip install -q -e ".[demo]"
    fi
    touch "$stamp"
fi

if [ "$want" = test ]; then
    # The Cloudflare Worker's tooling, pinned by its lock file.
    if [ ! -d lambda/node_modules ] || [ lambda/package-lock.json -nt lambda/node_modules ]; then
        (cd lambda && npm ci --no-audit --no-fund --loglevel=error)
    fi
    # axe-core for the accessibility check in the browser tests.
    if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules ]; then
        (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
    fi
fi
