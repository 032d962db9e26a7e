#!/usr/bin/env bash
# The wheelhouse an image installs from (no index inside the build: see docker/Dockerfile).
#
#   docker/wheels.sh amd64|arm64|cuda      (run from the repository root, after `make setup`)
#
#   build/dist/demuon-*.whl      the project's own wheel (pure Python: every architecture)
#   build/wheels-amd64/          runtime dependencies resolved with constraints.txt by `pip wheel`
#                                (torch: the CPU build, from the local package store)
#   build/wheels-arm64/          the same names and versions as wheels-amd64, downloaded from PyPI
#                                for manylinux aarch64 / cp311 with --no-deps, except torch:
#                                ARM64_TORCH (default 2.10.0, PyPI's newest CPU-only aarch64 build
#                                inside torch>=2.3,<3; 2.11 and later pull CUDA wheels there)
#   build/wheels-cuda/           like wheels-amd64 but torch from PyPI (the CUDA build and its
#                                nvidia-* wheels, several GB)
# Each wheelhouse holds the constraints it was made with (constraints.txt). A wheelhouse whose
# inputs (constraints.txt, pyproject.toml, this script) are older than it is kept as it is.
set -euo pipefail

kind=${1:?usage: docker/wheels.sh amd64|arm64|cuda}
venv=${VENV:-.venv}
pip=("$venv/bin/python" -m pip)
arm64_torch=${ARM64_TORCH:-2.10.0}
dist=build/dist
out=build/wheels-$kind
start=$SECONDS

fresh() { # fresh DIR: DIR's stamp is newer than every input
  [[ -e $1/.stamp ]] && [[ $1/.stamp -nt constraints.txt && $1/.stamp -nt pyproject.toml && $1/.stamp -nt "$0" ]]
}

quiet() { # quiet CMD...: run CMD, show its output only when it fails
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    grep -v 'is ignored: it is neither' "$log" | tail -n 30 >&2
    rm -f "$log"
    echo "wheels: failed: $*" >&2
    return 1
  fi
  rm -f "$log"
}

project_wheel() {
  # setuptools' build/lib keeps files of deleted modules: start from an empty one
  rm -rf "$dist" build/lib build/bdist.* && mkdir -p "$dist"
  quiet "${pip[@]}" wheel --no-deps --no-build-isolation . -w "$dist"
}

# name==version for every wheel in a folder (wheel names: NAME-VERSION-TAGS.whl)
pins_of() {
  for f in "$1"/*.whl; do
    f=${f##*/}
    echo "${f%%-*}==$(cut -d- -f2 <<<"$f" | sed 's/+.*//')"
  done
}

project_wheel
if fresh "$out"; then
  echo "wheels $out: up to date ($(du -sh "$out" | cut -f1))"
  exit 0
fi
rm -rf "$out" && mkdir -p "$out"
case $kind in
  amd64)
    quiet "${pip[@]}" wheel -c constraints.txt "$dist"/demuon-*.whl -w "$out"
    rm -f "$out"/demuon-*.whl
    cp constraints.txt "$out/constraints.txt"
    ;;
  arm64)
    [[ -e build/wheels-amd64/.stamp ]] || "$0" amd64
    pins_of build/wheels-amd64 | sed "s/^torch==.*/torch==$arm64_torch/" >"$out/requirements.txt"
    sed "s/^torch==.*/torch==$arm64_torch/" constraints.txt >"$out/constraints.txt"
    # --no-deps: pip evaluates markers for the host, so resolving torch here would ask for its
    # x86_64-only CUDA wheels; the list is the amd64 resolution already.
    PIP_CONSTRAINT='' PIP_FIND_LINKS='' PIP_EXTRA_INDEX_URL='' quiet "${pip[@]}" download --no-deps \
      --only-binary=:all: --implementation cp --python-version 3.11 \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
      -r "$out/requirements.txt" -d "$out"
    ;;
  cuda)
    PIP_CONSTRAINT='' PIP_FIND_LINKS='' PIP_EXTRA_INDEX_URL='' \
      quiet "${pip[@]}" wheel -c constraints.txt "$dist"/demuon-*.whl -w "$out"
    rm -f "$out"/demuon-*.whl
    cp constraints.txt "$out/constraints.txt"
    ;;
  *)
    echo "wheels: unknown kind '$kind' (amd64, arm64 or cuda)" >&2
    exit 2
    ;;
esac
touch "$out/.stamp"
echo "wheels $out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), $((SECONDS - start)) s"
