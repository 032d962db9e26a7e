"""Small typed errors that carry fields (layer 1: imports nothing from demuon).

Every error names what was wrong and the offending value, so a user reading one line of a log
knows what to change. Subsystems subclass these (e.g. ``transport.wire`` subclasses
``WireFormatError`` once per kind of bad input).
"""

from __future__ import annotations

from typing import Any


class DemuonError(Exception):
    """Base class of every error the package raises on purpose."""


class ConfigError(DemuonError, ValueError):
    """A setting has a bad value. ``field`` is the dotted path, ``value`` what was given."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}" if field else reason)


class TopologyError(DemuonError, ValueError):
    """A graph or mixing matrix is unusable. ``problem`` is a short machine-readable kind
    (``"negative_entry"``, ``"row_sum"``, ``"column_sum"``, ``"non_edge_weight"``,
    ``"not_mixing"``, ``"disconnected"``, ``"bad_size"``, ``"bad_option"``, ``"bad_file"``),
    ``where`` locates it (an index, an edge, an option name) and ``value`` is the offending number."""

    def __init__(self, problem: str, message: str, *, where: Any = None, value: Any = None) -> None:
        self.problem = problem
        self.where = where
        self.value = value
        super().__init__(f"{problem}: {message}")


class WireFormatError(DemuonError):
    """A received message is malformed or not acceptable. ``kind`` names the check that failed
    (subclasses set it); the receiver counts rejections by ``kind`` and drops the message."""

    kind: str = "wire"

    def __init__(self, message: str, **fields: Any) -> None:
        self.fields = fields
        super().__init__(f"{self.kind}: {message}")


class TransportError(DemuonError):
    """A transport could not do what was asked (bind failed, closed, unknown peer)."""

    def __init__(self, message: str, *, peer: int | None = None, endpoint: str | None = None) -> None:
        self.peer = peer
        self.endpoint = endpoint
        super().__init__(message)


class WorkloadError(DemuonError, ValueError):
    """A workload cannot be built (missing corpus, bad ``module:function`` reference, ...)."""

    def __init__(self, message: str, *, value: Any = None) -> None:
        self.value = value
        super().__init__(message)


class CheckpointError(DemuonError):
    """A checkpoint is missing, corrupt, or belongs to another peer or configuration."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{message} ({path})" if path else message)
