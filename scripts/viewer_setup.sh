#!/usr/bin/env bash
# Installs what the viewer suite (tests/viewer) drives into .viewer/ (git-ignored):
#   .viewer/ohif-<version>/   the prebuilt OHIF viewer site (@ohif/app from npm; only its static dist/ is used)
#   .viewer/node_modules/     playwright-core, which drives Debian's /usr/bin/chromium (no browser download)
# Run once with network access; afterwards the suite needs none, and this script returns at once.
# Debian's chromium, Node.js >= 20 and npm must be installed first (scripts/setup.sh viewer does that).
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
PLAYWRIGHT_VERSION=1.65.2
dest=.viewer
stamp=$dest/installed
want="ohif=$OHIF_VERSION playwright-core=$PLAYWRIGHT_VERSION"

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -f "$dest/ohif-$OHIF_VERSION/dist/index.html" ] \
        && [ -f "$dest/node_modules/playwright-core/package.json" ]; then
    echo "viewer_setup: ready ($want)"
    exit 0
fi
for cmd in node npm; do
    command -v "$cmd" >/dev/null || { echo "viewer_setup: '$cmd' is missing; run scripts/setup.sh viewer (installs nodejs and npm)" >&2; exit 2; }
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "viewer_setup: playwright-core $PLAYWRIGHT_VERSION needs Node.js >= 20 but this is $(node --version); install Node.js 20 (e.g. from NodeSource) and run again" >&2
    exit 2
fi

mkdir -p "$dest"
[ -f "$dest/package.json" ] || echo '{"name": "dicomnode-viewer-tests", "private": true}' > "$dest/package.json"
echo "viewer_setup: installing playwright-core@$PLAYWRIGHT_VERSION into $dest"
npm install --prefix "$dest" --no-audit --no-fund --silent --save-exact "playwright-core@$PLAYWRIGHT_VERSION"

echo "viewer_setup: fetching @ohif/app@$OHIF_VERSION (prebuilt site, about 50 MB)"
tmp=$(mktemp -d "$dest/pack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tarball=$(cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" | tail -n 1)
got="sha512-$(openssl dgst -sha512 -binary "$tmp/$tarball" | base64 -w0)"
if [ "$got" != "$OHIF_INTEGRITY" ]; then
    echo "viewer_setup: @ohif/app@$OHIF_VERSION from npm has integrity $got, expected $OHIF_INTEGRITY; not installing it" >&2
    exit 1
fi
tar xzf "$tmp/$tarball" -C "$tmp"
rm -rf "$dest/ohif-$OHIF_VERSION"
mv "$tmp/package" "$dest/ohif-$OHIF_VERSION"
echo "$want" > "$stamp"
echo "viewer_setup: ready ($want)"
