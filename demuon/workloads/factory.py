"""``make_workload``: the workload a ``[workload]`` config section describes (layer 2).

Kept apart from :mod:`demuon.workloads.base` (the protocol and shared helpers that every
workload imports), so the built-in workloads can be imported at the top without a cycle.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from demuon.config import CustomWorkload, GptWorkload, LogisticWorkload, QuadraticWorkload, WorkloadConfig
from demuon.errors import WorkloadError
from demuon.workloads.base import Workload
from demuon.workloads.gpt import ByteLanguageModel
from demuon.workloads.logistic import LogisticRegression
from demuon.workloads.quadratic import LeastSquares


def import_user_module(name: str) -> ModuleType:
    """Import the module of a ``module:function`` reference as ``python -m`` would, with the current
    folder on the path: the peers of ``demuon launch`` (``python -m demuon run``) find a module
    there, so the ``demuon`` console script, whose path starts at its own folder, must as well (the
    summary imports the workload again). The folder is appended, so it shadows nothing installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top, cwd = name.partition(".")[0], os.getcwd()
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)


def _custom(cfg: CustomWorkload, seed: int, device: torch.device) -> Workload:
    """Import ``module:function`` and call ``function(options=..., seed=..., device=...)``."""
    module_name, _, function_name = cfg.factory.partition(":")
    try:
        module = import_user_module(module_name)
        factory = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        raise WorkloadError(
            f"cannot import workload factory {cfg.factory!r}: {exc}", value=cfg.factory
        ) from exc
    if not callable(factory):
        raise WorkloadError(f"workload factory {cfg.factory!r} is not callable", value=cfg.factory)
    try:
        workload = factory(options=dict(cfg.options), seed=seed, device=device)
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"workload factory {cfg.factory!r} failed: {exc}", value=cfg.factory) from exc
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload factory {cfg.factory!r} returned {type(workload).__name__}, "
            "which lacks build_model/train_batch/loss/validation_loss",
            value=cfg.factory,
        )
    return workload


def make_workload(cfg: WorkloadConfig, *, seed: int, device: torch.device) -> Workload:
    """The workload ``cfg`` describes, with its data on ``device`` (dispatch on ``cfg.kind``)."""
    device = torch.device(device)
    if isinstance(cfg, QuadraticWorkload):
        return LeastSquares(cfg, seed=seed, device=device)
    if isinstance(cfg, LogisticWorkload):
        return LogisticRegression(cfg, seed=seed, device=device)
    if isinstance(cfg, GptWorkload):
        return ByteLanguageModel(cfg, seed=seed, device=device)
    if isinstance(cfg, CustomWorkload):
        return _custom(cfg, seed, device)
    raise WorkloadError(f"unknown workload kind {getattr(cfg, 'kind', cfg)!r}", value=cfg)
