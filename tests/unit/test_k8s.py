"""``demuon k8s``: the manifests pass Kubernetes 1.37's schemas (strict), give every pod the
cluster's endpoint list, and a setting that cannot work in the pods is refused before anything is
written, with one line naming it (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from demuon.app import cli
from demuon.app.k8s import K8sOptions, write_k8s
from demuon.config import load_config

ORACLE = Path(__file__).resolve().parents[2] / "demuon" / "configs" / "oracle-ring4.toml"
K8S_VERSION = "1.37.0"


def generate(out: Path, overrides: tuple[str, ...] = (), **options: Any) -> dict[str, dict[str, Any]]:
    """Write the oracle's manifests into ``out``; file name → object."""
    write_k8s(ORACLE, out, K8sOptions(**options), overrides)
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def peer_container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = docs["06-statefulset.json"]["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(docs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in peer_container(docs)["env"] if "value" in e}


VARIANTS = {
    "oracle": ((), {}),
    "telemetry": (("telemetry.mqtt_host='127.0.0.1'",), {}),  # a broker is generated, the host replaced
    "gpu": ((), {"gpu": 1}),
    "security-off": (("security.enabled=false",), {}),
    "metrics": (("telemetry.prometheus_port=9100", "telemetry.prometheus_host='0.0.0.0'"), {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_passes_strict_kubernetes_validation(tmp_path: Path, variant: str) -> None:
    overrides, options = VARIANTS[variant]
    docs = generate(tmp_path / "k8s", overrides, **options)
    for name, doc in docs.items():
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.37", name
    kinds = sorted(d["kind"] for d in docs.values())
    broker = ["ConfigMap", "Deployment", "Service"] if variant == "telemetry" else []
    secret = [] if variant == "security-off" else ["Secret"]
    assert kinds == sorted(["ConfigMap", "Service", "StatefulSet", *broker, *secret])
    ports = [p["containerPort"] for p in peer_container(docs)["ports"]]
    metrics = [9100, 9101, 9102, 9103] if variant == "metrics" else []
    assert ports == [27400, 27401, 27402, 27403, *metrics]


def test_the_statefulset_gives_peer_i_its_endpoint_through_the_headless_service(tmp_path: Path) -> None:
    docs = generate(tmp_path / "k8s", namespace="lab", name="ring")
    sts, svc = docs["06-statefulset.json"], docs["05-service.json"]
    assert sts["spec"]["replicas"] == 4 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] == "ring"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in svc["spec"]["ports"]] == [27400, 27401, 27402, 27403]
    c = peer_container(docs)
    index = c["env"][0]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert c["command"][c["command"].index("--peer") + 1] == f"$({index['name']})"
    # the config as a pod reads it: the file from the ConfigMap, then the pod's environment
    pod_config = load_config(ORACLE, environ=env_of(docs))
    for i in range(4):
        assert pod_config.endpoint(i) == f"tcp://ring-{i}.ring.lab.svc.cluster.local:{27400 + i}"
    assert pod_config.security.enabled is True and str(pod_config.security.key_dir) == "/keys"
    data = docs["00-config.json"]["data"]
    assert data["cluster.toml"] == ORACLE.read_text()


def test_gpu_telemetry_and_security_reach_the_pods(tmp_path: Path) -> None:
    docs = generate(tmp_path / "a", ("telemetry.mqtt_host='127.0.0.1'",), gpu=2)
    c = peer_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    pod_config = load_config(ORACLE, environ=env_of(docs))
    assert pod_config.device == "cuda"
    assert pod_config.telemetry.mqtt_host == "demuon-mqtt.default.svc.cluster.local"
    assert docs["04-mqtt-service.json"]["spec"]["ports"][0]["port"] == pod_config.telemetry.mqtt_port == 1883
    assert len(docs["01-keys.json"]["data"]) == 8  # peer-<i>.key and .key_secret for 4 peers
    pod = docs["06-statefulset.json"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 1000
    assert c["livenessProbe"]["exec"]["command"] == ["demuon", "health", "--out", "/runs"]
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
    assert mounts == {"/config": True, "/keys": True, "/runs": False}


def test_keys_are_kept_and_stale_manifests_removed_when_regenerated(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    first = generate(out, ("telemetry.mqtt_host='127.0.0.1'",))
    (out / "notes.json").write_text("{}")  # not ours: left alone
    again = generate(out, ("security.enabled=false",))
    assert "01-keys.json" not in again and "03-mqtt-deployment.json" not in again
    assert (out / "notes.json").exists() and (out / "keys" / "peer-3.key_secret").exists()
    third = generate(out)
    assert third["01-keys.json"]["data"] == first["01-keys.json"]["data"]


BAD = {
    "topology option": (["--set", "topology.name='torus'", "--set", "topology.rows=3"], "rows=3"),
    "topology name": (["--set", "topology.name='rong'"], "'rong'"),
    "missing key folder": (
        ["--set", "security.enabled=true", "--set", "security.key_dir='/nonexistent/keys'"],
        "/nonexistent/keys",
    ),
    "loopback broker": (["--set", "telemetry.mqtt_host='127.0.0.1'", "--external-broker"], "127.0.0.1"),
    "loopback metrics": (["--set", "telemetry.prometheus_port=9100"], "127.0.0.1"),
    "key folder without a key": (
        ["--set", "security.enabled=true", "--set", "security.key_dir='KEYS'"],
        "has no peer-3.key",
    ),
    "port past 65535": (["--set", "network.base_port=65000", "--set", "peers=600"], "65599"),
    "set without =": (["--set", "rounds"], "'rounds'"),
    "set unknown key": (["--set", "algorithm.lrr=0.1"], "lrr"),
    "checkpoint on the host": (["--set", "checkpoint.dir='runs/ck'"], "runs/ck"),
    "cuda without a gpu": (["--set", "device='cuda'"], "'cuda'"),
    "namespace": (["--namespace", "Lab_1"], "Lab_1"),
    "storage": (["--storage", "1GB"], "1GB"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_setting_that_cannot_work_in_the_pods_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, named = BAD[case]
    out = tmp_path / "k8s"
    keys = tmp_path / "keys"  # peers 0..2 only
    for i in range(3):
        for suffix in (".key", ".key_secret"):
            (keys / f"peer-{i}{suffix}").parent.mkdir(exist_ok=True)
            (keys / f"peer-{i}{suffix}").write_text("x")
    args = [a.replace("KEYS", str(keys)) for a in args]
    code = cli.main(["k8s", "--config", str(ORACLE), "--out", str(out), *args])
    stdout, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stdout + err, err
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert not list(out.glob("*.json")), "nothing is written for a refused config"


def test_an_edge_list_travels_in_the_config_map_and_set_overrides_in_the_environment(tmp_path: Path) -> None:
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n")
    sets = ("topology.name='edge_list'", f"topology.edges_file='{edges}'", "algorithm.lr=0.3")
    docs = generate(tmp_path / "k8s", sets)
    assert docs["00-config.json"]["data"]["edges.txt"] == edges.read_text()
    pod_config = load_config(ORACLE, environ=env_of(docs))
    assert str(pod_config.topology.edges_file) == "/config/edges.txt"
    assert pod_config.topology.name == "edge_list" and pod_config.algorithm.lr == 0.3


def test_a_set_value_the_pods_would_read_differently_is_refused() -> None:
    from demuon.app.k8s import check_pod_config
    from demuon.errors import ConfigError

    here, in_pod = load_config(ORACLE, environ={}), load_config(ORACLE, ["algorithm.lr=0.5"], environ={})
    check_pod_config(here, here.model_copy(update={"device": "cuda"}), [])  # run-local: the same run
    with pytest.raises(ConfigError, match="reads differently"):
        check_pod_config(here, in_pod, ["algorithm.lr=0.5"])
