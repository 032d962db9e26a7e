"""EF21-Muon, the server–worker mode of ``demuon simulate --server`` (demuon/node/ef21.py,
demuon/app/server.py): its invariants, its equality with DeMuon where the two must agree, and the
bytes it reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demuon.app import server, simulate
from demuon.app.cli import main
from demuon.config import BlockQuantCodec, Config, IdentityCodec, load_config
from demuon.node import ef21
from demuon.transport.codecs import make_codec
from tests.support.cluster import CONFIGS


def oracle(*sets: str) -> Config:
    return load_config(CONFIGS / "oracle-ring4.toml", ["dtype='float64'", *sets])


def test_with_identity_links_ef21_muon_is_demuon_on_the_complete_graph_one_round_later() -> None:
    """W = X and G = mean_j M_j when nothing is compressed, so the server steps along
    NS(mean momentum) — what DeMuon does on the complete graph (its tracker is the mean momentum).
    EF21's first step is zero (G starts at 0), so its round k + 1 is DeMuon's round k."""
    rounds = 12
    ef = server.run(oracle(f"rounds={rounds + 1}"))
    de = simulate.run(oracle(f"rounds={rounds}", "topology.name='complete'"))
    fp_ef = ef.summary["peers"][0]["fingerprint"]
    fp_de = de.summary["peers"][0]["fingerprint"]
    assert fp_ef["sum"] == pytest.approx(fp_de["sum"], rel=1e-10)
    assert fp_ef["l2"] == pytest.approx(fp_de["l2"], rel=1e-10)
    assert all(row["model_gap"] <= 1e-12 * fp_ef["l2"] and row["estimate_gap"] <= 1e-12 for row in ef.cluster)


def test_compressed_links_keep_the_error_feedback_invariant_and_train() -> None:
    """With 2-bit block quantisation on both links the workers' copy W stays within 5 % of the
    server's X (what the downlink has not delivered yet is carried, not lost), and the loss ends
    within 5 % of the uncompressed run for under a third of the bytes (this model is tiny, so
    headers weigh; on the 2-bit payload alone the ratio is 32×)."""
    plain = server.run(oracle("rounds=150"))
    q = server.run(oracle("rounds=150", "gossip.codec={kind='blockq', bits=2}"))
    assert q.cluster[-1]["val_loss"] <= plain.cluster[-1]["val_loss"] * 1.05
    assert q.summary["bytes"]["per_worker_up_and_down"] < plain.summary["bytes"]["per_worker_up_and_down"] / 3
    size = q.summary["peers"][0]["fingerprint"]["l2"]
    assert 0 < q.cluster[-1]["model_gap"] < 0.05 * size


def test_the_server_estimate_is_the_mean_of_the_workers_estimates() -> None:
    codec = make_codec(BlockQuantCodec(bits=1))
    g = torch.Generator().manual_seed(0)
    G_j = [{"w": torch.zeros(4, 300, dtype=torch.float64)} for _ in range(3)]
    G = {"w": torch.zeros(4, 300, dtype=torch.float64)}
    for k in range(5):
        shifts = []
        for j in range(3):
            M = {"w": torch.randn(4, 300, generator=g, dtype=torch.float64)}
            R = ef21.compress(ef21.diff(M, G_j[j]), codec, [k * 10 + j])
            G_j[j] = ef21.add(G_j[j], R.value)
            shifts.append(R.value)
        G = ef21.server_estimate(G, shifts)
        mean = torch.stack([Gj["w"] for Gj in G_j]).mean(0)
        assert torch.allclose(G["w"], mean, atol=1e-12)


def test_rows_count_whole_wire_messages() -> None:
    res = server.run(oracle("rounds=3"))
    identity = make_codec(IdentityCodec())
    # a 12×6 float64 weight: 576 payload bytes, plus the header
    row = res.per_peer[0][1]
    assert row["bytes_out"] == row["bytes_out_V"] > 576 and row["bytes_in"] > 576
    enc = {"weight": identity.encode(torch.zeros(6, 12, dtype=torch.float64), seed=0)}
    assert row["bytes_out"] == server.message_bytes(0, 1, "V", identity, enc)


def test_server_mode_refuses_what_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(CONFIGS / "oracle-ring4.toml")
    assert main(["simulate", "--server", "--config", cfg, "--algorithms", "demuon,dsgd"]) == 2
    assert "--server" in capsys.readouterr().err
    assert main(["simulate", "--server", "--config", cfg, "--set", "algorithm.name='dsgd'"]) == 2
    assert "algorithm.name" in capsys.readouterr().err
    plan = tmp_path / "plan.toml"
    plan.write_text("[[link]]\naction = 'drop'\nprobability = 0.1\n")
    assert main(["simulate", "--server", "--config", cfg, "--faults", str(plan)]) == 2
    assert "fault plan" in capsys.readouterr().err
