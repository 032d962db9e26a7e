"""Command line: ``demuon simulate | demo | run | launch | report | compose | k8s | watch | keys generate``.

This module only builds the parser. Each command's module is imported when that command runs, so
``demuon --help``, ``demuon --version`` and ``demuon keys …`` never import torch or matplotlib
(a test checks it). Every ``--help`` shows the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from demuon import __version__

#: The algorithms ``--algorithms`` accepts (kept in step with config.AlgorithmName by a test,
#: so that building the parser does not import pydantic).
ALGORITHMS = ("demuon", "dsgd", "dsgd_clip", "gt_dsgd", "gt_nsgdm")

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, function: str) -> Handler:
    """A handler that imports ``demuon.app.<module>`` only when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        fn: Handler = getattr(importlib.import_module(f"demuon.app.{module}"), function)
        return fn(args)

    handler.__qualname__ = f"{module}.{function}"
    return handler


def _set(p: argparse.ArgumentParser, what: str = "a setting") -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"override {what}, e.g. rounds=20"
    )


def _faults(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--faults", type=Path, metavar="FILE", help="fault plan (TOML), replaces the config's [faults]"
    )


def _positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (the message is argparse's one error line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {value}")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: …)`` for every option that has a default worth showing, and never wraps
    a line inside a hyphenated word (an image name such as ``demuon-mosquitto:latest``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _launch_options(la: argparse.ArgumentParser) -> None:
    la.add_argument("--config", type=Path, required=True, help="cluster TOML file")
    la.add_argument("--out", type=Path, required=True, help="folder for peer-<i>/ and summary.json")
    _set(la, "a setting of every peer")
    _faults(la)
    la.add_argument("--no-live", action="store_true", help="print a line every --every rounds, no live table")
    la.add_argument("--every", type=_positive_int, default=10, help="rounds between lines with --no-live")
    la.add_argument(
        "--grace", type=float, help="seconds between SIGTERM and SIGKILL (default: 2 deadlines + 5)"
    )
    la.add_argument("--timeout", type=float, help="stop the peers after this many seconds (default: none)")


def build_parser() -> argparse.ArgumentParser:
    fmt: Any = _Formatter
    p = argparse.ArgumentParser(
        prog="demuon", description="peer-to-peer decentralized Muon training", formatter_class=fmt
    )
    p.add_argument("--version", action="version", version=f"demuon {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="N peers in one process with exact mixing", formatter_class=fmt)
    s.add_argument("--config", type=Path, help="TOML experiment file (default: built-in defaults)")
    _set(s)
    s.add_argument("--out", type=Path, help="run folder: peer-<i>/metrics.jsonl, cluster.jsonl, summary.json")
    s.add_argument("--algorithms", help=f"comma-separated, side by side ({','.join(ALGORITHMS)})")
    s.add_argument(
        "--server",
        action="store_true",
        help="EF21-Muon: the peers are workers of one server (uplink codec gossip.v, downlink gossip.x)",
    )
    _faults(s)
    s.set_defaults(func=_lazy("commands", "cmd_simulate"))

    d = sub.add_parser("demo", help="the default demonstration (what `make demo` runs)", formatter_class=fmt)
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    _set(d)
    d.add_argument("--simulate", action="store_true", help="compare algorithms in the simulator instead")
    d.set_defaults(func=_lazy("commands", "cmd_demo"))

    r = sub.add_parser("run", help="run one peer of a cluster (ZeroMQ gossip)", formatter_class=fmt)
    r.add_argument("--config", type=Path, required=True, help="the cluster's TOML file (same on every peer)")
    r.add_argument("--peer", type=int, required=True, help="this peer's id, 0..peers-1")
    r.add_argument("--out", type=Path, help="output folder (default: runs/peer-<id>)")
    again = r.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from this peer's checkpoint")
    again.add_argument(
        "--resume-if-present", action="store_true", help="resume when a checkpoint is there, else start fresh"
    )
    r.add_argument(
        "--hold-when-done",
        action="store_true",
        help="after the last round stay up (status done) until SIGTERM (for a StatefulSet)",
    )
    _set(r)
    _faults(r)
    r.set_defaults(func=_lazy("run", "cmd_run"))

    la = sub.add_parser(
        "launch", help="run every peer of a cluster file on this machine", formatter_class=fmt
    )
    _launch_options(la)
    again = la.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="restart every peer from its checkpoint in --out (run --resume)"
    )
    again.add_argument(
        "--force", action="store_true", help="remove a previous run in --out first (keys/ is kept)"
    )
    la.set_defaults(func=_lazy("launch", "cmd_launch"))

    nl = sub.add_parser(
        "netlab", help="launch with every peer in its own network namespace (root)", formatter_class=fmt
    )
    _launch_options(nl)
    nl.add_argument("--cut", action="append", default=[], metavar="PEER@ROUND+SECONDS", help="unplug a link")
    nl.add_argument("--rate", action="append", default=[], metavar="PEER=RATE", help="tc tbf, e.g. 2=16kbit")
    nl.add_argument(
        "--loss", action="append", default=[], metavar="PEER=PERCENT", help="iptables random drop"
    )
    nl.set_defaults(func=_lazy("netlab", "cmd_netlab"))

    rp = sub.add_parser("report", help="table and plots of a launch/simulate folder", formatter_class=fmt)
    rp.add_argument("dir", type=Path, help="output folder of `demuon launch` or `demuon simulate`")
    rp.add_argument("--config", type=Path, help="the run's config: rebuild a missing launch summary.json")
    _set(rp, "a setting, as given to launch")
    rp.set_defaults(func=_lazy("report", "cmd_report"))

    c = sub.add_parser(
        "compose", help="write a docker-compose file, one service per peer", formatter_class=fmt
    )
    c.add_argument("--config", type=Path, required=True, help="cluster TOML file")
    c.add_argument("--out", type=Path, default=Path("docker-compose.yml"), help="compose file to write")
    _set(c, "a setting of every peer")
    c.add_argument("--mqtt", action="store_true", help="add a mosquitto service and point telemetry at it")
    c.add_argument("--image", default="demuon:latest", help="image of the peer services")
    c.add_argument("--broker-image", default="demuon-mosquitto:latest", help="image of the mosquitto service")
    c.add_argument("--subnet", metavar="CIDR", help="IPv4 subnet of the compose network (default: Docker's)")
    c.set_defaults(func=_lazy("compose", "cmd_compose"))

    ks = sub.add_parser("k8s", help="write Kubernetes manifests, one pod per peer", formatter_class=fmt)
    ks.add_argument("--config", type=Path, required=True, help="cluster TOML file")
    ks.add_argument("--out", type=Path, required=True, help="folder for the manifests (and keys/)")
    _set(ks, "a setting of every peer")
    ks.add_argument("--image", default="demuon:latest", help="image of the peer pods")
    ks.add_argument("--broker-image", default="demuon-mosquitto:latest", help="image of the MQTT broker")
    ks.add_argument("--namespace", default="default", help="namespace of every object (not created)")
    ks.add_argument("--name", default="demuon", help="StatefulSet and headless Service name; pods NAME-<i>")
    ks.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    ks.add_argument("--gpu", type=int, default=0, help="nvidia.com/gpu per pod (> 0 sets device = cuda)")
    ks.add_argument("--storage", default="1Gi", help="size of each peer's /runs volume claim")
    ks.add_argument("--storage-class", help="storage class of the claims (default: the cluster's)")
    ks.add_argument("--cpu", help="CPU request per pod (default: the config's threads)")
    ks.add_argument("--memory", default="1Gi", help="memory request and limit per pod")
    broker = ks.add_mutually_exclusive_group()
    broker.add_argument("--mqtt", action="store_true", help="telemetry on, with a generated broker")
    broker.add_argument(
        "--external-broker", action="store_true", help="keep the config's telemetry.mqtt_host; no broker"
    )
    ks.set_defaults(func=_lazy("k8s", "cmd_k8s"))

    h = sub.add_parser("health", help="exit 0 if a peer's run is alive (status.json)", formatter_class=fmt)
    h.add_argument("--out", type=Path, required=True, help="the peer's output folder (demuon run --out)")
    h.add_argument("--max-age-s", type=float, help="oldest live status (default: the status file's own)")
    h.set_defaults(func=_lazy("health", "cmd_health"))

    w = sub.add_parser("watch", help="every peer's status and metrics, from MQTT", formatter_class=fmt)
    w.add_argument(
        "--broker", required=True, metavar="URL", help="mqtt://HOST:PORT or mqtts://[USER@]HOST:PORT"
    )
    w.add_argument("--run", metavar="NAME", help="only this run (telemetry.run_id; default: every run)")
    w.add_argument("--prefix", default="demuon", help="telemetry.topic_prefix of the cluster")
    w.add_argument("--once", action="store_true", help="print one snapshot once the statuses have settled")
    w.add_argument("--json", action="store_true", help="with --once: a JSON document instead of a table")
    w.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds (--once: 5)")
    w.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA bundle for mqtts:// (default: system CAs)")
    w.set_defaults(func=_lazy("watch", "cmd_watch"))

    k = sub.add_parser("keys", help="CURVE key management", formatter_class=fmt)
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kg = ksub.add_parser("generate", help="write one CURVE keypair per peer into DIR", formatter_class=fmt)
    kg.add_argument("dir", type=Path, help="folder for peer-<id>.key and peer-<id>.key_secret")
    kg.add_argument("--peers", type=int, default=8, help="number of peers (ids 0..N-1)")
    kg.add_argument("--force", action="store_true", help="overwrite keys already in DIR")
    kg.set_defaults(func=_lazy("commands", "cmd_keys"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from rich.console import Console
        from rich.markup import escape

        from demuon.errors import DemuonError

        console = Console(stderr=True)
        try:
            return int(args.func(args))
        except DemuonError as exc:
            # unwrapped and unformatted: paths and values in the message must survive copy and paste
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            return 2
    except KeyboardInterrupt:  # also one that lands while the modules are still being imported
        sys.stderr.write("demuon: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
