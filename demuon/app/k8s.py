"""``demuon k8s``: Kubernetes manifests for a cluster, one pod per peer (layer 6).

    demuon k8s --config cluster.toml --out deploy/k8s [--set k=v ...] [--image demuon:latest]
               [--namespace default] [--name demuon] [--gpu N] [--storage 1Gi]
               [--storage-class CLASS] [--cpu 1] [--memory 1Gi] [--mqtt | --external-broker]
    kubectl create namespace NS        # unless it exists (the manifests do not create it)
    kubectl apply -f deploy/k8s
    kubectl -n NS get pods -l app.kubernetes.io/instance=demuon
    kubectl -n NS cp demuon-0:/runs ./runs/peer-0     # a peer's metrics, status and checkpoint

It writes one JSON file per object into ``--out`` (JSON is YAML, and ``kubectl apply -f DIR``
reads every ``.json`` file of the folder, in name order):

* a ConfigMap with the cluster file (mounted read-only at ``/config``; an ``edge_list``
  topology's edges file goes with it);
* a Secret with the CURVE keys (security is on unless the config says ``security.enabled =
  false``): the config's ``security.key_dir``, else ``keys/`` beside the manifests, generated for
  the peers that lack a key and kept when there (mounted read-only at ``/keys``). The folder and
  the Secret's file hold secret keys: do not commit them;
* a headless Service ``NAME`` (``publishNotReadyAddresses``: peers resolve each other before
  they are ready) and a StatefulSet ``NAME`` of ``peers`` pods started in parallel. Pod ``i``
  (``NAME-i``) reads its peer id from its ``apps.kubernetes.io/pod-index`` label (Kubernetes ≥
  1.28), runs ``demuon run --peer i --out /runs --resume-if-present`` and binds
  ``tcp://NAME-i.NAME.NS.svc.cluster.local:{base_port + i}``, a name the kubelet writes into the
  pod's own ``/etc/hosts``; the other peers reach it at that name through the Service's DNS. The
  endpoint list travels in ``DEMUON__NETWORK__PEERS``, ``--set`` overrides as ``DEMUON__…``
  variables (they win over the file);
* per pod a PersistentVolumeClaim ``runs-NAME-i`` (``--storage``) mounted at ``/runs``: the
  checkpoint there survives a restart, which resumes from it. Claims outlive the StatefulSet
  (delete them to start a new run);
* probes running ``demuon health --out /runs``; the pods run as uid/gid 1000, non-root, with
  ``fsGroup`` 1000 so the claim is writable;
* ``--gpu N``: ``nvidia.com/gpu: N`` per pod and ``device = "cuda"`` (the image then needs a
  CUDA build of torch; the default image is CPU-only);
* telemetry (the config's ``telemetry.mqtt_host`` is set, or ``--mqtt``): a broker Deployment and
  Service ``NAME-mqtt`` (image ``demuon-mosquitto:latest``, port 1883, ``docker/mosquitto.conf``
  as a ConfigMap) and every peer's ``mqtt_host`` pointed at it. ``--external-broker`` keeps the
  config's broker instead, which the pods must reach (a loopback address is refused).

A setting that cannot work in the pods fails here, with one line naming it (exit 2): a bad
``--set`` or topology option, a missing key folder or key, a loopback broker or metrics address,
a host file (``telemetry.tls_ca``, ``workload.corpus``), a ``checkpoint.dir`` outside ``/runs``,
``device = "cuda"`` without ``--gpu``, a peer port past 65535.

A StatefulSet restarts every container that exits, so a peer runs with ``--hold-when-done``: after
its last round it stays up (``status.json`` says ``done``, the probes pass) until the pod is
deleted; copy its results out with ``kubectl cp``, then scale to 0 or delete. The
manifests are checked against the Kubernetes 1.37 schemas (kubernetes-validate, strict) only:
they have not been applied to a real cluster on the development machine (none there).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rich.console import Console

from demuon.app.compose import check_topology, is_local_host, override_env
from demuon.config import ENV_PREFIX, Config, is_host, load_config, math_fingerprint
from demuon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_CONF = ROOT / "docker" / "mosquitto.conf"
MQTT_PORT = 1883
UID = 1000  # the image's user (docker/Dockerfile)
BROKER_UID = 1883  # eclipse-mosquitto's user
CONFIG_MOUNT, KEYS_MOUNT, RUNS_MOUNT = "/config", "/keys", "/runs"
POD_INDEX = "apps.kubernetes.io/pod-index"  # set on StatefulSet pods since Kubernetes 1.28
MANAGED_BY = "demuon-k8s"
#: A pod's start: imports, the workload, a resume, then the wait for neighbours.
STARTUP_ALLOWANCE_S = 120.0
PROBE_PERIOD_S = 10
MAX_OBJECT_BYTES = 1 << 20  # a ConfigMap's or Secret's limit (etcd's is a little more)
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")

console = Console(stderr=True)


@dataclass(frozen=True)
class K8sOptions:
    """The command line's choices (checked by :func:`check_options`)."""

    image: str = "demuon:latest"
    broker_image: str = "demuon-mosquitto:latest"
    namespace: str = "default"
    name: str = "demuon"
    cluster_domain: str = "cluster.local"
    gpu: int = 0
    storage: str = "1Gi"
    storage_class: str | None = None
    cpu: str | None = None  # None: the config's threads
    memory: str = "1Gi"
    mqtt: bool = False  # telemetry on with a generated broker, even without telemetry.mqtt_host
    external_broker: bool = False  # keep the config's broker; generate none


