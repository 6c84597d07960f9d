#!/usr/bin/env bash
# Start a vLLM CPU worker on loopback, in the foreground (exec), serving a model setup.sh built.
# usage: [TURNOUT_VLLM_MODEL=MODEL] start.sh PORT [SERVED_MODEL_NAMES] [CPU_CORES] [VLLM_ARGS...]
#   TURNOUT_VLLM_MODEL: gemma3-270m (default; Gemma 3 270M base, the Gemma chat template beside this script)
#     or smollm2-135m (SmolLM2-135M-Instruct, its own ChatML chat template, saved in the model directory).
#   SERVED_MODEL_NAMES: one name, or several separated by commas; vLLM answers to each and reports the first
#     (default: the model, e.g. gemma3-270m).
#   CPU_CORES: cores to bind the OpenMP threads to, e.g. "0" or "1"; a second instance needs its own ("" for any).
#   VLLM_ARGS: passed on to the server, e.g. --no-enable-prefix-caching.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
MODEL="${TURNOUT_VLLM_MODEL:-gemma3-270m}"
MODEL_DIR="$CACHE/models/$MODEL"
case "$MODEL" in
  gemma3-270m) TEMPLATE="$HERE/chat_template.jinja" ;;
  smollm2-135m) TEMPLATE="$MODEL_DIR/chat_template.jinja" ;;
  *) echo "start.sh: unknown TURNOUT_VLLM_MODEL '$MODEL' (gemma3-270m or smollm2-135m)" >&2; exit 2 ;;
esac
if [ ! -f "$MODEL_DIR/.turnout-ready" ]; then
  echo "start.sh: $MODEL_DIR is not built: run deploy/vllm-cpu/setup.sh" >&2
  exit 2
fi
PORT="${1:?usage: start.sh PORT [SERVED_MODEL_NAMES] [CPU_CORES] [VLLM_ARGS...]}"
IFS=, read -r -a NAMES <<< "${2:-$MODEL}"
CORES="${3:-}"
EXTRA=("${@:4}")
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if [ -n "$CORES" ]; then export VLLM_CPU_OMP_THREADS_BIND="$CORES"; fi
# Nothing may be fetched from a model hub here.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$CACHE/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --served-model-name "${NAMES[@]}" \
  --host 127.0.0.1 --port "$PORT" --dtype bfloat16 --max-model-len 2048 \
  --chat-template "$TEMPLATE" --enforce-eager ${EXTRA[@]+"${EXTRA[@]}"}
