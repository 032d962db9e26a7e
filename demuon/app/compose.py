"""``demuon compose``: a docker-compose file with one service per peer (layer 6).

    demuon compose --config cluster.toml --out deploy/docker-compose.yml [--mqtt] [--set k=v ...]
    docker-compose -f deploy/docker-compose.yml up -d      # or: docker compose -f ... up -d
    docker-compose -f deploy/docker-compose.yml ps         # every peer's health
    docker-compose -f deploy/docker-compose.yml down -v    # -v: also the peers' volumes

The file is the subset of the compose format that Compose v1 (``docker-compose`` 1.29, file format
``version: "3.8"``, no top-level ``name``) and Compose v2 (``docker compose``, which ignores
``version``) both accept; it is JSON, which YAML reads as-is (no YAML library needed). Next to it
go ``cluster.toml`` (a copy of the config, mounted read-only at ``/config/cluster.toml``) and, with
CURVE on, ``keys/``.

Services ``peer-0`` … ``peer-{N-1}`` run the image (``--image``, default ``demuon:latest``;
``docker/Dockerfile``, built by ``up --build`` from a source checkout) with ``hostname`` = service
name: peer ``i`` is reached at ``tcp://peer-i:{base_port + i}`` on the compose network and binds
``tcp://0.0.0.0:{base_port + i}`` in its own container (its address may change when the container
restarts or its network is reconnected; the name follows it). The endpoints and the other settings
that differ from the config file travel as ``DEMUON__…`` environment variables (they win over the
file); ``--set`` overrides become such variables too. Each peer runs ``demuon run --config
/config/cluster.toml --peer i --out /runs --resume-if-present`` with its own named volume
``runs-peer-i`` at ``/runs`` (metrics, log, ``status.json``, checkpoints): ``restart: on-failure``
restarts a crashed peer, which resumes from its last checkpoint (``checkpoint.every``) and catches
up with its neighbours. The ``healthcheck`` runs ``demuon health --out /runs`` (fresh
``status.json``). Read a peer's results with ``docker-compose cp peer-0:/runs ./runs-peer-0``
(v2) or ``docker cp <container>:/runs ...``.

Security is on unless the config says ``security.enabled = false``: a CURVE keypair per peer is
generated in ``keys/`` beside the compose file (kept when it is there already) and mounted
read-only at ``/keys`` (a config with ``security.enabled = true`` and its own ``key_dir`` mounts
that folder, which must hold every peer's keys). The secret files stay mode 0600, so they must
belong to the image's user (uid 1000): generated as root they are given to it.

``--mqtt`` adds a ``mosquitto`` broker service (``--broker-image``, default
``demuon-mosquitto:latest`` from ``docker/mosquitto.Dockerfile``; port 1883 published on
127.0.0.1) and points every peer's telemetry at it, whatever ``telemetry.mqtt_host`` says; training
does not depend on it. ``--subnet`` sets the compose network's IPv4 subnet.

A setting that would not work inside the containers is refused here, with one line naming it
(:func:`check_config`), rather than in N containers: a loopback MQTT broker or metrics address, a
host path (``checkpoint.dir``, ``workload.corpus``, ``telemetry.tls_ca``), a key folder that is
missing or lacks a peer's keys, a topology that cannot take ``peers``, a GPU device.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from demuon.config import ENV_PREFIX, Config, load_config, parse_value
from demuon.errors import ConfigError, DemuonError

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "demuon:latest"
BROKER_IMAGE = "demuon-mosquitto:latest"
FILE_VERSION = "3.8"  # the newest format Compose v1 reads; v2 ignores it
MQTT_PORT = 1883
KEYS_MOUNT = "/keys"
CONFIG_MOUNT = "/config/cluster.toml"
EDGES_MOUNT = "/config/edges.txt"
RUNS = "/runs"
IMAGE_UID = 1000  # the image's user (docker/Dockerfile): it must read the keys and write /runs
#: Healthcheck timing: every few seconds, a few misses in a row before "unhealthy", and a start
#: period covering the interpreter's start (importing torch) and the config's start-up wait.
HEALTH_INTERVAL_S = 5
HEALTH_TIMEOUT_S = 10
HEALTH_RETRIES = 3
START_ALLOWANCE_S = 30

console = Console(stderr=True)


def service_name(peer: int) -> str:
    return f"peer-{peer}"


def service_endpoint(config: Config, peer: int) -> str:
    return f"tcp://{service_name(peer)}:{config.network.base_port + peer}"


def peers_literal(config: Config, own: int | None = None) -> str:
    """``network.peers`` as JSON (how a list travels in an environment variable), keeping any
    CURVE public keys of the config; peer ``own`` binds the wildcard address instead."""
    keys = {p.id: p.public_key for p in config.network.peers}
    items: list[dict[str, Any]] = []
    for i in range(config.peers):
        endpoint = service_endpoint(config, i)
        if i == own:
            endpoint = f"tcp://0.0.0.0:{config.network.base_port + i}"
        item: dict[str, Any] = {"id": i, "endpoint": endpoint}
        if keys.get(i):
            item["public_key"] = str(keys[i])
        items.append(item)
    return json.dumps(items)


def override_env(overrides: Sequence[str]) -> dict[str, str]:
    """``algorithm.lr=0.1`` → ``{"DEMUON__ALGORITHM__LR": "0.1"}``; a section or list value (a TOML
    inline table or array on the command line) becomes JSON."""
    env = {}
    for item in overrides:
        key, _, text = item.partition("=")
        value = parse_value(text.strip())
        name = ENV_PREFIX + "__".join(p.upper() for p in key.strip().split(".") if p)
        env[name] = json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
    return env


# ------------------------------------------------------------------------ what cannot work there


def is_local_host(host: str) -> bool:
    """``localhost`` or a loopback address: inside a container, that container itself."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: Config, *, mqtt: bool) -> None:
    """Raise a ConfigError naming the first setting that could not work in the containers."""
    t = config.telemetry
    if t.mqtt_host is not None and not mqtt and is_local_host(t.mqtt_host):
        raise ConfigError(
            "telemetry.mqtt_host",
            t.mqtt_host,
            "in a container that is the container itself: "
            "use --mqtt (a broker service on the compose network) or a broker address the containers reach",
        )
    if mqtt and t.tls:
        raise ConfigError("telemetry.tls", True, "the --mqtt broker speaks plain MQTT on the compose network")
    if t.tls_ca is not None and not mqtt:
        raise ConfigError("telemetry.tls_ca", str(t.tls_ca), "a host file the containers do not have")
    if t.prometheus_port is not None and is_local_host(t.prometheus_host):
        raise ConfigError(
            "telemetry.prometheus_host",
            t.prometheus_host,
            "a scraper on the compose network cannot "
            'reach a container\'s loopback: set telemetry.prometheus_host = "0.0.0.0"',
        )
    if config.checkpoint.dir is not None:
        raise ConfigError(
            "checkpoint.dir",
            str(config.checkpoint.dir),
            f"a host path: in compose every peer keeps its "
            f"checkpoints on its own volume ({RUNS}/checkpoint); remove the setting",
        )
    corpus = getattr(config.workload, "corpus", None)
    if corpus is not None:
        raise ConfigError(
            "workload.corpus",
            str(corpus),
            "a host path the containers do not have (unset: the corpus built into the image)",
        )
    if config.device.startswith("cuda"):
        raise ConfigError("device", config.device, 'the image runs on CPU only: use device = "cpu" or "auto"')
    last = config.network.base_port + config.peers - 1
    if last > 65535:
        raise ConfigError(
            "network.base_port", config.network.base_port, f"peer {config.peers - 1} would get port {last}"
        )
    if config.security.enabled and config.security.key_dir is not None:
        check_keys(Path(config.security.key_dir), config.peers)
    check_topology(config)


