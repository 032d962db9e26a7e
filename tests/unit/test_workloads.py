"""Workloads: identical models per seed, deterministic batches, shards, exact quadratic references,
corpora and the custom factory."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from demuon.config import CustomWorkload, GptWorkload, LogisticWorkload, QuadraticWorkload
from demuon.errors import WorkloadError
from demuon.workloads import ByteLanguageModel, LeastSquares, Workload, load_corpus, make_workload

CPU = torch.device("cpu")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """About 24 kB of simple English sentences (the GPT workload's tiny test corpus)."""
    animals, verbs, things = (
        ["cat", "dog", "fox", "owl"],
        ["sees", "likes", "finds"],
        ["ball", "tree", "moon"],
    )
    lines = [f"the {a} {v} the {t}.\n" for a, v, t in itertools.product(animals, verbs, things)]
    path = tmp_path / "tiny.txt"
    path.write_text("".join(lines) * 60)
    return path


def small_gpt(corpus: Path, **kw: object) -> GptWorkload:
    return GptWorkload(d_model=32, n_layers=1, n_heads=2, context=16, batch_size=8, corpus=corpus, **kw)


def every_workload(corpus: Path) -> list[Workload]:
    return [
        make_workload(QuadraticWorkload(batch_size=8, noise=0.1), seed=3, device=CPU),
        make_workload(LogisticWorkload(), seed=3, device=CPU),
        make_workload(small_gpt(corpus), seed=3, device=CPU),
    ]


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


def same_batch(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_workload_satisfies_the_protocol(corpus_file: Path) -> None:
    assert all(isinstance(w, Workload) for w in every_workload(corpus_file))


def test_same_seed_builds_identical_models_and_other_seeds_differ(corpus_file: Path) -> None:
    for w in every_workload(corpus_file):
        rng_before = torch.get_rng_state()
        a, b, c = w.build_model(7), w.build_model(7), w.build_model(8)
        assert torch.equal(torch.get_rng_state(), rng_before), "global RNG must not be touched"
        assert same_parameters(a, b)
        assert not same_parameters(a, c)
        assert all(p.dtype == torch.float32 for p in a.parameters())


def test_models_are_float32_and_unchanged_under_a_float64_default(corpus_file: Path) -> None:
    w = make_workload(small_gpt(corpus_file), seed=0, device=CPU)
    reference = w.build_model(1)
    torch.set_default_dtype(torch.float64)
    try:
        model = w.build_model(1)
    finally:
        torch.set_default_dtype(torch.float32)
    assert same_parameters(reference, model)


def test_gpt_parameter_names_carry_the_routing_markers(corpus_file: Path) -> None:
    names = [
        n
        for n, _ in make_workload(small_gpt(corpus_file), seed=0, device=CPU)
        .build_model(0)
        .named_parameters()
    ]
    assert names[:2] == ["tok_emb.weight", "pos_emb.weight"] and names[-1] == "lm_head.weight"
    assert not any("head" in n for n in names[:-1])


def test_train_batches_are_deterministic_and_differ_by_peer_and_round(corpus_file: Path) -> None:
    for w, again in zip(every_workload(corpus_file), every_workload(corpus_file), strict=True):
        assert same_batch(w.train_batch(1, 4, 5), again.train_batch(1, 4, 5))
        assert not same_batch(w.train_batch(1, 4, 5), w.train_batch(2, 4, 5))
        assert not same_batch(w.train_batch(1, 4, 5), w.train_batch(1, 4, 6))


def test_peer_outside_the_network_is_refused(corpus_file: Path) -> None:
    for w in every_workload(corpus_file):
        with pytest.raises(WorkloadError):
            w.train_batch(4, 4, 0)


def test_gpt_batches_are_next_byte_windows(corpus_file: Path) -> None:
    w = make_workload(small_gpt(corpus_file), seed=0, device=CPU)
    x, y = w.train_batch(0, 2, 0)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_iid_shards_partition_all_windows_across_the_corpus(corpus_file: Path) -> None:
    w = make_workload(small_gpt(corpus_file, shard="iid"), seed=0, device=CPU)
    assert isinstance(w, ByteLanguageModel)
    shards = [w.shard_starts(i, 4) for i in range(4)]
    everything = torch.cat(shards).sort().values
    assert torch.equal(everything, torch.arange(w.n_windows))
    for s in shards:
        assert s.min() < w.n_windows // 10 and s.max() > w.n_windows * 9 // 10


def test_contiguous_shards_are_consecutive_chunks(corpus_file: Path) -> None:
    w = make_workload(small_gpt(corpus_file, shard="contiguous"), seed=0, device=CPU)
    assert isinstance(w, ByteLanguageModel)
    for i in range(4):
        s = w.shard_starts(i, 4)
        lo, hi = i * w.n_train // 4, (i + 1) * w.n_train // 4
        assert torch.equal(s, torch.arange(int(s[0]), int(s[-1]) + 1))
        assert s[0] == lo and s[-1] + 16 < hi
        chunk_windows = w.data[lo:hi].long().unfold(0, 16, 1)
        x, _ = w.train_batch(i, 4, 3)
        assert all((chunk_windows == row).all(dim=1).any() for row in x)


def test_quadratic_peers_have_different_minimisers_only_with_heterogeneity() -> None:
    spread = LeastSquares(QuadraticWorkload(heterogeneity=1.0), seed=0, device=CPU)
    same = LeastSquares(QuadraticWorkload(heterogeneity=0.0), seed=0, device=CPU)
    assert torch.dist(spread.local_optimum(0), spread.local_optimum(1)) > 1.0
    assert torch.equal(same.local_optimum(0), same.local_optimum(1))
    model = spread.build_model(0)
    with torch.no_grad():
        model.weight.copy_(spread.local_optimum(2))
    assert spread.loss(model, spread.train_batch(2, 4, 0)) < 1e-8
    assert spread.loss(model, spread.train_batch(1, 4, 0)) > 1.0


def test_quadratic_closed_form_optimum_has_zero_global_gradient() -> None:
    w = LeastSquares(QuadraticWorkload(heterogeneity=1.0), seed=0, device=CPU)
    model = w.build_model(0)
    assert w.global_gradient_norm(model, 8) > 1.0
    with torch.no_grad():
        model.weight.copy_(w.optimum(8))
    assert w.global_gradient_norm(model, 8) < 1e-5
    best = w.global_loss(model, 8)
    with torch.no_grad():
        model.weight.add_(0.01)
    assert w.global_loss(model, 8) > best


def test_quadratic_student_t_noise_perturbs_targets_deterministically() -> None:
    cfg = QuadraticWorkload(noise=0.5, noise_df=2.5)
    w, again = LeastSquares(cfg, seed=0, device=CPU), LeastSquares(cfg, seed=0, device=CPU)
    A, B = w.train_batch(0, 2, 4)
    assert same_batch((A, B), again.train_batch(0, 2, 4))
    assert not torch.allclose(B, w.peer_data(0)[1])
    assert torch.equal(A, w.peer_data(0)[0])


@pytest.mark.parametrize("kind", ["quadratic", "logistic", "gpt"])
def test_a_few_sgd_steps_reduce_the_loss(kind: str, corpus_file: Path) -> None:
    configs: dict[str, QuadraticWorkload | LogisticWorkload | GptWorkload] = {
        "quadratic": QuadraticWorkload(batch_size=16),
        "logistic": LogisticWorkload(),
        "gpt": small_gpt(corpus_file),
    }
    cfg = configs[kind]
    lr = {"quadratic": 0.1, "logistic": 0.5, "gpt": 0.5}[kind]
    w = make_workload(cfg, seed=0, device=CPU)
    model = w.build_model(0)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    before = w.validation_loss(model)
    for k in range(30):
        optimiser.zero_grad()
        torch.autograd.backward(w.loss(model, w.train_batch(k % 2, 2, k)))
        optimiser.step()
    assert w.validation_loss(model) < 0.9 * before


def test_validation_loss_is_deterministic_and_keeps_the_mode(corpus_file: Path) -> None:
    for w in every_workload(corpus_file):
        model = w.build_model(0)
        model.train()
        first = w.validation_loss(model)
        assert model.training
        model.eval()
        assert w.validation_loss(model) == first
        assert not model.training


def test_default_corpus_is_the_python_stdlib() -> None:
    data = load_corpus(None, 200_000)
    assert len(data) == 200_000
    assert b"def " in data and b"import " in data
    assert load_corpus(None, 200_000) is data  # cached


def test_folder_corpus_skips_binary_files(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "b" / "c.txt").write_text("world")
    (tmp_path / "a.bin").write_bytes(b"\x00\xff\xfe")
    assert load_corpus(tmp_path, 10_000) == b"hello world"


def test_missing_or_empty_corpus_raises_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(WorkloadError, match=re.escape(str(missing))):
        make_workload(GptWorkload(corpus=missing), seed=0, device=CPU)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkloadError, match="is empty"):
        make_workload(GptWorkload(corpus=empty), seed=0, device=CPU)


CUSTOM_MODULE = """
from demuon.config import QuadraticWorkload
from demuon.workloads.quadratic import LeastSquares

def build(*, options, seed, device):
    return LeastSquares(QuadraticWorkload(**options), seed=seed, device=device)

def not_a_workload(*, options, seed, device):
    return object()

def broken(*, options, seed, device):
    raise RuntimeError("boom")
"""


def test_custom_workload_is_built_from_module_and_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_workload_mod.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_workload_mod", raising=False)
    w = make_workload(
        CustomWorkload(factory="my_workload_mod:build", options={"dim_in": 5}), seed=1, device=CPU
    )
    assert isinstance(w, LeastSquares) and w.cfg.dim_in == 5 and w.seed == 1
    for factory in (
        "my_workload_mod:not_a_workload",
        "my_workload_mod:broken",
        "my_workload_mod:missing",
        "no_such_module_xyz:build",
    ):
        with pytest.raises(WorkloadError, match=re.escape(factory)):
            make_workload(CustomWorkload(factory=factory), seed=0, device=CPU)
