"""``demuon compose``: a docker-compose file with one service per peer (layer 6).

    demuon compose --config cluster.toml --out deploy/docker-compose.yml [--mqtt] [--set k=v ...]

Next to the compose file it writes ``cluster.toml`` (a copy of the config, mounted read-only at
``/config/cluster.toml`` in every container) and the services read their endpoints from the
environment (``DEMUON__NETWORK__PEERS``, which wins over the file): peer ``i`` is the service
``peer-i`` and binds ``tcp://peer-i:{base_port + i}``; the other peers reach it by that name on the
compose network. ``--set`` overrides become ``DEMUON__…`` variables the same way. Every peer
writes to ``/runs/peer-i`` on the named volume ``runs`` (owned by the image's non-root user;
copy results out with ``docker compose cp peer-0:/runs ./runs``). ``--mqtt`` adds a ``mosquitto``
service (config ``docker/mosquitto.conf``) and points every peer's telemetry at it; the peers do not
depend on it.

Security is on unless the config says ``security.enabled = false``: a CURVE keypair per peer is
generated in ``keys/`` beside the compose file (kept when it is there already) and mounted
read-only at ``/keys`` in every container (a config with its own ``security.key_dir`` mounts that).

The file is JSON, which YAML 1.2 reads as-is (no YAML library needed). It is generated and checked
for its structure only: it has not been run against a real Docker engine on the development
machine (no engine there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from demuon.config import ENV_PREFIX, Config, load_config, parse_value

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "demuon:latest"
MOSQUITTO_IMAGE = "eclipse-mosquitto:2"
MQTT_PORT = 1883
KEYS_MOUNT = "/keys"

console = Console(stderr=True)


def service_name(peer: int) -> str:
    return f"peer-{peer}"


def service_endpoint(config: Config, peer: int) -> str:
    return f"tcp://{service_name(peer)}:{config.network.base_port + peer}"


def peers_literal(config: Config) -> str:
    """``network.peers`` as JSON (how a list travels in an environment variable), keeping any
    CURVE public keys of the config."""
    keys = {p.id: p.public_key for p in config.network.peers}
    items: list[dict[str, Any]] = []
    for i in range(config.peers):
        item: dict[str, Any] = {"id": i, "endpoint": service_endpoint(config, i)}
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


def compose_document(
    config: Config,
    *,
    overrides: Sequence[str] = (),
    mqtt: bool = False,
    build_context: str = ".",
    keys: str | None = None,
) -> dict[str, Any]:
    """The compose file as a dict: services ``peer-0`` … ``peer-{N-1}`` (and ``mosquitto``).
    ``keys``: the host folder of the cluster's CURVE keys, mounted read-only at ``/keys`` (security
    on); None: the links are open."""
    env = {f"{ENV_PREFIX}NETWORK__PEERS": peers_literal(config), **override_env(overrides)}
    volumes = ["./cluster.toml:/config/cluster.toml:ro", "runs:/runs"]
    if keys is not None:
        env[f"{ENV_PREFIX}SECURITY__ENABLED"] = "true"
        env[f"{ENV_PREFIX}SECURITY__KEY_DIR"] = KEYS_MOUNT
        volumes.append(f"{keys}:{KEYS_MOUNT}:ro")
    if mqtt:
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_HOST"] = "mosquitto"
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_PORT"] = str(MQTT_PORT)
    services: dict[str, Any] = {}
    for i in range(config.peers):
        name = service_name(i)
        services[name] = {
            "image": IMAGE,
            "hostname": name,
            "command": [
                "demuon",
                "run",
                "--config",
                "/config/cluster.toml",
                "--peer",
                str(i),
                "--out",
                f"/runs/{name}",
            ],
            "environment": dict(env),
            "volumes": list(volumes),
            "expose": [str(config.network.base_port + i)],
            "stop_signal": "SIGTERM",
            "stop_grace_period": f"{int(config.network.phase_timeout_s * 2 + 10)}s",
            "restart": "no",
        }
        if i == 0:  # one service builds the image the others share
            services[name]["build"] = {"context": build_context, "dockerfile": "docker/Dockerfile"}
    if mqtt:
        services["mosquitto"] = {
            "image": MOSQUITTO_IMAGE,
            "volumes": [f"{build_context}/docker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"],
            "ports": [f"127.0.0.1:{MQTT_PORT}:{MQTT_PORT}"],
        }
    return {"name": "demuon", "services": services, "volumes": {"runs": {}}}


def cluster_keys(config: Config, folder: Path) -> str | None:
    """The key folder to mount, as the compose file names it: the config's own (security on with
    ``key_dir``), else ``./keys`` beside the compose file, generated for every peer that lacks a
    key (security unset: on by default). None when security is off on purpose."""
    sec = config.security
    if sec.enabled is False:
        console.print("[yellow]security.enabled = false:[/yellow] the compose network's links are open")
        return None
    if sec.enabled and sec.key_dir is not None:
        return str(Path(sec.key_dir).resolve())
    from demuon.transport.security import ensure_keys

    ensure_keys(folder / "keys", config.peers)
    return "./keys"


def write_compose(
    config_path: Path, out: Path, *, overrides: Sequence[str] = (), mqtt: bool = False
) -> tuple[Path, Path]:
    """Write ``out`` and ``cluster.toml`` beside it; returns both paths."""
    config = load_config(config_path, list(overrides))  # fail here, not in N containers
    out.parent.mkdir(parents=True, exist_ok=True)
    cluster = out.parent / "cluster.toml"
    if config_path.resolve() != cluster.resolve():
        shutil.copyfile(config_path, cluster)
    context = os.path.relpath(ROOT, out.parent.resolve())
    keys = cluster_keys(config, out.parent)
    doc = compose_document(config, overrides=overrides, mqtt=mqtt, build_context=context, keys=keys)
    header = f"# generated by `demuon compose --config {config_path}`; JSON is valid YAML\n"
    out.write_text(header + json.dumps(doc, indent=2) + "\n")
    return out, cluster


def cmd_compose(args: argparse.Namespace) -> int:
    out, cluster = write_compose(Path(args.config), Path(args.out), overrides=args.set, mqtt=args.mqtt)
    console.print(f"wrote {out} and {cluster}; start with: docker compose -f {out} up --build")
    return 0