def check_options(o: K8sOptions) -> None:
    for option, value, longest in (("--namespace", o.namespace, 63), ("--name", o.name, 52)):
        if len(value) > longest or not _LABEL.fullmatch(value):
            raise ConfigError(
                option, value, f"expected a DNS label: a-z, 0-9, '-', at most {longest} characters"
            )
    if not is_host(o.cluster_domain):
        raise ConfigError("--cluster-domain", o.cluster_domain, "not a DNS name")
    if o.gpu < 0:
        raise ConfigError("--gpu", o.gpu, "expected a number of GPUs ≥ 0")
    for option, q in (("--storage", o.storage), ("--cpu", o.cpu), ("--memory", o.memory)):
        if q is not None and (not _QUANTITY.fullmatch(q) or float(re.sub(r"[^\d.]", "", q)) == 0):
            raise ConfigError(option, q, "expected a positive Kubernetes quantity such as 500m, 2 or 1Gi")
    if o.mqtt and o.external_broker:
        raise ConfigError("--external-broker", True, "--mqtt generates a broker: give one or the other")


def peer_host(o: K8sOptions, peer: int) -> str:
    """Pod ``NAME-i``'s stable DNS name through the headless Service ``NAME``."""
    return f"{o.name}-{peer}.{o.name}.{o.namespace}.svc.{o.cluster_domain}"


def peer_endpoint(config: Config, o: K8sOptions, peer: int) -> str:
    return f"tcp://{peer_host(o, peer)}:{config.network.base_port + peer}"


def broker_host(o: K8sOptions) -> str:
    return f"{o.name}-mqtt.{o.namespace}.svc.{o.cluster_domain}"


def telemetry_mode(config: Config, o: K8sOptions) -> str:
    """``off``, ``broker`` (a broker is generated) or ``external`` (the config's broker)."""
    if config.telemetry.mqtt_host is None and not o.mqtt:
        return "off"
    return "external" if o.external_broker else "broker"


def check_config(config: Config, o: K8sOptions) -> None:
    """What would break in the pods, refused here with one line naming the setting."""
    t, mode = config.telemetry, telemetry_mode(config, o)
    if mode == "external":
        if t.mqtt_host is None:
            raise ConfigError("telemetry.mqtt_host", None, "--external-broker needs the config's broker")
        if is_local_host(t.mqtt_host):
            raise ConfigError(
                "telemetry.mqtt_host",
                t.mqtt_host,
                "names the pod itself: give a broker the pods reach, or drop --external-broker",
            )
    if mode == "external" and t.tls_ca is not None:
        raise ConfigError("telemetry.tls_ca", str(t.tls_ca), "a host file the pods do not have")
    corpus = getattr(config.workload, "corpus", None)
    if corpus is not None:
        raise ConfigError(
            "workload.corpus", str(corpus), "a host file the pods do not have (unset: the image's)"
        )
    last = config.network.base_port + config.peers - 1
    if last > 65535:
        raise ConfigError(
            "network.base_port", config.network.base_port, f"peer {config.peers - 1} would get port {last}"
        )
    if mode == "broker" and t.tls:
        raise ConfigError(
            "telemetry.tls", True, "the generated broker speaks plain MQTT: use --external-broker"
        )
    if t.prometheus_port is not None and is_local_host(t.prometheus_host):
        raise ConfigError(
            "telemetry.prometheus_host",
            t.prometheus_host,
            "nothing outside the pod can scrape it: set 0.0.0.0",
        )
    n, base, prom = config.peers, config.network.base_port, t.prometheus_port
    if prom and not (prom + n <= base or base + n <= prom):
        raise ConfigError(
            "telemetry.prometheus_port", prom, f"overlaps the peers' ports {base}..{base + n - 1}"
        )
    ck = config.checkpoint.dir
    if ck is not None and not PurePosixPath(ck).is_relative_to(RUNS_MOUNT):
        raise ConfigError(
            "checkpoint.dir",
            str(ck),
            f"outside the {RUNS_MOUNT} volume: leave it unset or put it under {RUNS_MOUNT}",
        )
    if config.device.startswith("cuda") and o.gpu == 0:
        raise ConfigError("device", config.device, "the pods get no GPU: give --gpu N or set device = 'cpu'")
    check_topology(config)