def check_topology(config: Config) -> None:
    """Build every round's mixing matrix now: a topology that cannot take ``peers`` is refused here."""
    from demuon.topology import mixing_matrix_from_config, period

    topo = config.topology
    if topo.edges_file is not None and not Path(topo.edges_file).is_file():
        raise ConfigError("topology.edges_file", str(topo.edges_file), "no such file")
    try:
        for t in range(period(topo, config.peers)):
            mixing_matrix_from_config(topo, config.peers, t)
    except DemuonError as exc:
        raise ConfigError("topology.name", topo.name, f"with peers = {config.peers}: {exc}") from exc


def check_keys(folder: Path, n_peers: int) -> None:
    """``folder`` holds every peer's public and secret key files (a warning when the image's user
    could not read one)."""
    if not folder.is_dir():
        raise ConfigError(
            "security.key_dir", str(folder), "no such folder (demuon keys generate DIR --peers N)"
        )
    files = [folder / f"peer-{i}.{kind}" for i in range(n_peers) for kind in ("key", "key_secret")]
    for path in files:
        if not path.is_file():
            raise ConfigError("security.key_dir", str(folder), f"has no {path.name} (peers = {n_peers})")
    unreadable = [p for p in files if p.stat().st_uid != IMAGE_UID and not p.stat().st_mode & 0o004]
    if unreadable:  # a warning: Docker Desktop's file sharing maps owners
        st = unreadable[0].stat()
        console.print(
            f"[yellow]warning:[/yellow] {unreadable[0]} belongs to uid {st.st_uid} (mode "
            f"{st.st_mode & 0o777:o}): on Linux the containers' user (uid {IMAGE_UID}) cannot read it "
            f"(chown {IMAGE_UID} the key files)",
            soft_wrap=True,
        )


