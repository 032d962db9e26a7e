"""Configs the fault and membership tests share: 8 peers, DeMuon with η 0.05 and a linear decay,
float64 (so invariants can be held to 1e-9), seed 1, one evaluation at the end."""

from __future__ import annotations

from typing import Any

from demuon.config import Config, config_from_dict


def eight_peers(
    workload: str,
    rounds: int,
    *,
    topology: str = "ring",
    tracker: str = "running_sum",
    faults: dict[str, Any] | None = None,
) -> Config:
    return config_from_dict(
        {
            "peers": 8,
            "rounds": rounds,
            "seed": 1,
            "dtype": "float64",
            "eval_every": rounds,
            "topology": {"name": topology},
            "algorithm": {"name": "demuon", "lr": 0.05, "schedule": {"kind": "linear"}},
            "gossip": {"tracker": tracker},
            "workload": {"kind": workload},
            "faults": faults or {},
        }
    )


def tiny_cluster_toml(*, rounds: int, phase_timeout_s: float, extra: str = "") -> str:
    """A 2-peer cluster file on the complete graph with a small least-squares workload (the CLI
    tests write it to a temp folder); ``extra`` is appended as TOML."""
    return (
        f'peers = 2\nrounds = {rounds}\ndevice = "cpu"\n[topology]\nname = "complete"\n'
        '[workload]\nkind = "quadratic"\nrows = 8\ndim_in = 4\ndim_out = 2\n'
        f"[network]\nstart_timeout_s = 1.0\nphase_timeout_s = {phase_timeout_s}\n{extra}"
    )