def key_folder(config: Config, out: Path) -> Path | None:
    """The CURVE key folder the Secret is made of, or None when security is off on purpose."""
    sec = config.security
    if sec.enabled is False:
        return None
    if sec.key_dir is not None:
        if not Path(sec.key_dir).is_dir():
            raise ConfigError(
                "security.key_dir", str(sec.key_dir), "no such folder (demuon keys generate DIR --peers N)"
            )
        return Path(sec.key_dir)
    from demuon.transport.security import ensure_keys

    return ensure_keys(out / "keys", config.peers)


def key_files(folder: Path, peers: int) -> dict[str, bytes]:
    """Every peer's ``peer-<id>.key`` and ``peer-<id>.key_secret``; a missing one is refused."""
    files = {}
    for i in range(peers):
        for name in (f"peer-{i}.key", f"peer-{i}.key_secret"):
            if not (folder / name).is_file():
                raise ConfigError("security.key_dir", str(folder), f"has no {name}")
            files[name] = (folder / name).read_bytes()
    return files


def peer_env(config: Config, o: K8sOptions, overrides: Sequence[str], secured: bool) -> dict[str, str]:
    """The ``DEMUON__…`` variables of every pod: ``--set`` first, the deployment's own on top."""
    env = override_env(overrides)
    items = [{"id": i, "endpoint": peer_endpoint(config, o, i)} for i in range(config.peers)]
    env[f"{ENV_PREFIX}NETWORK__PEERS"] = json.dumps(items)
    if secured:
        env[f"{ENV_PREFIX}SECURITY__ENABLED"] = "true"
        env[f"{ENV_PREFIX}SECURITY__KEY_DIR"] = KEYS_MOUNT
    if telemetry_mode(config, o) == "broker":
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_HOST"] = broker_host(o)
        env[f"{ENV_PREFIX}TELEMETRY__MQTT_PORT"] = str(MQTT_PORT)
    if o.gpu:
        env[f"{ENV_PREFIX}DEVICE"] = "cuda"
    if config.topology.name == "edge_list":
        env[f"{ENV_PREFIX}TOPOLOGY__EDGES_FILE"] = f"{CONFIG_MOUNT}/edges.txt"
    return env


def _meta(o: K8sOptions, name: str, component: str) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "demuon",
        "app.kubernetes.io/instance": o.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    return {"name": name, "namespace": o.namespace, "labels": labels}


def _selector(o: K8sOptions, component: str) -> dict[str, str]:
    return {k: v for k, v in _meta(o, "", component)["labels"].items() if k != "app.kubernetes.io/managed-by"}


def _ports(config: Config) -> list[dict[str, Any]]:
    n, t = config.peers, config.telemetry
    ports = [{"name": f"peer-{i}", "containerPort": config.network.base_port + i} for i in range(n)]
    if t.prometheus_port:
        ports += [{"name": f"metrics-{i}", "containerPort": t.prometheus_port + i} for i in range(n)]
    return ports


def _probe(**timing: int) -> dict[str, Any]:
    command = ["demuon", "health", "--out", RUNS_MOUNT]
    return {"exec": {"command": command}, "timeoutSeconds": 10, "periodSeconds": PROBE_PERIOD_S, **timing}


