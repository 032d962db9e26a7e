"""Checkpoints of one peer: written atomically, the last two kept, checked on load (layer 5).

A checkpoint is one file: the ``torch.save`` bytes (the payload) of plain containers and tensors,
then a fixed 60-byte trailer with the payload's length and SHA-256. The payload is loaded back with
``weights_only=True``, so loading never runs code from the file::

    payload = torch.save({"format": "demuon.checkpoint/2", "peer": id, "round": last completed round,
                          "config": demuon.config.math_fingerprint of the run's settings,
                          "state": Peer.state_dict(),
                          "rng": {"torch": ByteTensor, "python": random.getstate()}})
    trailer = 8-byte payload length (big-endian), 32-byte SHA-256 of the payload, b"demuon.checkpoint/2\n"

The trailer follows the zip's end record, which zip readers find by searching from the end, so a
plain ``torch.load`` still reads the file (without checking anything); truncation removes the
trailer; a flipped bit fails the trailer's magic, the length or the digest.

The newest is ``<dir>/peer-<id>.pt``, the one before it ``<dir>/peer-<id>.prev.pt``. A save writes
the new file through :func:`demuon.atomic.atomic_write_bytes` (temp file in the same folder, flush,
fsync) and only then renames the newest to ``.prev.pt`` and the temp file to ``.pt``: the last good
checkpoint is never gone before the new one is complete. Temp files that a killed process left
(``.peer-<id>.pt.<random>``) are removed by :func:`remove_leftover_temp_files`, which each save and
``demuon run`` (``prepare``) call first.

:func:`load_checkpoint` reads the newest. If it is damaged (:class:`CheckpointDamaged`: missing,
unreadable, truncated, failing its digest, not parsing) and the previous one is good, it logs one
warning line and returns the previous one. It raises :class:`~demuon.errors.CheckpointError` naming
the newest path when neither is usable, and for another peer's checkpoint or a different
configuration (:class:`CheckpointMismatch`, never passed over for the older file).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import struct
from pathlib import Path
from typing import Any

import torch

from demuon.atomic import atomic_write_bytes, remove_temp_files
from demuon.errors import CheckpointError
from demuon.node.peer import Peer

FORMAT = "demuon.checkpoint/2"

#: Trailer of a checkpoint file: payload length, payload SHA-256, magic (``FORMAT`` and a newline).
TRAILER = struct.Struct(f">Q32s{len(FORMAT) + 1}s")
_MAGIC = f"{FORMAT}\n".encode()
_KEYS = ("peer", "round", "config", "state", "rng")

log = logging.getLogger(__name__)


class CheckpointDamaged(CheckpointError):
    """The file at ``path`` holds no checkpoint (missing, unreadable, truncated, failing its
    digest, not parsing); an older checkpoint may stand in. ``reason`` is the message alone."""

    def __init__(self, reason: str, *, path: Path) -> None:
        self.reason = reason
        super().__init__(reason, path=str(path))


class CheckpointMismatch(CheckpointError):
    """The file at ``path`` is intact but another peer's or another configuration's."""

    def __init__(self, reason: str, *, path: Path) -> None:
        self.reason = reason
        super().__init__(reason, path=str(path))


def checkpoint_path(directory: Path, peer_id: int) -> Path:
    """The newest checkpoint of peer ``peer_id``."""
    return Path(directory) / f"peer-{peer_id}.pt"


def previous_path(directory: Path, peer_id: int) -> Path:
    """The checkpoint of peer ``peer_id`` written before the newest."""
    return Path(directory) / f"peer-{peer_id}.prev.pt"


def remove_leftover_temp_files(directory: Path, peer_id: int) -> list[Path]:
    """Remove the temp files of peer ``peer_id``'s checkpoints that interrupted writes left in
    ``directory`` (call only from the process that writes them). Returns the removed paths."""
    removed = [
        *remove_temp_files(checkpoint_path(directory, peer_id)),
        *remove_temp_files(previous_path(directory, peer_id)),
    ]
    if removed:
        log.info("removed %d temp file(s) of interrupted checkpoint writes in %s", len(removed), directory)
    return removed


def save_checkpoint(directory: Path, peer: Peer, fingerprint: str) -> Path:
    """Write peer ``peer``'s state after its last completed round (``peer.round``), tagged with
    the run's ``fingerprint`` (``demuon.config.math_fingerprint``), keeping the one before it.
    Returns the path."""
    blob = {
        "format": FORMAT,
        "peer": peer.index,
        "round": peer.round,
        "config": fingerprint,
        "state": peer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    remove_leftover_temp_files(directory, peer.index)
    path = checkpoint_path(directory, peer.index)
    atomic_write_bytes(path, encode(blob), previous=previous_path(directory, peer.index))
    return path


def encode(blob: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``blob``: the ``torch.save`` payload, then the trailer."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    payload = buf.getvalue()
    return payload + TRAILER.pack(len(payload), hashlib.sha256(payload).digest(), _MAGIC)


def load_checkpoint(directory: Path, peer_id: int, fingerprint: str) -> dict[str, Any]:
    """Read and check peer ``peer_id``'s newest checkpoint, or the previous one when the newest is
    damaged; see the module docstring for what fails."""
    newest, previous = checkpoint_path(directory, peer_id), previous_path(directory, peer_id)
    try:
        return read_checkpoint(newest, peer_id, fingerprint)
    except CheckpointDamaged as damage:
        if not previous.exists():
            raise
        return _fall_back(damage, previous, peer_id, fingerprint)


def _fall_back(damage: CheckpointDamaged, previous: Path, peer_id: int, fingerprint: str) -> dict[str, Any]:
    try:
        blob = read_checkpoint(previous, peer_id, fingerprint)
    except (CheckpointDamaged, CheckpointMismatch) as also:
        raise CheckpointError(
            f"{damage.reason}; the previous checkpoint {previous} is unusable too: {also.reason}",
            path=damage.path,
        ) from damage
    log.warning(
        "checkpoint %s is damaged (%s); falling back to %s of round %d",
        damage.path,
        damage.reason,
        previous,
        blob["round"],
    )
    return blob


def read_checkpoint(path: Path, peer_id: int, fingerprint: str) -> dict[str, Any]:
    """Read and check the one checkpoint file ``path`` (no fallback)."""
    blob = _parse(_payload(_read(path, peer_id), path), path)
    if blob["peer"] != peer_id:
        raise CheckpointMismatch(f"checkpoint is peer {blob['peer']}'s, not peer {peer_id}'s", path=path)
    if blob["config"] != fingerprint:
        raise CheckpointMismatch("checkpoint was written with a different configuration", path=path)
    return blob


def _read(path: Path, peer_id: int) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointDamaged(f"no checkpoint for peer {peer_id}", path=path) from None
    except OSError as exc:
        raise CheckpointDamaged(f"cannot read checkpoint: {exc.strerror}", path=path) from exc


def _payload(data: bytes, path: Path) -> memoryview:
    """The ``torch.save`` bytes of a checkpoint file, once its trailer, length and digest check."""
    if len(data) < TRAILER.size or not data.endswith(_MAGIC):
        raise CheckpointDamaged(
            f"corrupt checkpoint: no {FORMAT} trailer (truncated, or written in an older format)", path=path
        )
    length, digest, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    payload = memoryview(data)[: len(data) - TRAILER.size]
    if len(payload) != length:
        raise CheckpointDamaged(
            f"corrupt checkpoint: {len(payload)} payload bytes, the trailer says {length}", path=path
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointDamaged("corrupt checkpoint: SHA-256 digest does not match the contents", path=path)
    return payload


def _parse(payload: memoryview, path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # bad zip, bad pickle, unexpected types: all mean "corrupt"
        raise CheckpointDamaged(f"corrupt checkpoint ({type(exc).__name__})", path=path) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointDamaged(f"corrupt checkpoint: not a {FORMAT} payload", path=path)
    missing = [key for key in _KEYS if key not in blob]
    if missing:
        raise CheckpointDamaged(f"corrupt checkpoint (missing {missing})", path=path)
    return blob


def restore(peer: Peer, blob: dict[str, Any]) -> int:
    """Load a checked checkpoint into ``peer`` and the RNGs. Returns the round to run next."""
    peer.load_state_dict(blob["state"])
    torch.set_rng_state(blob["rng"]["torch"])
    version, state, gauss = blob["rng"]["python"]
    random.setstate((version, tuple(state), gauss))
    return int(blob["round"]) + 1