def cluster_keys(config: Config, folder: Path) -> str | None:
    """The key folder to mount, as the compose file names it: the config's own (security on with
    ``key_dir``), else ``./keys`` beside the compose file, generated for every peer that lacks a
    key (security unset: on by default). None when security is off on purpose."""
    sec = config.security
    if sec.enabled is False:
        console.print("[yellow]security.enabled = false:[/yellow] the compose network's links are open")
        return None
    if sec.enabled and sec.key_dir is not None:  # checked by check_config
        return str(Path(sec.key_dir).resolve())
    from demuon.transport.security import ensure_keys

    keys = ensure_keys(folder / "keys", config.peers)
    if os.geteuid() == 0:  # generated as root: the image's user must read them (mode 0600 kept)
        for path in keys.iterdir():
            if path.name.startswith("peer-"):
                os.chown(path, IMAGE_UID, IMAGE_UID)
    check_keys(keys, config.peers)
    return "./keys"


# ------------------------------------------------------------------------------- the document


def peer_service(
    config: Config, i: int, env: dict[str, str], volumes: list[str], image: str
) -> dict[str, Any]:
    name = service_name(i)
    start_period = int(config.network.start_timeout_s + START_ALLOWANCE_S)
    command = [
        "demuon",
        "run",
        "--config",
        CONFIG_MOUNT,
        "--peer",
        str(i),
        "--out",
        RUNS,
        "--resume-if-present",
    ]
    return {
        "image": image,
        "hostname": name,
        "command": command,
        "environment": {**env, f"{ENV_PREFIX}NETWORK__PEERS": peers_literal(config, own=i)},
        "volumes": [*volumes, f"runs-{name}:{RUNS}"],
        "expose": [str(config.network.base_port + i)],
        "restart": "on-failure",
        "stop_signal": "SIGTERM",
        "stop_grace_period": f"{int(config.network.phase_timeout_s * 2 + 10)}s",
        "healthcheck": {
            "test": ["CMD", "demuon", "health", "--out", RUNS],
            "interval": f"{HEALTH_INTERVAL_S}s",
            "timeout": f"{HEALTH_TIMEOUT_S}s",
            "retries": HEALTH_RETRIES,
            "start_period": f"{start_period}s",
        },
    }


