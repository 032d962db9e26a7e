"""The building blocks of demuon.node.optim (routing, directions, schedules, clipping, mixing) and
the per-algorithm dispatch of demuon.node.algorithms."""

from __future__ import annotations

import math

import pytest
import torch

from demuon.config import (
    ConstantSchedule,
    CosineSchedule,
    InvSqrtSchedule,
    LinearSchedule,
    RoutingConfig,
    config_from_dict,
)
from demuon.errors import ConfigError
from demuon.node import algorithms, optim
from demuon.node.newton_schulz import column_normalize, row_normalize


def dict_of(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(tensors)


# ------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("name", "shape", "route"),
    [
        ("blocks.0.attn.qkv.weight", (192, 64), "newton_schulz"),
        ("conv1.weight", (16, 3, 3, 3), "newton_schulz"),
        ("pos_emb", (1, 128, 256), "newton_schulz"),
        ("blocks.0.ln1.bias", (64,), "normalize"),
        ("row_vector", (1, 64), "normalize"),
        ("temperature", (), "sign"),
        ("one_by_one", (1, 1), "sign"),
    ],
)
def test_default_routing_is_paper_faithful(name: str, shape: tuple[int, ...], route: str) -> None:
    assert optim.route_for(name, shape, RoutingConfig()) == route


def test_embedding_and_head_names_take_their_own_routes() -> None:
    routing = RoutingConfig(matrix="polar_svd", vector="rms", embedding="colnorm", head="sign")
    assert optim.route_for("tok_emb.weight", (100, 32), routing) == "colnorm"
    assert optim.route_for("transformer.wte.weight", (100, 32), routing) == "colnorm"
    assert optim.route_for("lm_head.weight", (100, 32), routing) == "sign"
    assert optim.route_for("lm_head.bias", (100,), routing) == "rms"
    assert optim.route_for("mlp.fc.weight", (64, 32), routing) == "polar_svd"


# ---------------------------------------------------------------------------- directions