def peer_container(config: Config, o: K8sOptions, env: dict[str, str], secured: bool) -> dict[str, Any]:
    mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    if secured:
        mounts.append({"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True})
    mounts.append({"name": "runs", "mountPath": RUNS_MOUNT})
    limits: dict[str, Any] = {"memory": o.memory}
    if o.gpu:
        limits["nvidia.com/gpu"] = o.gpu
    index = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX}']"}}
    startup = config.network.start_timeout_s + STARTUP_ALLOWANCE_S
    command = ["demuon", "run", "--config", f"{CONFIG_MOUNT}/cluster.toml", "--peer", "$(PEER_INDEX)"]
    return {
        "name": "peer",
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [*command, "--out", RUNS_MOUNT, "--resume-if-present", "--hold-when-done"],
        "env": [{"name": "PEER_INDEX", "valueFrom": index}]
        + [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{**p, "protocol": "TCP"} for p in _ports(config)],
        "resources": {
            "requests": {"cpu": o.cpu or str(config.threads), "memory": o.memory},
            "limits": limits,
        },
        "volumeMounts": mounts,
        "startupProbe": _probe(failureThreshold=math.ceil(startup / PROBE_PERIOD_S)),
        "readinessProbe": _probe(failureThreshold=3),
        "livenessProbe": _probe(failureThreshold=3),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def statefulset(config: Config, o: K8sOptions, env: dict[str, str], secured: bool) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": f"{o.name}-config"}}]
    if secured:
        volumes.append({"name": "keys", "secret": {"secretName": f"{o.name}-keys", "defaultMode": 0o440}})
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": o.storage}},
    }
    if o.storage_class:
        claim["storageClassName"] = o.storage_class
    pod = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no NAME_PORT=… variables from the namespace's Services
        "terminationGracePeriodSeconds": int(config.network.phase_timeout_s * 2 + 10),
        "containers": [peer_container(config, o, env, secured)],
        "volumes": volumes,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(o, o.name, "peer"),
        "spec": {
            "serviceName": o.name,
            "replicas": config.peers,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _selector(o, "peer")},
            "template": {"metadata": {"labels": _meta(o, "", "peer")["labels"]}, "spec": pod},
            "volumeClaimTemplates": [{"metadata": {"name": "runs"}, "spec": claim}],
        },
    }


def peer_service(config: Config, o: K8sOptions) -> dict[str, Any]:
    ports = [
        {"name": p["name"], "port": p["containerPort"], "targetPort": p["containerPort"]}
        for p in _ports(config)
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(o, o.name, "peer"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _selector(o, "peer"),
            "ports": ports,
        },
    }


def config_map(o: K8sOptions, name: str, component: str, files: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(o, name, component), "data": files}


def key_secret(o: K8sOptions, files: dict[str, bytes]) -> dict[str, Any]:
    data = {name: base64.b64encode(blob).decode() for name, blob in files.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(o, f"{o.name}-keys", "peer"),
        "type": "Opaque",
        "data": data,
    }


def broker(o: K8sOptions, conf: str) -> list[dict[str, Any]]:
    """ConfigMap, Deployment and Service of the MQTT broker the peers publish to."""
    name, sel = f"{o.name}-mqtt", _selector(o, "broker")
    mount = {
        "name": "conf",
        "mountPath": "/mosquitto/config/mosquitto.conf",
        "subPath": "mosquitto.conf",
        "readOnly": True,
    }
    container = {
        "name": "mosquitto",
        "image": o.broker_image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "mqtt", "containerPort": MQTT_PORT, "protocol": "TCP"}],
        "volumeMounts": [mount],
        "readinessProbe": {"tcpSocket": {"port": "mqtt"}, "periodSeconds": PROBE_PERIOD_S},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": BROKER_UID, "runAsGroup": BROKER_UID},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [{"name": "conf", "configMap": {"name": name}}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(o, name, "broker"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": sel},
            "template": {"metadata": {"labels": _meta(o, "", "broker")["labels"]}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(o, name, "broker"),
        "spec": {"selector": sel, "ports": [{"name": "mqtt", "port": MQTT_PORT, "targetPort": "mqtt"}]},
    }
    return [config_map(o, name, "broker", {"mosquitto.conf": conf}), deployment, service]


