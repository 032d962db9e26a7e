"""Fixtures of the tests that run demuon in containers (marker ``docker``, run by ``make test-docker``,
which installs the engine, builds the images and cleans up; never part of ``make test``).

A test module marks itself ``pytestmark = pytest.mark.docker``. Nothing is skipped: without an engine
or an image a test fails with one line saying what is missing and how to get it.

Fixtures (session scope unless said otherwise):

``docker`` (:class:`Docker`)
    ``docker("run", "--rm", images.peer, "demuon", "--version")`` runs ``docker ARGS`` and returns its
    stdout (``timeout=`` seconds, default 120); a non-zero exit or a timeout fails the test with the
    command and the last lines of its stderr. ``docker.attempt(...)`` returns the
    :class:`subprocess.CompletedProcess` whatever the exit code. ``docker.compose(...)`` and
    ``docker.compose_attempt(...)`` do the same for ``docker-compose`` (Compose v1: Debian has no
    ``docker compose``). ``docker.remove_labelled("k=v")`` removes what carries a label.
    The first call checks that the engine answers and that its networks lie in 10.213.0.0/16
    (``make test-docker`` starts a daemon so); otherwise it fails.

``images`` (:class:`Images`)
    The tags under test: ``images.peer`` (``demuon:latest``), ``images.peer_arm64``
    (``demuon:arm64``), ``images.broker`` (``demuon-mosquitto:latest``); the environment variables
    ``DEMUON_TEST_IMAGE``, ``DEMUON_TEST_IMAGE_ARM64``, ``DEMUON_TEST_BROKER_IMAGE`` name others.
    ``images.require(tag)`` fails when the engine lacks ``tag`` (build it: ``make image``) and
    returns it.

``run_id`` (str)
    Unique to this pytest session (``DEMUON_TEST_RUN_ID`` when ``make test-docker`` sets it): every
    container, network and volume a test makes carries the label ``demuon.test=<run_id>``
    (:data:`LABEL`), and compose project names start with ``dt<run_id>``, so the harness can remove
    whatever a killed test left.

``compose_project`` (function scope, :class:`ComposeProject`)
    A unique compose project name (``project.name``) and a file path for the test to write its
    compose file to (``project.file``, in the test's tmp_path). ``project("up", "-d")`` runs
    ``docker-compose -p NAME -f FILE up -d``. At teardown, pass or fail, it runs
    ``docker-compose -p NAME -f FILE down -v --remove-orphans`` and then removes any container,
    network or volume still labelled with the project.

``sandbox`` (function scope, :class:`Sandbox`)
    For tests with plain ``docker run``: ``sandbox.network()`` creates a bridge network on a free
    10.213.64-127.x/24 subnet and returns its name; ``sandbox.run(image, *cmd, name=..., network=...,
    env=..., files={"/config/x.toml": host_path}, opts=[...])`` starts a detached container (files
    copied in first) and returns its id; ``sandbox.wait(cid,
    timeout)`` returns its exit code; ``sandbox.logs(cid)``; ``sandbox.copy_out(cid, src, dst)``.
    Everything it made is removed at teardown (containers, then volumes, then networks).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LABEL = "demuon.test"
DEFAULT_TIMEOUT_S = 120.0
ALLOWED_NET = ipaddress.ip_network("10.213.0.0/16")
#: Subnets ``sandbox.network()`` picks from: below the daemon's default pool (10.213.128.0/17).
SANDBOX_SUBNETS = [ipaddress.ip_network(f"10.213.{x}.0/24") for x in range(64, 128)]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Docker:
    """Runs ``docker`` / ``docker-compose`` commands for the tests (see the module docstring)."""

    def __init__(self) -> None:
        self._checked = False

    def _exec(self, argv: Sequence[str], timeout: float, check: bool) -> subprocess.CompletedProcess[str]:
        if shutil.which(argv[0]) is None:
            pytest.fail(f"{argv[0]} is not installed (make test-docker installs it)", pytrace=False)
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            pytest.fail(f"timed out after {timeout:g} s: {' '.join(argv)}\n{_tail(err)}", pytrace=False)
        if check and proc.returncode != 0:
            pytest.fail(
                f"exit {proc.returncode}: {' '.join(argv)}\n{_tail(proc.stderr or proc.stdout)}",
                pytrace=False,
            )
        return proc

    def engine(self) -> None:
        """Fail unless the engine answers and its bridge and address pools lie in 10.213.0.0/16."""
        if self._checked:
            return
        proc = self._exec(["docker", "info", "--format", "{{json .DefaultAddressPools}}"], 30, False)
        if proc.returncode != 0:
            pytest.fail(
                f"no Docker engine answers ({_tail(proc.stderr, 1)}): run `make test-docker`", pytrace=False
            )
        pools = [p["Base"] for p in json.loads(proc.stdout or "null") or []]
        bridge = self._exec(
            ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"], 30, True
        ).stdout
        subnets = pools + [c["Subnet"] for c in json.loads(bridge or "null") or []]
        outside = [s for s in subnets if not ipaddress.ip_network(s).subnet_of(ALLOWED_NET)]  # type: ignore[arg-type]
        if not pools or outside:
            pytest.fail(
                f"the Docker engine's networks {outside or 'default pools (none set)'} are not inside "
                f"{ALLOWED_NET}: start dockerd with --bip and --default-address-pool there "
                "(make test-docker does)",
                pytrace=False,
            )
        self._checked = True

    def __call__(self, *args: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """``docker ARGS``'s stdout; a non-zero exit or a timeout fails the test."""
        self.engine()
        return self._exec(["docker", *args], timeout, True).stdout

    def attempt(self, *args: str, timeout: float = DEFAULT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` whatever its exit code (a timeout still fails the test)."""
        self.engine()
        return self._exec(["docker", *args], timeout, False)

    def compose(self, *args: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """``docker-compose ARGS``'s stdout; a non-zero exit or a timeout fails the test."""
        self.engine()
        return self._exec(["docker-compose", *args], timeout, True).stdout

    def compose_attempt(
        self, *args: str, timeout: float = DEFAULT_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """``docker-compose ARGS`` whatever its exit code."""
        self.engine()
        return self._exec(["docker-compose", *args], timeout, False)

    def quiet(self, *args: str, timeout: float = 60) -> None:
        """``docker ARGS`` for cleanup: never fails (the resource may be gone already)."""
        try:
            subprocess.run(["docker", *args], capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def remove_labelled(self, label: str) -> None:
        """Remove every container, then volume and network, carrying ``label`` (``k=v``)."""
        for listing, remove in (
            (["ps", "-aq"], ["rm", "-f", "-v"]),
            (["volume", "ls", "-q"], ["volume", "rm", "-f"]),
            (["network", "ls", "-q"], ["network", "rm"]),
        ):
            proc = subprocess.run(
                ["docker", *listing, "--filter", f"label={label}"],
                capture_output=True,
                text=True,
                check=False,
            )
            ids = proc.stdout.split()
            if ids:
                self.quiet(*remove, *ids)


@dataclass(frozen=True)
class Images:
    peer: str
    peer_arm64: str
    broker: str
    docker: Docker

    def require(self, tag: str) -> str:
        """``tag`` when the engine has it; else the test fails with one line."""
        proc = self.docker.attempt("image", "inspect", "--format", "{{.Architecture}}", tag)
        if proc.returncode != 0:
            pytest.fail(
                f"image {tag} is missing: build it with `make image` (or run `make test-docker`)",
                pytrace=False,
            )
        return tag


@dataclass
class ComposeProject:
    name: str
    file: Path
    docker: Docker

    def __call__(self, *args: str, timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """``docker-compose -p NAME -f FILE ARGS``'s stdout (fails the test on an error)."""
        return self.docker.compose("-p", self.name, "-f", str(self.file), *args, timeout=timeout)

    def down(self) -> None:
        if self.file.is_file():
            self.docker.compose_attempt(
                "-p",
                self.name,
                "-f",
                str(self.file),
                "down",
                "-v",
                "--remove-orphans",
                "--timeout",
                "5",
                timeout=180,
            )
        self.docker.remove_labelled(f"com.docker.compose.project={self.name}")


@dataclass
class Sandbox:
    docker: Docker
    run_id: str
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def _label(self) -> list[str]:
        return ["--label", f"{LABEL}={self.run_id}"]

    def network(self) -> str:
        """A new bridge network on a free 10.213.64-127.x/24 subnet (its name)."""
        name = f"dt{self.run_id}-{uuid.uuid4().hex[:6]}"
        start = int(uuid.uuid4().int % len(SANDBOX_SUBNETS))
        last = ""
        for k in range(len(SANDBOX_SUBNETS)):
            subnet = SANDBOX_SUBNETS[(start + k) % len(SANDBOX_SUBNETS)]
            proc = self.docker.attempt("network", "create", *self._label(), "--subnet", str(subnet), name)
            if proc.returncode == 0:
                self.networks.append(name)
                return name
            last = proc.stderr.strip()
            if "overlap" not in last:
                break
        pytest.fail(f"docker network create {name} failed: {last}", pytrace=False)

    def volume(self) -> str:
        name = self.docker("volume", "create", *self._label()).strip()
        self.volumes.append(name)
        return name

    def run(
        self,
        image: str,
        *cmd: str,
        name: str | None = None,
        network: str | None = None,
        env: Mapping[str, str] | None = None,
        files: Mapping[str, Path] | None = None,
        opts: Sequence[str] = (),
    ) -> str:
        """Start ``image cmd`` detached and return the container id (removed at teardown). ``name``:
        its hostname and its alias on ``network`` (the container name adds the run id); ``files``:
        ``{path in the container: host file}`` copied in before it starts (no bind mount: the
        host's tmp folders are not readable by the image's user)."""
        argv = ["create", *self._label()]
        if name:
            argv += ["--name", f"dt{self.run_id}-{name}", "--hostname", name]
        if network:
            argv += ["--network", network]
            if name:
                argv += ["--network-alias", name]
        for k, v in (env or {}).items():
            argv += ["-e", f"{k}={v}"]
        cid = self.docker(*argv, *opts, image, *cmd, timeout=180).strip()
        self.containers.append(cid)
        for inside, host in (files or {}).items():
            self.docker("cp", str(host), f"{cid}:{inside}")
        self.docker("start", cid)
        return cid

    def wait(self, cid: str, timeout: float) -> int:
        """The container's exit code (fails the test if it runs past ``timeout`` seconds)."""
        return int(self.docker("wait", cid, timeout=timeout).strip())

    def logs(self, cid: str, lines: int = 40) -> str:
        proc = self.docker.attempt("logs", "--tail", str(lines), cid)
        return proc.stdout + proc.stderr

    def copy_out(self, cid: str, src: str, dst: Path) -> Path:
        self.docker("cp", f"{cid}:{src}", str(dst))
        return dst

    def close(self) -> None:
        if self.containers:
            self.docker.quiet("rm", "-f", "-v", *self.containers)
        for v in self.volumes:
            self.docker.quiet("volume", "rm", "-f", v)
        for n in self.networks:
            self.docker.quiet("network", "rm", n)


@pytest.fixture(scope="session")
def docker() -> Docker:
    return Docker()


@pytest.fixture(scope="session")
def run_id() -> str:
    return os.environ.get("DEMUON_TEST_RUN_ID") or uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def images(docker: Docker) -> Images:
    env = os.environ
    return Images(
        peer=env.get("DEMUON_TEST_IMAGE", "demuon:latest"),
        peer_arm64=env.get("DEMUON_TEST_IMAGE_ARM64", "demuon:arm64"),
        broker=env.get("DEMUON_TEST_BROKER_IMAGE", "demuon-mosquitto:latest"),
        docker=docker,
    )


@pytest.fixture
def compose_project(docker: Docker, run_id: str, tmp_path: Path) -> Iterator[ComposeProject]:
    project = ComposeProject(
        name=f"dt{run_id}{uuid.uuid4().hex[:6]}", file=tmp_path / "docker-compose.yml", docker=docker
    )
    try:
        yield project
    finally:
        project.down()


@pytest.fixture
def sandbox(docker: Docker, run_id: str) -> Iterator[Sandbox]:
    box = Sandbox(docker=docker, run_id=run_id)
    try:
        yield box
    finally:
        box.close()
