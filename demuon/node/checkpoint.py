"""Checkpoints of one peer: written atomically, checked on load (layer 5).

A checkpoint is one file ``<dir>/peer-<id>.pt`` (``torch.save`` of plain containers and tensors,
loaded back with ``weights_only=True``, so loading never runs code from the file)::

    {"format": "demuon.checkpoint/1", "peer": id, "round": last completed round,
     "config": demuon.config.math_fingerprint of the run's settings, "state": Peer.state_dict(),
     "rng": {"torch": ByteTensor, "python": random.getstate()}}

Writes go through :func:`demuon.atomic.atomic_write_bytes` (temp file in the same folder, flush,
fsync, ``os.replace``, fsync of the folder): a crash mid-write leaves the previous checkpoint as it
was. :func:`load_checkpoint` raises :class:`~demuon.errors.CheckpointError` naming the path for a
missing, unreadable or truncated file, another peer's checkpoint, or a different configuration.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from demuon.atomic import atomic_write_bytes
from demuon.errors import CheckpointError
from demuon.node.peer import Peer

FORMAT = "demuon.checkpoint/1"


def checkpoint_path(directory: Path, peer_id: int) -> Path:
    return Path(directory) / f"peer-{peer_id}.pt"


def save_checkpoint(directory: Path, peer: Peer, fingerprint: str) -> Path:
    """Write peer ``peer``'s state after its last completed round (``peer.round``), tagged with
    the run's ``fingerprint`` (``demuon.config.math_fingerprint``). Returns the path."""
    blob = {
        "format": FORMAT,
        "peer": peer.index,
        "round": peer.round,
        "config": fingerprint,
        "state": peer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    path = checkpoint_path(directory, peer.index)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(directory: Path, peer_id: int, fingerprint: str) -> dict[str, Any]:
    """Read and check peer ``peer_id``'s checkpoint; see the module docstring for what fails."""
    path = checkpoint_path(directory, peer_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint for peer {peer_id}", path=str(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc.strerror}", path=str(path)) from exc
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unexpected types: all mean "corrupt"
        raise CheckpointError(f"corrupt checkpoint ({type(exc).__name__})", path=str(path)) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} file", path=str(path))
    missing = [key for key in ("peer", "round", "config", "state", "rng") if key not in blob]
    if missing:
        raise CheckpointError(f"corrupt checkpoint (missing {missing})", path=str(path))
    if blob["peer"] != peer_id:
        raise CheckpointError(f"checkpoint is peer {blob['peer']}'s, not peer {peer_id}'s", path=str(path))
    if blob["config"] != fingerprint:
        raise CheckpointError("checkpoint was written with a different configuration", path=str(path))
    return blob


def restore(peer: Peer, blob: dict[str, Any]) -> int:
    """Load a checked checkpoint into ``peer`` and the RNGs. Returns the round to run next."""
    peer.load_state_dict(blob["state"])
    torch.set_rng_state(blob["rng"]["torch"])
    version, state, gauss = blob["rng"]["python"]
    random.setstate((version, tuple(state), gauss))
    return int(blob["round"]) + 1
