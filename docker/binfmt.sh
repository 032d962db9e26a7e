#!/usr/bin/env bash
# Make the kernel run ARCH binaries (default arm64) through qemu-user-static: mount binfmt_misc
# when it is not mounted and enable the qemu handler. The handler is registered with the F flag
# (qemu-user-static's default), so containers use it without qemu inside their file system.
set -euo pipefail
arch=${1:-arm64}
case $arch in
  arm64) handler=qemu-aarch64 ;;
  *) handler=qemu-$arch ;;
esac
dir=/proc/sys/fs/binfmt_misc
[[ -e $dir/register ]] || mount binfmt_misc -t binfmt_misc "$dir"
if ! grep -qx enabled "$dir/$handler" 2>/dev/null; then
  update-binfmts --enable "$handler"
fi
grep -qx enabled "$dir/$handler" || {
  echo "binfmt: $handler is not enabled (is qemu-user-static installed?)" >&2
  exit 1
}
