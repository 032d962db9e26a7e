# The two commands: `make demo` and `make test`. Both do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow lint typecheck bench broker netns-tools deploy-tools cc clean setup \
	image image-arm64 wheels test-docker test-docker-arm64

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

# The MQTT broker that telemetry tests talk to and its command-line client (Debian's mosquitto and
# mosquitto-clients, installed when missing).
broker:
	@{ command -v mosquitto >/dev/null 2>&1 || command -v /usr/sbin/mosquitto >/dev/null 2>&1; } && \
	  command -v mosquitto_sub >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }

# What `demuon netlab` and the namespace tests use: iproute2 (ip, tc) and iptables (--loss).
netns-tools:
	@{ command -v /usr/sbin/ip && command -v /usr/sbin/tc && command -v iptables; } >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables >/dev/null; }

# The C compiler that builds the stochastic block quantization kernel on first use
# (demuon/transport/native.py; without one the torch path runs, and the tests of the native path
# need it).
cc:
	@command -v cc >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; }

# What the deploy tests check generated files with: Debian's docker-compose (Compose v1) runs
# `docker-compose config` on the files `demuon compose` writes (no engine needed for that).
deploy-tools:
	@command -v docker-compose >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }

demo: $(STAMP)
	$(PY) -m demuon demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check demuon tests bench
	$(VENV)/bin/ruff format --check demuon tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two pytest workers: the multi-process tests mostly wait (process start, deadlines) while the
# other worker runs unit tests. Tests marked slow run sequentially in `make test-slow`.
test: $(STAMP) broker netns-tools deploy-tools cc lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal

test-slow: $(STAMP) broker netns-tools cc
	$(PY) -m pytest -q -p no:cacheprovider -m slow

# Container images without a registry (docker/images.sh): the wheelhouse build/wheels-amd64 and the
# project's wheel build/dist, a Debian bookworm base made with debootstrap when BASE is not present
# (default demuon-base:bookworm-amd64; BASE=python:3.11-slim with a registry), then demuon:latest
# and demuon-mosquitto:latest. image-arm64: demuon:arm64 under qemu-user-static (slow: minutes).
image: $(STAMP)
	VENV=$(VENV) docker/images.sh

image-arm64: $(STAMP)
	ARM64_ONLY=1 VENV=$(VENV) docker/images.sh

# The wheelhouse alone: VARIANT=amd64 (default), arm64, or cuda (PyPI's CUDA torch, several GB).
VARIANT ?= amd64
wheels: $(STAMP)
	VENV=$(VENV) docker/wheels.sh $(VARIANT)

# The tests marked docker (tests/docker) against real containers, on a bare machine as root:
# installs the engine when missing, starts a dockerd when none answers, builds the images, and
# removes at the end what the run made (docker/test-docker.sh). test-docker-arm64 adds the mixed
# amd64/arm64 cluster (an arm64 base and image built and run under qemu: slow).
test-docker: $(STAMP)
	VENV=$(VENV) docker/test-docker.sh

test-docker-arm64: $(STAMP)
	ARM64=1 VENV=$(VENV) docker/test-docker.sh

bench: $(STAMP)
	$(PY) bench/algorithms.py
	$(PY) bench/wire.py
	$(PY) bench/cluster.py
	$(PY) bench/faults.py

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
