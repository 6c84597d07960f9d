#!/usr/bin/env bash
# The LiteLLM proxy for the side-by-side benchmark, in its own virtualenv (it needs openai<3, which Turnout's
# tests do not use): ~/.cache/turnout/litellm-venv, about 740 MB and 75 s the first time. Idempotent.
set -euo pipefail
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
VENV="$CACHE/litellm-venv"
VERSION=1.106.2
STAMP="$VENV/.turnout-ready-$VERSION"
[ -f "$STAMP" ] && exit 0
echo "[litellm] creating $VENV (litellm[proxy]==$VERSION; about 75 s, 740 MB)"
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip > "$VENV/pip.log" 2>&1
"$VENV/bin/pip" install -q "litellm[proxy]==$VERSION" >> "$VENV/pip.log" 2>&1 || { tail -30 "$VENV/pip.log"; exit 1; }
LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --version > /dev/null  # no fetch of its remote price map
touch "$STAMP"
