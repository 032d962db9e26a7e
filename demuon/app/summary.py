"""``summary.json`` of a launch folder, rebuilt from what the peers left behind (layer 6).

``demuon launch`` writes it when its peers have exited; ``demuon report --config`` rebuilds a
missing one. Each peer's final state comes from the best source its folder has: ``final.json`` and
``final.pt`` (it finished), else its checkpoint (it was stopped), else the last
``metrics.jsonl`` row (no tensors). The validation loss is that of the average of every peer's
final (or checkpointed) parameters, computed as the simulator computes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from demuon import results
from demuon.config import PHASES, Config, math_fingerprint
from demuon.errors import WorkloadError


def codec_label(config: Config) -> str:
    """The codec kind of both phases, or ``V=<kind> X=<kind>`` when they differ."""
    v, x = (config.gossip.codec_for(ph).kind for ph in PHASES)
    return v if v == x else f"V={v} X={x}"


def config_fields(config: Config) -> dict[str, Any]:
    """The settings every ``summary.json`` names (:func:`demuon.results.summary`)."""
    return {
        "algorithm": config.algorithm.name,
        "topology": config.topology.name,
        "codec": codec_label(config),
        "phases": {
            ph: {
                "codec": config.gossip.codec_for(ph).model_dump(mode="json"),
                "gamma": config.gossip.gamma_for(ph),
            }
            for ph in PHASES
        },
        "lr": config.algorithm.lr,
        "dtype": config.dtype,
        "rounds": config.rounds,
    }


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def average_validation_loss(config: Config, states: Sequence[Mapping[str, Any]]) -> float | None:
    """Validation loss of the averaged model (None without any peer's tensors)."""
    import torch

    from demuon.node.observe import averaged_validation_loss
    from demuon.node.peer import resolve_dtype
    from demuon.workloads import make_workload

    if not states:
        return None
    workload = make_workload(config.workload, seed=config.seed, device=torch.device("cpu"))
    return averaged_validation_loss(workload, config.seed, states, dtype=resolve_dtype(config.dtype))


def peer_final(config: Config, directory: Path, peer: int) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """Peer ``peer``'s summary entry and final tensors (see the module docstring); the entry's
    ``from`` names the source."""
    import torch

    from demuon.errors import CheckpointError
    from demuon.node.checkpoint import load_checkpoint
    from demuon.node.peer import fingerprint

    folder = results.peer_folder(directory, peer)
    metrics = folder / results.METRICS
    rows = results.read_metrics(metrics) if metrics.is_file() else []
    if (folder / "final.json").is_file():
        data = json.loads((folder / "final.json").read_text())
        fp, loss = data["fingerprint"], data.get("final_train_loss")
        entry = results.peer_entry(
            peer,
            int(data["final_round"]),
            _nan(loss),
            (_nan(fp["sum"]), _nan(fp["l2"])),
            status=str(data.get("status", "done")),
            source="final",
        )
        pt = folder / "final.pt"
        state = torch.load(pt, map_location="cpu", weights_only=True) if pt.is_file() else None
        return entry, state
    try:
        blob = load_checkpoint(config.checkpoint.dir or folder / "checkpoint", peer, math_fingerprint(config))
    except CheckpointError:
        blob = None
    if blob is not None:
        k, state = int(blob["round"]), blob["state"]["model"]
        loss = next((r.get("train_loss") for r in reversed(rows) if r.get("round") == k), None)
        entry = results.peer_entry(
            peer, k, _nan(loss), fingerprint(list(state.values())), status="stopped", source="checkpoint"
        )
        return entry, state
    last = rows[-1] if rows else {}
    entry = results.peer_entry(
        peer,
        int(last.get("round", -1)),
        _nan(last.get("train_loss")),
        (math.nan, math.nan),
        status="stopped",
        source="metrics" if rows else "none",
    )
    return entry, None


def launch_summary(
    config: Config,
    directory: Path,
    statuses: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    interrupted: bool = False,
    wall_s: float = math.nan,
) -> dict[str, Any]:
    """The shared summary (``source="launch"``) of a launch folder. ``statuses`` overrides
    per-peer fields (``status``, ``exit_code``) from whoever watched the processes."""
    entries, states = [], {}
    rows = results.read_per_peer(directory)
    for i in range(config.peers):
        entry, state = peer_final(config, directory, i)
        entries.append({**entry, **(statuses or {}).get(i, {})})
        if state is not None and entries[-1]["status"] != "left":  # the average is the survivors'
            states[i] = state
    try:
        val = average_validation_loss(config, list(states.values()))
    except (KeyError, RuntimeError, WorkloadError) as exc:  # tensors that do not fit, no workload
        Console(stderr=True).print(f"[yellow]warning:[/yellow] validation of the average failed: {exc}")
        val = None
    return results.summary(
        source="launch",
        **config_fields(config),
        peers=entries,
        validation_loss=val,
        averaged_peers=sorted(states),
        wall_s=wall_s,
        interrupted=interrupted,
        tracking_drift=checkpointed_drift(
            config, directory, left={e["id"] for e in entries if e["status"] == "left"}
        ),
        faults=results.fault_totals(rows),
        per_peer_rows=rows,
    )


def checkpointed_drift(config: Config, directory: Path, left: Collection[int] = ()) -> float | None:
    """The tracking drift of a launch from every staying peer's last checkpoint (its V, M and
    running sums), with its view of the last round; None if a peer has no usable checkpoint."""
    from demuon.app.peers import view_at
    from demuon.errors import CheckpointError
    from demuon.node.checkpoint import load_checkpoint
    from demuon.node.observe import TrackerState, tracking_drift

    fingerprint = math_fingerprint(config)
    states = []
    for i in range(config.peers):
        if i in left:
            continue
        folder = results.peer_folder(directory, i)
        try:
            blob = load_checkpoint(config.checkpoint.dir or folder / "checkpoint", i, fingerprint)
        except CheckpointError:
            return None
        s = blob["state"]
        last = view_at(config, i, int(blob["round"]))
        rho = {int(j): r for j, r in s.get("rho", {}).items()}
        copies = {int(j): r for j, r in s.get("R", {}).get("V", {}).items()}
        states.append(
            TrackerState(
                i,
                s["V"],
                s["M"],
                s.get("S", {}),
                rho,
                last.in_neighbours,
                s.get("R_self", {}).get("V", {}),
                copies,
                config.gossip.gamma_for("V"),
                {int(j): b for j, b in s.get("B", {}).items()},
            )
        )
    return tracking_drift(states)
