"""`demuon compose`: the file it writes passes Compose v1's own check (`docker-compose config -q`,
no engine needed) for a plain config, with --mqtt and with security off; the containers read back
the settings it means (endpoints by service name, their own on the wildcard address, keys, broker,
--set overrides); and every setting that could not work in the containers is refused at compose
time with one line naming it, before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from demuon.app import cli, compose
from demuon.config import load_config
from tests.support.cluster import CONFIGS
from tests.support.configs import tiny_cluster_toml

ORACLE = CONFIGS / "oracle-ring4.toml"
DOCKER_COMPOSE = shutil.which("docker-compose")
CHECK_TIMEOUT_S = 60.0


@pytest.fixture
def compose_v1() -> str:
    """A missing docker-compose is a failed set-up, never a silent skip: `make test` installs it."""
    if DOCKER_COMPOSE is None:
        pytest.fail("docker-compose is not installed: run `make deploy-tools` (make test does)")
    return DOCKER_COMPOSE


def v1_accepts(docker_compose: str, path: Path) -> None:
    """`docker-compose -f PATH config -q`: Compose v1 parses and validates the file (exit 0)."""
    done = subprocess.run(
        [docker_compose, "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        cwd=path.parent,
    )
    assert done.returncode == 0, done.stderr


def document(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text().split("\n", 1)[1])  # after the YAML comment line
    return doc


def write(tmp_path: Path, *sets: str, mqtt: bool = False, **options: Any) -> tuple[Path, dict[str, Any]]:
    out, _ = compose.write_compose(
        ORACLE, tmp_path / "deploy" / "docker-compose.yml", overrides=list(sets), mqtt=mqtt, **options
    )
    return out, document(out)


def test_a_plain_config_gives_a_v1_file_with_a_service_volume_and_healthcheck_per_peer(
    tmp_path: Path, compose_v1: str
) -> None:
    out, doc = write(tmp_path, "algorithm.lr=0.07", image="demuon:test", subnet="10.213.7.0/24")
    v1_accepts(compose_v1, out)
    assert doc["version"] == "3.8" and "name" not in doc
    assert sorted(doc["services"]) == [f"peer-{i}" for i in range(4)]
    assert sorted(doc["volumes"]) == [f"runs-peer-{i}" for i in range(4)]
    assert doc["networks"]["default"]["ipam"]["config"] == [{"subnet": "10.213.7.0/24"}]
    assert doc["services"]["peer-0"]["build"]["dockerfile"] == "docker/Dockerfile"
    cluster = out.parent / "cluster.toml"
    assert cluster.read_text() == ORACLE.read_text()
    for i in range(4):
        svc = doc["services"][f"peer-{i}"]
        assert svc["image"] == "demuon:test" and svc["hostname"] == f"peer-{i}"
        assert svc["command"] == [
            *("demuon", "run", "--config", "/config/cluster.toml", "--peer", str(i)),
            *("--out", "/runs", "--resume-if-present"),
        ]
        assert svc["volumes"] == [
            "./cluster.toml:/config/cluster.toml:ro",
            "./keys:/keys:ro",
            f"runs-peer-{i}:/runs",
        ]
        assert svc["restart"] == "on-failure"
        assert svc["healthcheck"]["test"] == ["CMD", "demuon", "health", "--out", "/runs"]
        assert svc["healthcheck"]["start_period"] == "60s"  # start_timeout_s 30 + the start allowance
        config = load_config(cluster, environ=svc["environment"])  # what the container reads
        port = config.network.base_port
        assert config.endpoint(i) == f"tcp://0.0.0.0:{port + i}"  # its own: whatever its address is
        assert [config.endpoint(j) for j in range(4) if j != i] == [
            f"tcp://peer-{j}:{port + j}" for j in range(4) if j != i
        ]
        assert config.security.enabled and str(config.security.key_dir) == "/keys"  # on by default
        assert config.algorithm.lr == 0.07 and config.telemetry.mqtt_host is None
    keys = sorted(p.name for p in (out.parent / "keys").iterdir())
    assert keys == sorted(f"peer-{i}.{kind}" for i in range(4) for kind in ("key", "key_secret"))


def test_with_mqtt_a_broker_service_takes_every_peers_telemetry_whatever_the_config_says(
    tmp_path: Path, compose_v1: str
) -> None:
    out, doc = write(tmp_path, "telemetry.mqtt_host='127.0.0.1'", mqtt=True, broker_image="broker:test")
    v1_accepts(compose_v1, out)
    broker = doc["services"]["mosquitto"]
    assert broker["image"] == "broker:test" and broker["build"]["dockerfile"] == "docker/mosquitto.Dockerfile"
    assert broker["ports"] == ["127.0.0.1:1883:1883"]
    for i in range(4):
        config = load_config(out.parent / "cluster.toml", environ=doc["services"][f"peer-{i}"]["environment"])
        assert (config.telemetry.mqtt_host, config.telemetry.mqtt_port) == ("mosquitto", 1883)
        assert "depends_on" not in doc["services"][f"peer-{i}"]  # training never waits for the broker


def test_with_security_off_no_keys_are_made_or_mounted(tmp_path: Path, compose_v1: str) -> None:
    out, doc = write(tmp_path, "security.enabled=false")
    v1_accepts(compose_v1, out)
    assert not (out.parent / "keys").exists()
    for i in range(4):
        svc = doc["services"][f"peer-{i}"]
        assert not [v for v in svc["volumes"] if "/keys" in v]
        assert load_config(out.parent / "cluster.toml", environ=svc["environment"]).security.enabled is False


def test_a_config_with_its_own_key_folder_mounts_that_folder(tmp_path: Path) -> None:
    keys = tmp_path / "mine"
    assert cli.main(["keys", "generate", str(keys), "--peers", "4"]) == 0
    _, doc = write(tmp_path, "security.enabled=true", f"security.key_dir='{keys}'")
    assert f"{keys.resolve()}:/keys:ro" in doc["services"]["peer-3"]["volumes"]
    assert not (tmp_path / "deploy" / "keys").exists()


def test_the_compose_environment_reads_back_as_the_same_settings(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(tiny_cluster_toml(rounds=3, phase_timeout_s=1.0))
    config = load_config(tiny, environ={})
    env = compose.compose_document(config, overrides=["gossip.codec={kind='natural'}", "algorithm.lr=0.3"])[
        "services"
    ]["peer-1"]["environment"]
    again = load_config(tiny, environ=env)
    assert again.endpoint(0) == compose.service_endpoint(config, 0)
    assert again.gossip.codec.kind == "natural"
    assert again.algorithm.lr == 0.3


# ------------------------------------------------------------------------------ refused configs


def partial_keys(tmp_path: Path) -> str:
    keys = tmp_path / "partial"
    assert cli.main(["keys", "generate", str(keys), "--peers", "2"]) == 0
    return f"security.key_dir='{keys}'"


REFUSED: list[tuple[str, list[str], str]] = [
    ("loopback-broker", ["telemetry.mqtt_host='127.0.0.1'"], "telemetry.mqtt_host='127.0.0.1'"),
    ("localhost-broker", ["telemetry.mqtt_host='localhost'"], "telemetry.mqtt_host='localhost'"),
    ("loopback-metrics", ["telemetry.prometheus_port=9400"], "telemetry.prometheus_host='127.0.0.1'"),
    ("host-checkpoint-dir", ["checkpoint.dir='/srv/ckpt'"], "checkpoint.dir='/srv/ckpt'"),
    ("host-ca-file", ["telemetry.mqtt_host='mq.lan'", "telemetry.tls=true", "telemetry.tls_ca='/etc/ca.pem'"],
     "telemetry.tls_ca='/etc/ca.pem'"),
    ("missing-key-folder", ["security.enabled=true", "security.key_dir='/nonexistent/keys'"],
     "security.key_dir='/nonexistent/keys': no such folder"),
    ("missing-key-files", ["security.enabled=true", "PARTIAL"], "has no peer-2.key (peers = 4)"),
    ("hypercube-of-6", ["peers=6", "topology.name='hypercube'"], "topology.name='hypercube': with peers = 6"),
    ("torus-rows", ["topology.name='torus'", "topology.rows=3"], "topology.name='torus': with peers = 4"),
    ("missing-edges", ["topology.name='edge_list'", "topology.edges_file='/nonexistent/e.txt'"],
     "topology.edges_file='/nonexistent/e.txt': no such file"),
    ("gpu", ["device='cuda'"], "device='cuda'"),
    ("port-range", ["peers=600", "network.base_port=65000"], "network.base_port=65000"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "named"), [(s, n) for _, s, n in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_a_setting_that_cannot_work_in_containers_is_refused_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], named: str
) -> None:
    sets = [partial_keys(tmp_path) if s == "PARTIAL" else s for s in sets]
    capsys.readouterr()  # what making the partial key folder printed
    out = tmp_path / "deploy" / "docker-compose.yml"
    argv = ["compose", "--config", str(ORACLE), "--out", str(out), *(a for s in sets for a in ("--set", s))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert named in err, err
    assert not out.parent.exists()  # nothing written


def test_a_bad_subnet_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d" / "docker-compose.yml"
    assert cli.main(["compose", "--config", str(ORACLE), "--out", str(out), "--subnet", "10.213.7.0/30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subnet='10.213.7.0/30'" in err[0]
    assert not out.parent.exists()
