"""Operator mistakes end the command with one ``error: ...`` line on stderr naming what to fix
(a file, a field and its value, an endpoint), exit status 2 and no traceback: a port another
process holds, a config file that cannot be read, is not UTF-8 or not TOML, a bad host."""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demuon.app import cli
from demuon.config import load_config
from demuon.errors import ConfigError
from tests.support.configs import tiny_cluster_toml

TINY = tiny_cluster_toml(rounds=1, phase_timeout_s=1.0)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket holds (listening) for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


#: A record of ``demuon run``'s log (also in its log.txt): ``<date> <time> peer-<id> LEVEL name: ...``.
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} peer-\d+ (?P<level>[A-Z]+) ")


def error_line(capsys: pytest.CaptureFixture[str], *, peer_log: bool = False) -> str:
    """The one line the command wrote (to stderr, starting with ``error:``); nothing else. With
    ``peer_log`` (the command got as far as ``demuon run``'s logging), the peer's own info and
    warning records may come before it, but no error record (a run failure) and no traceback."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    if peer_log:
        records = [m for line in lines[:-1] if (m := LOG_RECORD.match(line))]
        assert len(records) == len(lines) - 1, err
        assert all(m["level"] in ("INFO", "WARNING") for m in records), err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------- a port that is taken


def test_run_on_a_taken_port_fails_at_once_in_one_line(
    tiny: Path, tmp_path: Path, held_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"tcp://127.0.0.1:{held_port}"
    peers = f'[{{id = 0, endpoint = "{endpoint}"}}, {{id = 1, endpoint = "tcp://127.0.0.1:{held_port}"}}]'
    argv = ["run", "--config", str(tiny), "--peer", "0", "--out", str(tmp_path / "peer-0")]
    began = time.monotonic()
    code = cli.main([*argv, "--set", f"network.peers={peers}"])
    assert time.monotonic() - began < 5.0  # no start or phase deadline waited out
    assert code == 2
    line = error_line(capsys, peer_log=True)
    assert line == f"error: cannot bind {endpoint}: Address already in use (is another peer running?)"


# ------------------------------------------------------------------ config files that are bad


def test_a_missing_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert cli.main(["run", "--config", str(path), "--peer", "0"]) == 2
    assert error_line(capsys) == f"error: config={str(path)!r}: no such file"


def test_a_folder_given_as_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cluster.toml"
    folder.mkdir()
    assert cli.main(["simulate", "--config", str(folder)]) == 2
    assert error_line(capsys) == f"error: config={str(folder)!r}: is a directory, not a file"


def test_an_unreadable_config_file_is_one_line(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # what the OS raises for a file without read permission (chmod is no test under root)
    read_bytes = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self == tiny:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert cli.main(["launch", "--config", str(tiny), "--out", str(tiny.parent / "out")]) == 2
    assert error_line(capsys) == f"error: config={str(tiny)!r}: cannot read: Permission denied"


def test_a_binary_config_file_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"peers = 4\n\x80\x02}q\x00(X\x05\x00\x00\x00")
    assert cli.main(["run", "--config", str(path), "--peer", "0"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: config={str(path)!r}: not UTF-8 text (byte 0x80 on line 2)")


def test_a_binary_fault_plan_is_one_line_naming_the_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "faults.toml"
    plan.write_bytes(b"\xff\xfeseed = 1\n")
    assert cli.main(["simulate", "--config", str(tiny), "--faults", str(plan)]) == 2
    assert error_line(capsys).startswith(
        f"error: --faults={str(plan)!r}: not UTF-8 text (byte 0xff on line 1)"
    )


def test_invalid_toml_is_one_line_with_the_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text("peers = 4\n[network\nhost = 1\n")
    assert cli.main(["run", "--config", str(path), "--peer", "0"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: config={str(path)!r}: not valid TOML: ")
    assert line.endswith("(at line 2, column 9)")


# ------------------------------------------------------------------------------ bad addresses


@pytest.mark.parametrize("host", ["256.1.1.1", "10.0.0", "peer 0", "-peer", "*", ""])
def test_a_bad_host_fails_at_load_naming_the_field_and_value(
    tiny: Path, host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--config", str(tiny), "--peer", "0", "--set", f'network.host="{host}"']) == 2
    assert error_line(capsys) == f"error: network.host={host!r}: not an IPv4/IPv6 address or host name"


@pytest.mark.parametrize(
    "host", ["peer-0", "localhost", "demuon-peer-3.demuon", "0.0.0.0", "::1", "10.1.2.3"]
)
def test_addresses_and_host_names_are_valid_hosts(tiny: Path, host: str) -> None:
    assert load_config(tiny, [f'network.host="{host}"'], environ={}).network.host == host


def peers_at(first: str) -> str:
    return f'network.peers=[{{id = 0, endpoint = "{first}"}}, {{id = 1, endpoint = "tcp://127.0.0.1:7001"}}]'


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("tcp://999.1.1.1:7000", "host '999.1.1.1' is not an IPv4/IPv6 address or host name"),
        ("tcp://[peer-0]:7000", "host '[peer-0]' is not an IPv4/IPv6 address or host name"),
        ("tcp://peer-0:70000", "port '70000' is not a number in 1..65535"),
        ("tcp://peer-0", "expected tcp://HOST:PORT"),
        ("127.0.0.1:7000", "expected a ZeroMQ endpoint such as tcp://HOST:PORT"),
    ],
)
def test_a_bad_peer_endpoint_fails_at_load_naming_it(
    tiny: Path, endpoint: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--config", str(tiny), "--peer", "1", "--set", peers_at(endpoint)]) == 2
    assert error_line(capsys) == f"error: network.peers.0.endpoint={endpoint!r}: {reason}"


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:7000",
        "tcp://peer-0:7000",
        "tcp://demuon-peer-3.demuon:7000",
        "tcp://[::1]:7000",
        "ipc:///tmp/p0",
    ],
)
def test_good_peer_endpoints_load(tiny: Path, endpoint: str) -> None:
    assert load_config(tiny, [peers_at(endpoint)], environ={}).endpoint(0) == endpoint


def test_the_config_error_carries_the_field_and_value(tiny: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["network.host=256.1.1.1"], environ={})
    assert (err.value.field, err.value.value) == ("network.host", "256.1.1.1")
