#!/usr/bin/env bash
# The Portkey gateway (Node, from npm) for the side-by-side benchmark, under the cache
# (~/.cache/turnout/portkey-gateway, about 10 s the first time). Idempotent.
# @hono/node-server is held at 1.14.1: from 1.14.2 on, the gateway answers every streamed request with a 500
# ("immutable" headers, Portkey-AI/gateway issue 1389); @hono/node-ws 1.2.0 is the last release that accepts it.
set -euo pipefail
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
DIR="$CACHE/portkey-gateway"
VERSION=1.15.2
STAMP="$DIR/.turnout-ready-$VERSION"
[ -f "$STAMP" ] && exit 0
if ! command -v npm > /dev/null; then
    echo "[portkey] installing Debian's nodejs and npm (log: /tmp/turnout-apt.log)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    { $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
        nodejs npm; } > /tmp/turnout-apt.log 2>&1 || { tail -30 /tmp/turnout-apt.log; exit 1; }
fi
echo "[portkey] installing @portkey-ai/gateway@$VERSION into $DIR"
mkdir -p "$DIR"
cat > "$DIR/package.json" <<JSON
{
  "name": "turnout-bench-portkey",
  "private": true,
  "dependencies": {"@portkey-ai/gateway": "$VERSION"},
  "overrides": {"@hono/node-server": "1.14.1", "@hono/node-ws": "1.2.0"}
}
JSON
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error > npm.log 2>&1) || { tail -30 "$DIR/npm.log"; exit 1; }
test -x "$DIR/node_modules/.bin/gateway"
touch "$STAMP"
