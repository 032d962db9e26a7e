"""Shared test set-up: one torch thread (the machine has 2 cores), deterministic seeds, and the
compiled kernels built into a folder of the test session's own (not the user's cache)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault(
    "DEMUON_NATIVE_DIR", os.path.join(tempfile.gettempdir(), f"demuon-native-tests-{os.getuid()}")
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
