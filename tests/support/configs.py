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
