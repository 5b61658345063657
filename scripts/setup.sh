#!/usr/bin/env bash
# Prepares a Debian machine for dicomnode: system packages and the virtual environment at .venv.
#   scripts/setup.sh run    what the node needs to run (default)
#   scripts/setup.sh test   that, plus the real DICOM peers and tools the test suite talks to
#   scripts/setup.sh viewer that, plus what the viewer suite (tests/viewer) drives: Debian's chromium,
#                           Node.js, and the OHIF viewer and playwright-core from npm, into .viewer/
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-run}
case "$purpose" in run|test|viewer) ;; *) echo "setup: unknown purpose '$purpose'; use run, test or viewer" >&2; exit 2;; esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=()
pick_python() {
    for py in python3.11 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$py"; return 0
        fi
    done
    return 1
}
if ! PY=$(pick_python); then apt_packages+=(python3.11 python3.11-venv); fi
if [ -n "${PY:-}" ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then apt_packages+=(python3.11-venv); fi
if [ "$purpose" != run ]; then
    for cmd_pkg in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc; do
        command -v "${cmd_pkg%%:*}" >/dev/null || apt_packages+=("${cmd_pkg##*:}")
    done
    [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || apt_packages+=(orthanc-dicomweb)
    # the postgres tests start a private server from these binaries
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)
fi
if [ "$purpose" = viewer ]; then
    command -v chromium >/dev/null || apt_packages+=(chromium)
    command -v npm >/dev/null || apt_packages+=(nodejs npm)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${apt_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    # The orthanc package starts a system service on 4242/8042; the node and its tests use their own.
    if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
        as_root systemctl stop orthanc || true
    fi
    PY=$(pick_python)
fi

extras=cpu
if [ "${DICOMNODE_GPU:-}" = 1 ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then extras=gpu; fi
[ "$purpose" != run ] && extras="$extras,train,dev,postgres"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.dicomnode-installed
want="$extras $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing dicomnode[$extras] into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
fi
[ "$purpose" = viewer ] && bash scripts/viewer_setup.sh
echo "setup: ready ($purpose)"
