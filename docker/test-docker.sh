#!/usr/bin/env bash
# `make test-docker`: the tests marked docker against real containers, on a bare machine as root.
#
#   1. tools    docker.io, docker-compose, debootstrap (+ qemu-user-static, binfmt-support for
#               ARM64=1), installed with apt-get when missing
#   2. engine   the running dockerd when one answers; else one of our own (overlay2, bridge and
#               address pool inside 10.213.0.0/16, its own pidfile, exec-root and data-root)
#   3. images   docker/images.sh (wheelhouse, debootstrap base, demuon:latest,
#               demuon-mosquitto:latest; demuon:arm64 with ARM64=1), reusing what is present
#   4. tests    pytest -m docker tests/docker (test_arm64.py only with ARM64=1)
#   5. cleanup  on exit, failure or Ctrl-C: the containers, networks and volumes of this run, the
#               images this run made (tags that were not there before), our dockerd and its
#               data-root
# Each stage prints its time. Environment: VENV (default .venv), ARM64=1, PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
arm64=${ARM64:-0}
run_id=${DEMUON_TEST_RUN_ID:-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export DEMUON_TEST_RUN_ID=$run_id
state=${TMPDIR:-/tmp}/demuon-test-docker.$run_id
own_root=/var/lib/demuon-test-docker.$run_id
mkdir -p "$state"
started_daemon=0
total_start=$SECONDS
tags=(demuon-base:bookworm-amd64 demuon:latest demuon-mosquitto:latest)
[[ $arm64 == 1 ]] && tags+=(demuon-base:bookworm-arm64 demuon:arm64)

stage_name=''
stage_start=0
stage() { # stage NAME: print the previous stage's time and start a new one
  [[ -z $stage_name ]] || echo "== $stage_name: $((SECONDS - stage_start)) s"
  stage_name=$1
  stage_start=$SECONDS
  echo "== $stage_name"
}

child=0
run() { # run CMD...: CMD in a process group of its own, so that Ctrl-C reaches this script at once
  setsid "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=0
  return "$rc"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if ((child)); then # an interrupted stage: stop it and everything it started
    kill -TERM -- -"$child" 2>/dev/null
    for _ in $(seq 40); do kill -0 -- -"$child" 2>/dev/null || break; sleep 0.5; done # its own cleanups
    kill -KILL -- -"$child" 2>/dev/null
  fi
  stage cleanup
  if docker info >/dev/null 2>&1; then
    # what the tests made: labelled demuon.test=<run id>, or a compose project dt<run id>...
    docker ps -aq --filter "label=demuon.test=$run_id" | xargs -r docker rm -f -v >/dev/null
    docker ps -a --format '{{.ID}} {{.Label "com.docker.compose.project"}}' |
      awk -v p="dt$run_id" 'index($2, p) == 1 {print $1}' | xargs -r docker rm -f -v >/dev/null
    docker volume ls -q --filter "label=demuon.test=$run_id" | xargs -r docker volume rm -f >/dev/null
    docker volume ls --format '{{.Name}} {{.Label "com.docker.compose.project"}}' |
      awk -v p="dt$run_id" 'index($2, p) == 1 {print $1}' | xargs -r docker volume rm -f >/dev/null
    docker network ls -q --filter "label=demuon.test=$run_id" | xargs -r docker network rm >/dev/null
    docker network ls --format '{{.Name}}' | awk -v p="dt$run_id" 'index($1, p) == 1' |
      xargs -r docker network rm >/dev/null
    if ((started_daemon == 0)); then
      # images: the tags this run made, and the untagged images (build stages) it left
      for tag in "${tags[@]}"; do
        grep -qx "$tag" "$state/tags-before" 2>/dev/null || docker rmi -f "$tag" >/dev/null 2>&1
      done
      comm -13 <(sort -u "$state/images-before" 2>/dev/null) <(docker images -q -f dangling=true | sort -u) |
        xargs -r docker rmi -f >/dev/null 2>&1
    fi
  fi
  if ((started_daemon)); then
    local pid
    pid=$(cat "$state/dockerd.bgpid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    # containerd-shim mounts are gone with the daemon; the data-root holds only our images
    grep " $own_root" /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$own_root" /run/demuon-test-docker."$run_id"
    # dockerd leaves its bridge and its iptables chains and rules behind: back to what was there
    [[ -e $state/docker0-before ]] || ip link delete docker0 2>/dev/null
    [[ -s $state/iptables-before ]] && iptables-restore <"$state/iptables-before"
  fi
  rm -rf "$state"
  echo "== cleanup: $((SECONDS - stage_start)) s"
  echo "== make test-docker: $((SECONDS - total_start)) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stage tools
need=()
command -v docker >/dev/null 2>&1 || need+=(docker.io)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [[ $arm64 == 1 ]]; then
  command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
fi
if ((${#need[@]})); then
  echo "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" iptables ca-certificates >/dev/null
fi
[[ $arm64 == 1 ]] && docker/binfmt.sh arm64

stage engine
if timeout 20 docker info >/dev/null 2>&1; then
  echo "using the running engine ($(docker version --format '{{.Server.Version}}'))"
else
  echo "starting dockerd (data-root $own_root)"
  mkdir -p "$own_root" /run/demuon-test-docker."$run_id"
  ip link show docker0 >/dev/null 2>&1 && touch "$state/docker0-before"
  if command -v iptables-save >/dev/null 2>&1; then iptables-save >"$state/iptables-before"; fi
  # setsid: a Ctrl-C of the terminal must not stop the daemon before the cleanup has used it
  setsid dockerd --storage-driver overlay2 \
    --bip 10.213.251.1/24 --default-address-pool base=10.213.128.0/17,size=24 \
    --data-root "$own_root" --exec-root /run/demuon-test-docker."$run_id" \
    --pidfile "$state/dockerd.pid" -H unix:///var/run/docker.sock >"$state/dockerd.log" 2>&1 &
  echo $! >"$state/dockerd.bgpid"
  started_daemon=1
  for _ in $(seq 120); do
    timeout 5 docker info >/dev/null 2>&1 && break
    kill -0 "$(cat "$state/dockerd.bgpid")" 2>/dev/null || break
    sleep 0.5
  done
  if ! timeout 5 docker info >/dev/null 2>&1; then
    tail -n 20 "$state/dockerd.log" >&2
    echo "dockerd did not start (log above)" >&2
    exit 1
  fi
fi
docker images --format '{{.Repository}}:{{.Tag}}' >"$state/tags-before"
docker images -aq >"$state/images-before"

stage images
export ARM64=$arm64 VENV=$venv
run docker/images.sh

stage tests
args=(-m docker -p no:cacheprovider)
[[ $arm64 == 1 ]] || args+=(--ignore=tests/docker/test_arm64.py)
rc=0
# shellcheck disable=SC2086 # PYTEST_ARGS: words on purpose
run "$venv/bin/python" -m pytest "${args[@]}" ${PYTEST_ARGS:-} tests/docker || rc=$?
((rc != 5)) || echo "no test marked docker was collected in tests/docker" >&2
exit "$rc"
