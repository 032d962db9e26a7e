#!/usr/bin/env bash
# `make image`: the wheelhouse, the debootstrap base (when BASE is not present), demuon:latest and
# demuon-mosquitto:latest; with ARM64=1 also demuon:arm64 (linux/arm64, under qemu-user-static).
# Rebuilds reuse the engine's layer cache: a source change rebuilds only the project's own layer.
#
# Environment: VENV (default .venv), ARM64=1, ARM64_ONLY=1 (only demuon:arm64), BASE (default
# demuon-base:bookworm-amd64, made here when missing; a registry image such as python:3.11-slim
# is used as it is), BASE_ARM64 (default demuon-base:bookworm-arm64), BROKER_BASE (default: BASE).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
base=${BASE:-demuon-base:bookworm-amd64}
base_arm64=${BASE_ARM64:-demuon-base:bookworm-arm64}
broker_base=${BROKER_BASE:-$base}
export DOCKER_BUILDKIT=0 # the classic builder: no buildx plugin needed (Debian's docker.io has none)

step() { # step NAME CMD...: run CMD and print how long it took
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "-- $name: $((SECONDS - start)) s"
}

local_base() { # local_base ARCH TAG: make TAG with debootstrap unless present (or not ours)
  if [[ $2 == demuon-base:* ]]; then
    docker/base.sh "$1" "$2"
  fi
}

build() { # build PLATFORM TAG DOCKERFILE BUILD-ARG...
  local platform=$1 tag=$2 file=$3
  shift 3
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  local log
  log=$(mktemp)
  if ! docker build --platform "$platform" -f "$file" "${args[@]}" -t "$tag" . >"$log" 2>&1; then
    grep -v -e 'is ignored: it is neither' "$log" | tail -n 30 >&2
    rm -f "$log"
    echo "image $tag: docker build failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
  echo "$tag: $(docker image inspect --format '{{.Architecture}} {{.Size}}' "$tag" | awk '{printf "%s, %.0f MB", $1, $2/1e6}')"
}

if [[ ${ARM64_ONLY:-0} != 1 ]]; then
  step "wheels amd64" docker/wheels.sh amd64
  step "base amd64" local_base amd64 "$base"
  step "demuon:latest" build linux/amd64 demuon:latest docker/Dockerfile \
    "BASE=$base" WHEELS=build/wheels-amd64
  step "demuon-mosquitto:latest" build linux/amd64 demuon-mosquitto:latest docker/mosquitto.Dockerfile \
    "BASE=$broker_base"
fi
if [[ ${ARM64:-0} == 1 || ${ARM64_ONLY:-0} == 1 ]]; then
  step "wheels arm64" docker/wheels.sh arm64
  docker/binfmt.sh arm64
  step "base arm64" local_base arm64 "$base_arm64"
  step "demuon:arm64" build linux/arm64 demuon:arm64 docker/Dockerfile \
    "BASE=$base_arm64" WHEELS=build/wheels-arm64
fi
