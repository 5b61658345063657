#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, .venv) and runs the whole suite: the
# default tests, then the tests against a private PostgreSQL (-m postgres).
# Extra arguments go to pytest instead, e.g. scripts/test.sh -m slow   or   scripts/test.sh tests/unit -x
#   scripts/test.sh --viewer [ARGS]   the viewer suite (tests/viewer: every analyzer's results opened in
#                                     OHIF in headless Chromium; installs chromium and OHIF first)
set -euo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1 PYTHONUNBUFFERED=1
viewer() {
    bash scripts/setup.sh viewer
    # Here a missing viewer is a failure, not a skip.
    DICOMNODE_VIEWER_REQUIRED=1 .venv/bin/python -m pytest -m viewer tests/viewer "$@"
}
if [ "${1:-}" = --viewer ]; then
    shift
    viewer "$@"
    exit
fi
bash scripts/setup.sh test
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
exec .venv/bin/python -m pytest -m postgres