def manifests(
    config: Config,
    o: K8sOptions,
    *,
    cluster_file: str,
    overrides: Sequence[str] = (),
    keys: dict[str, bytes] | None = None,
    edges: str | None = None,
    mosquitto_conf: str = "",
) -> dict[str, dict[str, Any]]:
    """File name → object, in the order ``kubectl apply -f DIR`` takes them (pure: the files'
    contents are passed in). ``keys``: the CURVE key files (None: security off)."""
    files = {"cluster.toml": cluster_file, **({"edges.txt": edges} if edges is not None else {})}
    env = peer_env(config, o, overrides, keys is not None)
    out = {"00-config.json": config_map(o, f"{o.name}-config", "peer", files)}
    if keys is not None:
        out["01-keys.json"] = key_secret(o, keys)
    if telemetry_mode(config, o) == "broker":
        for i, obj in enumerate(broker(o, mosquitto_conf)):
            out[f"{2 + i:02d}-mqtt-{obj['kind'].lower()}.json"] = obj
    out["05-service.json"] = peer_service(config, o)
    out["06-statefulset.json"] = statefulset(config, o, env, keys is not None)
    return out


def check_pod_config(config: Config, in_pod: Config, overrides: Sequence[str]) -> None:
    """The config a pod reads (the file, then its environment) computes the same run as the one
    checked here: ``--set`` values survive their trip through ``DEMUON__…`` variables."""

    def math(c: Config) -> str:  # the edges file is read from the ConfigMap's copy in the pods
        return math_fingerprint(
            c.model_copy(update={"topology": c.topology.model_copy(update={"edges_file": None})})
        )

    if math(in_pod) != math(config):
        raise ConfigError("--set", list(overrides), "reads differently from the pods' environment")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(what, str(path), f"cannot read: {exc.strerror or exc}") from exc


def _stale(out: Path, keep: set[str]) -> list[Path]:
    """Manifests a previous ``demuon k8s`` wrote into ``out`` that this one does not (telemetry or
    security turned off since): left there, ``kubectl apply -f DIR`` would apply them again."""
    stale = []
    for path in sorted(out.glob("[0-9][0-9]-*.json")):
        try:
            labels = json.loads(path.read_text())["metadata"]["labels"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if path.name not in keep and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY:
            stale.append(path)
    return stale


def write_k8s(config_path: Path, out: Path, o: K8sOptions, overrides: Sequence[str] = ()) -> list[Path]:
    """Check everything, then write the manifests into ``out``; returns their paths."""
    check_options(o)
    config = load_config(config_path, list(overrides), environ={})  # the pods see no shell variables
    check_config(config, o)
    out.mkdir(parents=True, exist_ok=True)
    folder = key_folder(config, out)
    keys = key_files(folder, config.peers) if folder is not None else None
    edges = config.topology.edges_file
    docs = manifests(
        config,
        o,
        cluster_file=_read_text(config_path, "config"),
        overrides=overrides,
        keys=keys,
        edges=_read_text(edges, "topology.edges_file")
        if config.topology.name == "edge_list" and edges
        else None,
        mosquitto_conf=_read_text(MOSQUITTO_CONF, "broker config")
        if telemetry_mode(config, o) == "broker"
        else "",
    )
    env = {
        e["name"]: e["value"]
        for e in docs["06-statefulset.json"]["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    check_pod_config(config, load_config(config_path, environ=env), overrides)
    for name, doc in docs.items():
        if len(json.dumps(doc)) > MAX_OBJECT_BYTES:
            raise ConfigError("peers", config.peers, f"{name} outgrows the 1 MiB of one Kubernetes object")
    for path in _stale(out, set(docs)):
        path.unlink()
    paths = []
    for name, doc in docs.items():
        path = out / name
        secret = doc["kind"] == "Secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        paths.append(path)
    if folder is None:
        console.print(
            "[yellow]security.enabled = false:[/yellow] the peers' links are open to every pod of the cluster"
        )
    return paths


def cmd_k8s(args: argparse.Namespace) -> int:
    o = K8sOptions(
        image=args.image,
        broker_image=args.broker_image,
        namespace=args.namespace,
        name=args.name,
        cluster_domain=args.cluster_domain,
        gpu=args.gpu,
        storage=args.storage,
        storage_class=args.storage_class,
        cpu=args.cpu,
        memory=args.memory,
        mqtt=args.mqtt,
        external_broker=args.external_broker,
    )
    paths = write_k8s(Path(args.config), Path(args.out), o, args.set)
    console.print(f"wrote {len(paths)} manifests into {args.out}; start with: kubectl apply -f {args.out}")
    return 0
