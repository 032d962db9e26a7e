"""The ``Workload`` protocol and deterministic randomness helpers (the factory is ``factory.make_workload``).

A workload is what a peer trains: it builds the (identical) initial model, hands out the
mini-batch of peer ``i`` at round ``k`` and scores a model on held-out data. Every random draw is
made from a local :class:`torch.Generator` whose seed is a stable hash of the workload seed and a
tag (plus peer and round where they matter), so that eight peers in eight processes on three
machines draw exactly the same numbers and the global RNG is never read or advanced.

Layer 2: pure torch, no I/O beyond reading a corpus, never imports ``demuon.node`` or
``demuon.topology``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from demuon.errors import WorkloadError

# Every tensor a workload creates has this dtype (models and data), whatever the global default.
DTYPE = torch.float32


@runtime_checkable
class Workload(Protocol):
    """What a peer needs to train: an initial model, its mini-batches and a validation score."""

    def build_model(self, seed: int) -> torch.nn.Module:
        """The initial model; identical parameters on every peer and process for one ``seed``."""
        ...

    def train_batch(self, peer: int, n_peers: int, k: int) -> Any:
        """The batch of ``peer`` (of ``n_peers``) at round ``k``; deterministic in (seed, peer, k)."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (differentiable)."""
        ...

    def validation_loss(self, model: torch.nn.Module) -> float:
        """Deterministic loss on held-out data; no gradients, ``model``'s train/eval mode kept."""
        ...


def derive_seed(seed: int, tag: str, *parts: int) -> int:
    """A 63-bit seed from ``(seed, tag, *parts)`` via BLAKE2b (stable across processes/platforms,
    unlike ``hash()`` of a string)."""
    text = repr((int(seed), tag, *(int(p) for p in parts))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def generator(seed: int, tag: str, *parts: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`derive_seed` (draw on CPU, then move to a device,
    so the numbers do not depend on the device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, tag, *parts))
    return g


def sample_rows(n: int, batch: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``batch`` row indices out of ``n``: without replacement when possible, else with."""
    if batch <= n:
        rows = torch.randperm(n, generator=g)[:batch]
    else:
        rows = torch.randint(n, (batch,), generator=g)
    return rows.to(device)


def check_peer(peer: int, n_peers: int) -> None:
    """Raise :class:`WorkloadError` unless ``0 <= peer < n_peers``."""
    if n_peers < 1 or not 0 <= peer < n_peers:
        raise WorkloadError(f"peer {peer} is not in 0..{n_peers - 1}", value=peer)


def evaluate(model: torch.nn.Module, batches: list[Any], loss: Callable[[Any], torch.Tensor]) -> float:
    """Mean of ``loss(batch)`` over ``batches`` in eval mode without gradients; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = sum(float(loss(b)) for b in batches)
    finally:
        model.train(was_training)
    return total / len(batches)
