#!/usr/bin/env bash
# vllm-router (Rust, from PyPI) for the side-by-side benchmark, in its own virtualenv under the cache
# (~/.cache/turnout/vllm-router-venv, about 15 s the first time). Idempotent.
set -euo pipefail
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
VENV="$CACHE/vllm-router-venv"
VERSION=0.1.17
STAMP="$VENV/.turnout-ready-$VERSION"
[ -f "$STAMP" ] && exit 0
echo "[vllm-router] creating $VENV (vllm-router==$VERSION)"
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-router==$VERSION" > "$VENV/pip.log" 2>&1 || { tail -30 "$VENV/pip.log"; exit 1; }
"$VENV/bin/vllm-router" --help > /dev/null
touch "$STAMP"
