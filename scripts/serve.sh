#!/usr/bin/env bash
# Sets up the node (.venv) and runs it in the foreground with config/node.yaml (or $DICOMNODE_CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh run
exec .venv/bin/dicomnode serve --config "${DICOMNODE_CONFIG:-config/node.yaml}" "$@"