def compose_document(
    config: Config,
    *,
    overrides: Sequence[str] = (),
    mqtt: bool = False,
    build_context: str | None = ".",
    keys: str | None = None,
    edges: str | None = None,
    image: str = IMAGE,
    broker_image: str = BROKER_IMAGE,
    subnet: str | None = None,
) -> dict[str, Any]:
    """The compose file as a dict: services ``peer-0`` … ``peer-{N-1}`` (and ``mosquitto``).
    ``keys``: the host folder of the cluster's CURVE keys, mounted read-only at ``/keys`` (security
    on); None: the links are open. ``edges``: the host file of an edge-list topology.
    ``build_context``: the source checkout (relative to the file), None: images only."""
    env = override_env(overrides)
    volumes = [f"./cluster.toml:{CONFIG_MOUNT}:ro"]
    env[f"{ENV_PREFIX}SECURITY__ENABLED"] = "true" if keys is not None else "false"
    if keys is not None:
        env[f"{ENV_PREFIX}SECURITY__KEY_DIR"] = KEYS_MOUNT
        volumes.append(f"{keys}:{KEYS_MOUNT}:ro")
    if edges is not None:
        env[f"{ENV_PREFIX}TOPOLOGY__EDGES_FILE"] = EDGES_MOUNT
        volumes.append(f"{edges}:{EDGES_MOUNT}:ro")
    if mqtt:
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_HOST"] = "mosquitto"
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_PORT"] = str(MQTT_PORT)
    services: dict[str, Any] = {}
    for i in range(config.peers):
        services[service_name(i)] = peer_service(config, i, env, volumes, image)
    if build_context is not None:  # one service builds the image the others share
        services["peer-0"]["build"] = {"context": build_context, "dockerfile": "docker/Dockerfile"}
    if mqtt:
        services["mosquitto"] = {
            "image": broker_image,
            "hostname": "mosquitto",
            "ports": [f"127.0.0.1:{MQTT_PORT}:{MQTT_PORT}"],
            "restart": "on-failure",
        }
        if build_context is not None:
            services["mosquitto"]["build"] = {
                "context": build_context,
                "dockerfile": "docker/mosquitto.Dockerfile",
            }
    doc: dict[str, Any] = {
        "version": FILE_VERSION,
        "services": services,
        "volumes": {f"runs-{service_name(i)}": {} for i in range(config.peers)},
    }
    if subnet is not None:
        doc["networks"] = {"default": {"ipam": {"config": [{"subnet": subnet}]}}}
    return doc


def check_subnet(subnet: str | None) -> None:
    if subnet is None:
        return
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise ConfigError("--subnet", subnet, f"not an IPv4 network: {exc}") from None
    if net.version != 4 or net.num_addresses < 8:
        raise ConfigError(
            "--subnet", subnet, "expected an IPv4 network of at least 8 addresses, e.g. 10.213.7.0/24"
        )


def write_compose(
    config_path: Path,
    out: Path,
    *,
    overrides: Sequence[str] = (),
    mqtt: bool = False,
    image: str = IMAGE,
    broker_image: str = BROKER_IMAGE,
    subnet: str | None = None,
) -> tuple[Path, Path]:
    """Write ``out`` and ``cluster.toml`` beside it (and ``keys/``, ``edges.txt`` when needed);
    returns both paths. Every check runs before anything is written."""
    config = load_config(config_path, list(overrides))  # fail here, not in N containers
    check_config(config, mqtt=mqtt)
    check_subnet(subnet)
    out.parent.mkdir(parents=True, exist_ok=True)
    cluster = out.parent / "cluster.toml"
    if config_path.resolve() != cluster.resolve():
        shutil.copyfile(config_path, cluster)
    edges = None
    if config.topology.edges_file is not None:
        shutil.copyfile(config.topology.edges_file, out.parent / "edges.txt")
        edges = "./edges.txt"
    build = (
        os.path.relpath(ROOT, out.parent.resolve()) if (ROOT / "docker" / "Dockerfile").is_file() else None
    )
    keys = cluster_keys(config, out.parent)
    doc = compose_document(
        config,
        overrides=overrides,
        mqtt=mqtt,
        build_context=build,
        keys=keys,
        edges=edges,
        image=image,
        broker_image=broker_image,
        subnet=subnet,
    )
    header = f"# generated by `demuon compose --config {config_path}`; JSON is valid YAML\n"
    out.write_text(header + json.dumps(doc, indent=2) + "\n")
    return out, cluster


def cmd_compose(args: argparse.Namespace) -> int:
    out, cluster = write_compose(
        Path(args.config),
        Path(args.out),
        overrides=args.set,
        mqtt=args.mqtt,
        image=args.image,
        broker_image=args.broker_image,
        subnet=args.subnet,
    )
    console.print(f"wrote {out} and {cluster}; start with: docker-compose -f {out} up -d", soft_wrap=True)
    return 0