def test_normalize_rms_and_sign_routes_scale_the_whole_tensor() -> None:
    V = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert torch.allclose(optim.orthogonalize(V, "normalize"), torch.tensor([0.6, -0.8, 0.0, 0.0]))
    assert torch.allclose(optim.orthogonalize(V, "rms"), torch.tensor([1.2, -1.6, 0.0, 0.0]))
    assert torch.equal(optim.orthogonalize(V, "sign"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert optim.orthogonalize(torch.tensor(-2.5), "sign").item() == -1.0


@pytest.mark.parametrize("route", optim.ROUTES)
def test_every_route_maps_zero_to_zero_and_keeps_shape_and_dtype(route: str) -> None:
    for shape in [(6, 4), (5,), (), (4, 2, 3, 3), (1, 5, 7)]:
        V = torch.zeros(shape)
        out = optim.orthogonalize(V, route)
        assert out.shape == V.shape and out.dtype == V.dtype
        assert torch.equal(out, V)


def test_colnorm_and_rownorm_give_unit_rms_columns_and_rows() -> None:
    V = torch.randn(6, 4, dtype=torch.float64)
    cols = optim.orthogonalize(V, "colnorm")
    rows = optim.orthogonalize(V, "rownorm")
    assert torch.allclose(cols.pow(2).mean(dim=0), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(rows.pow(2).mean(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(column_normalize(V), cols) and torch.equal(row_normalize(V), rows)


def test_conv_kernels_are_orthogonalised_as_out_by_in_times_kernel_matrices() -> None:
    V = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    out = optim.orthogonalize(V, "polar_svd")
    assert out.shape == V.shape
    assert torch.allclose(out, optim.polar_svd(V.reshape(8, 27)).reshape(8, 3, 3, 3))
    ns = optim.orthogonalize(V.float(), "newton_schulz", ns_steps=5)
    assert torch.allclose(ns, optim.newton_schulz(V.float().reshape(8, 27)).reshape(8, 3, 3, 3))


def test_one_by_a_by_b_tensors_are_squeezed_to_matrices() -> None:
    V = torch.randn(1, 16, 8)
    assert torch.allclose(optim.orthogonalize(V, "newton_schulz"), optim.newton_schulz(V[0]).unsqueeze(0))


def test_unknown_route_and_unknown_algorithm_are_rejected() -> None:
    with pytest.raises(ValueError, match="route"):
        optim.orthogonalize(torch.ones(3), "adamw")
    with pytest.raises(ValueError, match="algorithm"):
        algorithms.get("adam")


# ----------------------------------------------------------------------------- schedules


def test_constant_inv_sqrt_and_linear_schedules_follow_their_formulas() -> None:
    assert optim.learning_rate(ConstantSchedule(), 0.1, 57, 100) == 0.1
    assert optim.learning_rate(InvSqrtSchedule(), 0.1, 0, 100) == pytest.approx(0.1)
    assert optim.learning_rate(InvSqrtSchedule(), 0.1, 3, 100) == pytest.approx(0.05)
    assert optim.learning_rate(LinearSchedule(), 0.1, 0, 100) == pytest.approx(0.1)
    assert optim.learning_rate(LinearSchedule(), 0.1, 75, 100) == pytest.approx(0.025)
    assert optim.learning_rate(LinearSchedule(), 0.1, 120, 100) == 0.0


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_final_fraction() -> None:
    s = CosineSchedule(warmup=10, final_fraction=0.1)
    assert optim.learning_rate(s, 1.0, 0, 110) == pytest.approx(0.1)
    assert optim.learning_rate(s, 1.0, 9, 110) == pytest.approx(1.0)
    assert optim.learning_rate(s, 1.0, 10, 110) == pytest.approx(1.0)
    assert optim.learning_rate(s, 1.0, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert optim.learning_rate(s, 1.0, 110, 110) == pytest.approx(0.1)
    assert optim.learning_rate(CosineSchedule(), 2.0, 50, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        optim.learning_rate(s, 1.0, -1, 110)


# ------------------------------------------------------------------------------ clipping


def test_clip_threshold_grows_as_k_to_the_0_4_and_round_zero_uses_k_equal_one() -> None:
    assert optim.clip_threshold(0) == optim.clip_threshold(1) == pytest.approx(0.1)
    assert optim.clip_threshold(32) == pytest.approx(0.1 * 32**0.4)
    assert optim.clip_threshold(10, 2.0, 1.0) == pytest.approx(20.0)


def test_clip_by_global_norm_scales_the_whole_model_to_the_threshold() -> None:
    G = dict_of(a=torch.tensor([3.0, 0.0]), b=torch.tensor([[0.0, 4.0]]))  # ‖G‖ = 5
    clipped = optim.clip_by_global_norm(G, 1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.0, 0.8]]))
    unclipped = optim.clip_by_global_norm(G, 10.0)
    assert all(torch.equal(unclipped[n], G[n]) for n in G)
    zero = optim.clip_by_global_norm(dict_of(a=torch.zeros(3)), 1.0)
    assert torch.equal(zero["a"], torch.zeros(3))


def test_gt_nsgdm_direction_divides_by_the_joint_norm_and_is_zero_safe() -> None:
    V = dict_of(a=torch.tensor([3.0]), b=torch.tensor([[4.0, 0.0]]))
    D = optim.gt_nsgdm_direction(V)
    assert torch.allclose(D["a"], torch.tensor([0.6])) and torch.allclose(D["b"], torch.tensor([[0.8, 0.0]]))
    Z = optim.gt_nsgdm_direction(dict_of(a=torch.zeros(2), b=torch.zeros(1, 1)))
    assert torch.equal(Z["a"], torch.zeros(2)) and torch.equal(Z["b"], torch.zeros(1, 1))


# ---------------------------------------------------------------------- update equations


def test_momentum_and_tracker_message_follow_the_paper_and_leave_inputs_alone() -> None:
    M, G, V = torch.full((2,), 1.0), torch.full((2,), 3.0), torch.full((2,), 10.0)
    saved = [t.clone() for t in (M, G, V)]
    M_new = optim.momentum_update(M, G, 0.25)
    assert torch.allclose(M_new, torch.full((2,), 1.5))
    assert torch.allclose(optim.tracker_message(V, M_new, M), torch.full((2,), 10.5))
    assert all(torch.equal(a, b) for a, b in zip((M, G, V), saved, strict=True))


def test_mix_sums_in_the_given_order_and_is_bitwise_reproducible() -> None:
    Z = [torch.randn(50, dtype=torch.float32) * 10**i for i in range(4)]
    w = [0.4, 0.2, 0.2, 0.2]
    terms = list(zip(w, Z, strict=True))
    out = optim.mix(terms)
    expected = Z[0] * w[0]
    for wj, Zj in terms[1:]:
        expected = expected + wj * Zj
    assert torch.allclose(out, expected, rtol=1e-6)
    assert torch.equal(optim.mix(terms), out)
    assert torch.equal(optim.mix([(1.0, Z[1])]), Z[1]) and optim.mix([(1.0, Z[1])]) is not Z[1]
    with pytest.raises(ValueError):
        optim.mix([])


def test_choco_mix_with_exact_replicas_and_gamma_one_equals_mix() -> None:
    Z = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    terms = list(zip([0.5, 0.25, 0.25], Z, strict=True))
    S = optim.mix(terms)  # replicas Ẑ_j = Z_j (identity codec)
    assert torch.allclose(optim.choco_mix(Z[0], S, Z[0], 1.0), S, atol=1e-15)
    half = optim.choco_mix(Z[0], S, Z[0], 0.5)
    assert torch.allclose(half, 0.5 * Z[0] + 0.5 * S)


def test_demuon_and_dsgd_steps_move_against_the_direction() -> None:
    X, V = torch.zeros(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(optim.demuon_step(X, V, 0.1, "polar_svd"), -0.1 * optim.polar_svd(V))
    assert torch.allclose(optim.dsgd_step(X, V, 0.1), -0.1 * V)


# -------------------------------------------------------------------- per-algorithm, dicts


def test_phases_are_v_then_x_for_tracking_methods_and_x_for_dsgd() -> None:
    assert (
        algorithms.phases("demuon")
        == algorithms.phases("gt_dsgd")
        == algorithms.phases("gt_nsgdm")
        == ("V", "X")
    )
    assert algorithms.phases("dsgd") == algorithms.phases("dsgd_clip") == ("X",)


def test_tracker_update_of_gt_dsgd_keeps_the_gradient_as_m() -> None:
    M, V, G = dict_of(w=torch.ones(2)), dict_of(w=torch.full((2,), 5.0)), dict_of(w=torch.full((2,), 3.0))
    M_new, U = algorithms.local_tracker_update("gt_dsgd", M, V, G, theta=0.2)
    assert torch.equal(M_new["w"], G["w"]) and M_new["w"] is not G["w"]
    assert torch.equal(U["w"], torch.full((2,), 7.0))
    M_new, U = algorithms.local_tracker_update("demuon", M, V, G, theta=0.5)
    assert torch.allclose(M_new["w"], torch.full((2,), 2.0)) and torch.allclose(U["w"], torch.full((2,), 6.0))
    with pytest.raises(ValueError, match="no tracker"):
        algorithms.local_tracker_update("dsgd", M, V, G, theta=0.2)


def test_local_step_dispatches_each_algorithm_to_its_direction() -> None:
    X = dict_of(w=torch.zeros(4, 3, dtype=torch.float64), b=torch.zeros(3, dtype=torch.float64))
    V = dict_of(w=torch.randn(4, 3, dtype=torch.float64), b=torch.randn(3, dtype=torch.float64))
    G = dict_of(w=30 * torch.randn(4, 3, dtype=torch.float64), b=torch.randn(3, dtype=torch.float64))
    routes = {"w": "polar_svd", "b": "normalize"}
    Y = algorithms.local_step("demuon", X, V, None, 0.5, 0, routes=routes)
    assert torch.allclose(Y["w"], -0.5 * optim.polar_svd(V["w"]))
    assert torch.allclose(Y["b"], -0.5 * V["b"] / V["b"].norm())
    assert torch.allclose(algorithms.local_step("gt_dsgd", X, V, None, 0.5, 0)["w"], -0.5 * V["w"])
    assert torch.allclose(algorithms.local_step("dsgd", X, None, G, 0.5, 0)["b"], -0.5 * G["b"])
    joint = math.sqrt(sum(float(v.pow(2).sum()) for v in V.values()))
    assert torch.allclose(algorithms.local_step("gt_nsgdm", X, V, None, 1.0, 0)["w"], -V["w"] / joint)
    clipped = algorithms.local_step("dsgd_clip", X, None, G, 1.0, 32, clip_scale=0.1, clip_power=0.4)
    assert optim.global_norm(clipped).item() == pytest.approx(0.1 * 32**0.4)
    with pytest.raises(ValueError, match="needs G"):
        algorithms.local_step("dsgd", X, V, None, 0.5, 0)


def test_demuon_local_step_routes_unlisted_tensors_by_the_default_table() -> None:
    X = dict_of(w=torch.zeros(16, 8), b=torch.zeros(8))
    V = dict_of(w=torch.randn(16, 8), b=torch.randn(8))
    Y = optim.demuon_local_step(X, V, 1.0)
    assert torch.allclose(Y["w"], -optim.newton_schulz(V["w"]))
    assert torch.allclose(Y["b"], -V["b"] / V["b"].norm())


def test_mix_dicts_mixes_every_tensor_with_the_same_weights() -> None:
    A = dict_of(w=torch.ones(2), b=torch.zeros(1))
    B = dict_of(w=torch.full((2,), 3.0), b=torch.ones(1))
    out = optim.mix_dicts([(0.75, A), (0.25, B)])
    assert torch.allclose(out["w"], torch.full((2,), 1.5)) and torch.allclose(
        out["b"], torch.full((1,), 0.25)
    )


# ------------------------------------------- Muon's options (docs/algorithms.md §2.6), float64


def f64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_nesterov_lookahead_is_theta_g_plus_one_minus_theta_v_as_torch_lerps_it() -> None:
    V, G = f64(5, 3, seed=1), f64(5, 3, seed=2)
    theta = 0.05
    out = optim.nesterov_lookahead(V, G, theta)
    assert torch.allclose(out, theta * G + (1 - theta) * V, rtol=0, atol=1e-15)
    assert torch.allclose(out, G.lerp(V, 0.95), rtol=0, atol=1e-15)  # torch.optim.Muon, μ = 0.95
    assert torch.equal(optim.nesterov_lookahead(V, G, 1.0), G)
    both = optim.nesterov_lookahead_dicts({"w": V}, {"w": G}, theta)
    assert torch.equal(both["w"], out)


def test_mvr_update_follows_storm_and_reduces_to_the_gradient_and_to_the_ema() -> None:
    M, G, G_tilde = f64(4, 4, seed=1), f64(4, 4, seed=2), f64(4, 4, seed=3)
    saved = [t.clone() for t in (M, G, G_tilde)]
    out = optim.mvr_update(M, G, G_tilde, 0.3)
    assert torch.allclose(out, G + 0.7 * (M - G_tilde), rtol=0, atol=1e-15)
    assert torch.equal(optim.mvr_update(M, G, G_tilde, 1.0), G)  # β = θ = 1: plain gradient
    assert torch.allclose(optim.mvr_update(M, G, G, 0.3), optim.momentum_update(M, G, 0.3), atol=1e-15)
    assert all(torch.equal(a, b) for a, b in zip((M, G, G_tilde), saved, strict=True))
    M_new, U = optim.mvr_tracker_update({"w": M}, {"w": G}, {"w": G}, {"w": G_tilde}, 0.3)
    assert torch.equal(M_new["w"], out) and torch.allclose(U["w"], G + out - M, atol=1e-15)


def test_decoupled_decay_scales_by_one_minus_lr_lambda_and_zero_is_the_input() -> None:
    X = f64(3, 4)
    assert torch.allclose(optim.decoupled_decay(X, 0.02, 0.1), X * 0.998, rtol=0, atol=1e-16)
    assert optim.decoupled_decay(X, 0.02, 0.0) is X


@pytest.mark.parametrize(
    ("shape", "rule", "factor"),
    [
        ((8, 4), "original", math.sqrt(2.0)),
        ((4, 8), "original", 1.0),
        ((64, 3, 3, 3), "original", math.sqrt(64 / 27)),
        ((1, 12, 3), "original", 2.0),
        ((4, 8), "match_rms_adamw", 0.2 * math.sqrt(8)),
        ((8, 4), "match_rms_adamw", 0.2 * math.sqrt(8)),
        ((8, 4), "none", 1.0),
        ((8,), "none", 1.0),
    ],
)
def test_shape_factor_is_torch_adjust_lr(shape: tuple[int, ...], rule: str, factor: float) -> None:
    from torch.optim._muon import _adjust_lr

    assert optim.shape_factor(shape, rule) == pytest.approx(factor, rel=1e-15)  # type: ignore[arg-type]
    if len(shape) == 2 and rule != "none":
        assert optim.shape_factor(shape, rule) == _adjust_lr(1.0, rule, torch.Size(shape))  # type: ignore[arg-type]


def test_shape_factor_needs_a_matrix() -> None:
    with pytest.raises(ValueError, match="matrix"):
        optim.shape_factor((8,), "original")


def test_demuon_step_with_the_options_is_the_float64_rule() -> None:
    X, V = f64(8, 4, seed=1), f64(8, 4, seed=2)
    eta, lam, s = 0.05, 0.1, math.sqrt(2.0)
    U, _, Vh = torch.linalg.svd(V, full_matrices=False)
    expected = (1 - eta * lam) * X - eta * s * (U @ Vh)
    Y = optim.demuon_step(X, V, eta, "polar_svd", weight_decay=lam, scale=s)
    assert torch.allclose(Y, expected, rtol=0, atol=1e-14)
    dsgd = optim.dsgd_step(X, V, eta, lam)
    assert torch.allclose(dsgd, (1 - eta * lam) * X - eta * V, rtol=0, atol=1e-15)


def test_without_the_options_the_steps_are_bitwise_the_old_expressions() -> None:
    X, V = torch.randn(8, 4), torch.randn(8, 4)
    assert torch.equal(optim.demuon_step(X, V, 0.02, "newton_schulz"), X - 0.02 * optim.newton_schulz(V))
    assert torch.equal(optim.dsgd_step(X, V, 0.02), X - 0.02 * V)
    Y = optim.demuon_local_step({"w": X}, {"w": V}, 0.02, weight_decay=0.0, adjust_lr="none")
    assert torch.equal(Y["w"], X - 0.02 * optim.newton_schulz(V))


def test_the_shape_factor_applies_to_orthogonalised_routes_only() -> None:
    X = dict_of(w=torch.zeros(8, 2, dtype=torch.float64), e=torch.zeros(8, 2, dtype=torch.float64))
    X["b"] = torch.zeros(3, dtype=torch.float64)
    V = {n: f64(*x.shape, seed=i) for i, (n, x) in enumerate(X.items())}
    routes = {"w": "polar_svd", "e": "colnorm", "b": "normalize"}
    Y = optim.demuon_local_step(X, V, 0.1, routes, adjust_lr="original", weight_decay=0.5)
    assert torch.allclose(Y["w"], -0.1 * 2.0 * optim.polar_svd(V["w"]), atol=1e-15)
    assert torch.allclose(Y["e"], -0.1 * column_normalize(V["e"]), atol=1e-15)
    assert torch.allclose(Y["b"], -0.1 * V["b"] / V["b"].norm(), atol=1e-15)


def test_step_input_and_tracker_step_dispatch_the_options() -> None:
    demuon, dsgd, gt_dsgd = algorithms.get("demuon"), algorithms.get("dsgd"), algorithms.get("gt_dsgd")
    M, V, G = dict_of(w=f64(2, 2, seed=1)), dict_of(w=f64(2, 2, seed=2)), dict_of(w=f64(2, 2, seed=3))
    assert algorithms.step_input(demuon, V, G, 0.3) is V and algorithms.step_input(dsgd, V, G, 0.3) is G
    ahead = algorithms.step_input(demuon, V, G, 0.3, nesterov=True)
    assert torch.allclose(ahead["w"], 0.3 * G["w"] + 0.7 * V["w"], atol=1e-15)
    with pytest.raises(ValueError, match="momentum"):
        algorithms.step_input(gt_dsgd, V, G, 0.3, nesterov=True)
    plain = algorithms.tracker_step(demuon, M, V, G, 0.3)
    assert torch.equal(plain[0]["w"], algorithms.local_tracker_update("demuon", M, V, G, 0.3)[0]["w"])
    M_new, _ = algorithms.tracker_step(demuon, M, V, G, 0.3, G_tilde=M)
    assert torch.allclose(M_new["w"], G["w"], atol=1e-15)  # G + (1−θ)(M − M)
    with pytest.raises(ValueError, match="momentum"):
        algorithms.tracker_step(gt_dsgd, M, V, G, 0.3, G_tilde=M)
    Y = algorithms.local_step("demuon", M, V, G, 0.1, 0, theta=0.3, nesterov=True, routes={"w": "polar_svd"})
    assert torch.allclose(Y["w"], M["w"] - 0.1 * optim.polar_svd(ahead["w"]), atol=1e-14)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "dsgd", "nesterov": True}, "algorithm.nesterov = true needs a method with momentum"),
        ({"name": "gt_dsgd", "momentum_form": "mvr"}, "algorithm.momentum_form = 'mvr' needs"),
        ({"name": "gt_nsgdm", "adjust_lr": "original"}, "algorithm.adjust_lr = 'original'"),
        ({"lr": 0.5, "weight_decay": 2.0}, "algorithm.weight_decay = 2.0 with lr = 0.5"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adjust_lr": "sqrt"}, "adjust_lr"),
        ({"momentum_form": "heavy_ball"}, "momentum_form"),
    ],
)
def test_muon_options_are_refused_where_they_mean_nothing(section: dict[str, object], message: str) -> None:
    from demuon.config import config_from_dict
    from demuon.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=message):
        config_from_dict({"algorithm": section})


def test_muon_options_default_off_and_a_side_by_side_run_can_switch_them_off() -> None:
    from demuon.config import AlgorithmConfig, config_from_dict

    a = AlgorithmConfig()
    assert (a.nesterov, a.weight_decay, a.adjust_lr, a.momentum_form) == (False, 0.0, "none", "ema")
    config = config_from_dict(
        {
            "algorithm": {"name": "demuon", "nesterov": True, "adjust_lr": "original"},
            "per_algorithm": {"dsgd": {"nesterov": False, "adjust_lr": "none"}},
        }
    )
    assert config.for_algorithm("dsgd").algorithm.nesterov is False


def test_scion_scales_are_the_layer_wise_lmo_table() -> None:
    """``adjust_lr = "scion"`` (docs/algorithms.md §2.6): hidden matrices √(d_out/d_in) on their
    orthogonal factor, a sign-routed head 1/d_in, column/row norms, RMS and scalars unscaled —
    each step checked against its own float64 formula."""
    shapes = {"w": (8, 2), "wide": (2, 8), "head": (5, 4), "embed": (6, 3), "b": (3,), "s": ()}
    X = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in shapes.items()}
    V = {
        n: f64(*shape, seed=i) if shape else torch.tensor(-0.7, dtype=torch.float64)
        for i, (n, shape) in enumerate(shapes.items())
    }
    routes = {
        "w": "polar_svd",
        "wide": "polar_svd",
        "head": "sign",
        "embed": "colnorm",
        "b": "rms",
        "s": "sign",
    }
    Y = optim.demuon_local_step(X, V, 0.1, routes, adjust_lr="scion")
    assert torch.allclose(Y["w"], -0.1 * 2.0 * optim.polar_svd(V["w"]), atol=1e-15)  # √(8/2)
    assert torch.allclose(Y["wide"], -0.1 * 0.5 * optim.polar_svd(V["wide"]), atol=1e-15)  # √(2/8)
    assert torch.allclose(Y["head"], -0.1 * torch.sign(V["head"]) / 4, atol=1e-15)  # sign / d_in
    assert torch.allclose(Y["embed"], -0.1 * column_normalize(V["embed"]), atol=1e-15)
    rms = V["b"].norm() / 3**0.5
    assert torch.allclose(Y["b"], -0.1 * V["b"] / rms, atol=1e-15)
    assert float(Y["s"]) == pytest.approx(0.1)  # −η sign(−0.7)
    assert optim.step_factor((8, 2), "sign", "original") == 1.0  # the torch rules leave sign alone


def test_the_scion_factor_is_accepted_for_demuon_only() -> None:
    assert config_from_dict({"algorithm": {"adjust_lr": "scion"}}).algorithm.adjust_lr == "scion"
    with pytest.raises(ConfigError, match="adjust_lr"):
        config_from_dict({"algorithm": {"name": "dsgd", "adjust_lr": "scion"}})
