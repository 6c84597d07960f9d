#!/usr/bin/env bash
# Installs the system packages the tests run for real, with apt-get, when they are missing:
# prometheus (metrics are checked through a real Prometheus), chromium (the status page's screenshot test),
# redis-server (shared state across gateway replicas) and docker-compose (validates docker-compose.yml; no Docker
# engine is needed or installed: --no-install-recommends keeps docker.io out) and kubectl (renders the kustomize
# overlays; no cluster is needed).
# Safe to run twice: nothing is installed when every command is already there.
set -euo pipefail

declare -A wanted=([prometheus]=prometheus [chromium]=chromium [redis-server]=redis-server
                   [docker-compose]=docker-compose [kubectl]=kubectl)
missing=()
for cmd in "${!wanted[@]}"; do
    command -v "$cmd" > /dev/null || missing+=("${wanted[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing system packages: ${missing[*]} (log: /tmp/turnout-apt.log)"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
{ $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${missing[@]}"; } \
    > /tmp/turnout-apt.log 2>&1 || { tail -30 /tmp/turnout-apt.log; exit 1; }
for cmd in "${!wanted[@]}"; do
    command -v "$cmd" > /dev/null || { echo "$cmd still missing after apt-get (see /tmp/turnout-apt.log)"; exit 1; }
done
