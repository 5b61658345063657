#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, .venv) and runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow   or   scripts/test.sh tests/unit -x
#   scripts/test.sh --viewer   installs the OHIF viewer and Chromium too and runs the viewer suite
#                              (tests/viewer: every analyzer's results opened in OHIF, a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = --viewer ]; then
    shift
    bash scripts/setup.sh viewer
    # Here a missing viewer is a failure, not a skip.
    DICOMNODE_VIEWER_REQUIRED=1 exec .venv/bin/python -m pytest -m viewer tests/viewer "$@"
fi
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
