#!/usr/bin/env bash
# Start a vLLM CPU worker on loopback, in the foreground (exec), serving the model setup.sh built.
# usage: start.sh PORT [SERVED_MODEL_NAMES] [CPU_CORES] [VLLM_ARGS...]
#   SERVED_MODEL_NAMES: one name, or several separated by commas; vLLM answers to each and reports the first.
#   CPU_CORES: cores to bind the OpenMP threads to, e.g. "0" or "1"; a second instance needs its own ("" for any).
#   VLLM_ARGS: passed on to the server, e.g. --no-enable-prefix-caching.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
PORT="${1:?usage: start.sh PORT [SERVED_MODEL_NAMES] [CPU_CORES] [VLLM_ARGS...]}"
IFS=, read -r -a NAMES <<< "${2:-gemma3-270m}"
CORES="${3:-}"
EXTRA=("${@:4}")
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if [ -n "$CORES" ]; then export VLLM_CPU_OMP_THREADS_BIND="$CORES"; fi
# Nothing may be fetched from a model hub here.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$CACHE/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$CACHE/models/gemma3-270m" --served-model-name "${NAMES[@]}" \
  --host 127.0.0.1 --port "$PORT" --dtype bfloat16 --max-model-len 2048 \
  --chat-template "$HERE/chat_template.jinja" --enforce-eager ${EXTRA[@]+"${EXTRA[@]}"}
