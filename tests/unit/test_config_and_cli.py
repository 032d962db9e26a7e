"""Settings loading (file, environment, --set) and the simulate command's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demuon import results
from demuon.app import cli
from demuon.config import load_config
from demuon.errors import ConfigError
from demuon.node.rounds import ROW_KEYS

TINY = """
peers = 4
rounds = 6
eval_every = 3
[topology]
name = "ring"
[algorithm]
name = "demuon"
lr = 0.05
[workload]
kind = "quadratic"
rows = 16
dim_in = 6
dim_out = 4
[per_algorithm.dsgd]
lr = 0.2
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_a_bad_value_is_refused_with_the_field_and_the_value(tiny: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["algorithm.theta=1.5"])
    assert err.value.field == "algorithm.theta"
    assert err.value.value == 1.5
    assert "algorithm.theta" in str(err.value)


def test_an_unknown_setting_is_refused_by_name(tiny: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ["algorithm.learning_rate=0.1"])
    assert "learning_rate" in err.value.field


def test_an_unknown_codec_kind_names_the_discriminator(tiny: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tiny, ['gossip.codec.kind="zip"'])
    assert err.value.field.startswith("gossip.codec")


def test_environment_overrides_the_file_and_set_overrides_the_environment(tiny: Path) -> None:
    env = {"DEMUON__ALGORITHM__LR": "0.5", "DEMUON__ROUNDS": "9"}
    assert load_config(tiny, environ=env).algorithm.lr == 0.5
    assert load_config(tiny, environ=env).rounds == 9
    assert load_config(tiny, ["algorithm.lr=0.25"], environ=env).algorithm.lr == 0.25


def test_per_algorithm_overrides_apply_only_to_that_algorithm(tiny: Path) -> None:
    config = load_config(tiny, environ={})
    assert config.for_algorithm("dsgd").algorithm.lr == 0.2
    assert config.for_algorithm("gt_nsgdm").algorithm.lr == 0.05


SHIPPED = sorted(p.name for p in (Path(__file__).parents[2] / "demuon" / "configs").glob("*.toml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_says_what_it_is(name: str) -> None:
    path = Path(__file__).parents[2] / "demuon" / "configs" / name
    config = load_config(path, [])
    assert config.peers >= 2 and config.rounds >= 1
    assert path.read_text().startswith("#"), f"{name} opens without a comment saying what it is for"


def test_the_edge_config_uses_the_measured_best_codecs() -> None:
    config = load_config(Path(__file__).parents[2] / "demuon" / "configs" / "edge-lowbit.toml", [])
    v, x = config.gossip.codec_for("V"), config.gossip.codec_for("X")
    assert (v.kind, getattr(v, "deflate", None)) == ("int8", True)
    assert (x.kind, getattr(x, "bits", None)) == ("blockq", 1)
    assert config.gossip.keyframe_every > 0 and config.network.resend_s >= 30  # lossy, slow links


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in str(err.value)


def test_simulate_writes_a_run_folder_and_a_plot_for_each_algorithm(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli.main(["simulate", "--config", str(tiny), "--algorithms", "demuon,dsgd", "--out", str(out)])
    assert code == 0
    for name in ("demuon", "dsgd"):
        run = out / name
        per_peer = results.read_per_peer(run)
        assert sorted(per_peer) == [0, 1, 2, 3]
        for rows in per_peer.values():  # the daemon's row keys, one row per round
            assert [r["round"] for r in rows] == list(range(6))
            assert all(set(r) == set(ROW_KEYS) for r in rows)
        cluster = results.read_cluster(run)
        assert [r["round"] for r in cluster] == list(range(6))
        assert cluster[-1]["val_loss"] is not None
        summary = results.read_summary(run)
        assert summary["algorithm"] == name and summary["source"] == "simulate"
        assert [p["id"] for p in summary["peers"]] == [0, 1, 2, 3]
        assert all(p["final_round"] == 5 for p in summary["peers"])
        assert set(summary["peers"][0]["fingerprint"]) == {"sum", "l2"}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["tracking_gap"] is None for r in results.read_cluster(out / "dsgd"))
    assert json.loads((out / "demuon" / "summary.json").read_text())["schema"] == results.SCHEMA


def test_simulate_refuses_an_unknown_algorithm(tiny: Path) -> None:
    assert cli.main(["simulate", "--config", str(tiny), "--algorithms", "adam"]) == 2


def test_a_section_or_list_comes_from_the_environment_as_json(tiny: Path) -> None:
    env = {
        "DEMUON__GOSSIP__CODEC": '{"kind": "topk", "ratio": 0.25}',
        "DEMUON__NETWORK__PEERS": json.dumps([{"id": i, "endpoint": f"tcp://p{i}:7{i}"} for i in range(4)]),
        "DEMUON__SECURITY__ENABLED": "false",
    }
    config = load_config(tiny, environ=env)
    assert config.gossip.codec.kind == "topk" and config.gossip.codec.ratio == 0.25
    assert config.endpoint(3) == "tcp://p3:73"
