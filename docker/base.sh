#!/usr/bin/env bash
# A Debian bookworm base image made without a registry: debootstrap (minbase + python3,
# python3-venv, ca-certificates) into a temporary folder, then an image of it (FROM scratch).
#
#   docker/base.sh ARCH TAG       ARCH: amd64 | arm64; TAG e.g. demuon-base:bookworm-amd64
#
# Does nothing when TAG is present already. A foreign ARCH (arm64 on x86_64) runs the second stage
# under qemu-user-static through binfmt_misc (enabled here when it is not). Needs root.
set -euo pipefail

arch=${1:?usage: docker/base.sh ARCH TAG}
tag=${2:?usage: docker/base.sh ARCH TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=${DEBIAN_SUITE:-bookworm}
packages=python3,python3-venv,ca-certificates

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base $tag: present"
  exit 0
fi

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
host_arch=$(dpkg --print-architecture)
if [[ $arch != "$host_arch" ]]; then
  command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
fi
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ $arch != "$host_arch" ]]; then
  docker/binfmt.sh "$arch"
fi

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/demuon-rootfs-$arch.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
start=$SECONDS
echo "base $tag: debootstrap $suite $arch (minbase + $packages)"
if ! debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" \
  >"$rootfs.log" 2>&1; then
  tail -n 20 "$rootfs.log" >&2
  echo "base $tag: debootstrap failed (log above, full log $rootfs.log)" >&2
  exit 1
fi
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
# `docker build FROM scratch` rather than `docker import`: the engine (20.10) records the
# architecture of an imported image as its own, a build with --platform records ARCH.
ctx=$rootfs.ctx
mkdir -p "$ctx"
trap 'rm -rf "$rootfs" "$ctx"' EXIT
tar -C "$rootfs" --numeric-owner -cf "$ctx/rootfs.tar" .
rm -rf "$rootfs"
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q --platform "linux/$arch" -t "$tag" "$ctx" >/dev/null 2>"$ctx/build.log" || {
  cat "$ctx/build.log" >&2
  exit 1
}
echo "base $tag: made in $((SECONDS - start)) s"
