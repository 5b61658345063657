#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, .venv) and runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow   or   scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export TCP_NODELAY=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
