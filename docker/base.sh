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
ctx=$rootfs.ctx
remove() { # an interrupted debootstrap leaves /proc and /sys mounted in the rootfs
  { grep -o " $rootfs/[^ ]*" /proc/mounts || true; } | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$rootfs" "$ctx"
  ((keep_log)) || rm -f "$rootfs.log"
}
keep_log=0
trap remove EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start=$SECONDS
echo "base $tag: debootstrap $suite $arch (minbase + $packages)"
if ! debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" \
  >"$rootfs.log" 2>&1; then
  tail -n 20 "$rootfs.log" >&2
  keep_log=1
  echo "base $tag: debootstrap failed (log above, kept in $rootfs.log)" >&2
  exit 1
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
# `docker build FROM scratch` rather than `docker import`: the engine (20.10) records the
# architecture of an imported image as its own, a build with --platform records ARCH.
mkdir -p "$ctx"
tar -C "$rootfs" --numeric-owner -cf "$ctx/rootfs.tar" .
rm -rf "$rootfs"
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q --platform "linux/$arch" -t "$tag" "$ctx" >/dev/null 2>"$ctx/build.log" || {
  cat "$ctx/build.log" >&2
  exit 1
}
echo "base $tag: made in $((SECONDS - start)) s"
