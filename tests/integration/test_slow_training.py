"""Long runs (``make test-slow``): the algorithms' ordering on the real workload."""

from __future__ import annotations

import pytest

from demuon.app import simulate
from demuon.config import load_config
from tests.support.cluster import CONFIGS

DEMO = CONFIGS / "demo-simulate.toml"


@pytest.mark.slow
def test_demuon_trains_the_byte_level_gpt_further_than_dsgd_and_gt_nsgdm_on_a_ring() -> None:
    config = load_config(DEMO, ["rounds=40", "eval_every=40"], environ={})
    names = ("demuon", "dsgd", "gt_nsgdm")
    final = {name: simulate.run(config.for_algorithm(name)).cluster[-1] for name in names}
    assert final["demuon"]["val_loss"] < final["gt_nsgdm"]["val_loss"] < final["dsgd"]["val_loss"]
    assert final["demuon"]["train_loss"] < 3.0  # from ln(256) ≈ 5.5 at the start
