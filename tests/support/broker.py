"""A real mosquitto broker on loopback for tests (started per test, killed in a finally)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
DEADLINE_S = 10.0


@pytest.fixture
def mosquitto_installed() -> None:
    """A missing broker is a failed set-up, never a silent skip: `make test` installs it."""
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed: run `make broker` (make test does)")


needs_broker = pytest.mark.usefixtures("mosquitto_installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_listener(port: int, proc: subprocess.Popen[bytes], deadline_s: float = DEADLINE_S) -> None:
    """Return once something accepts TCP connections on ``port`` (bounded; fails if the broker died)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return
        proc_wait_briefly(proc)
    raise TimeoutError(f"mosquitto did not listen on {port} within {deadline_s}s")


def proc_wait_briefly(proc: subprocess.Popen[bytes]) -> None:
    """Back off between connection attempts by waiting on the broker's own exit (bounded)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=0.05)


@contextlib.contextmanager
def mosquitto(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    assert MOSQUITTO is not None
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_listener(port, proc)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=DEADLINE_S)
