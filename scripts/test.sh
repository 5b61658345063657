#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, .venv) and runs the whole suite.
# Without arguments: the default suite, then the tests against a private PostgreSQL (-m postgres).
# Extra arguments go to pytest instead, e.g. scripts/test.sh -m slow   or   scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export TCP_NODELAY=1 PYTHONUNBUFFERED=1
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
exec .venv/bin/python -m pytest -m postgres
