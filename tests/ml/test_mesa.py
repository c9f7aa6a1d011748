"""MESA search: networks, MINE, the batched-betas equivalence, score options, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.ml.data import Normalizer
from engine.ml.mesa import (
    ENSEMBLES,
    MesaConfig,
    MesaTrainer,
    MineObjective,
    StatisticsNetwork,
    TriggerGenerator,
    diversity_stats,
    knn_entropy,
    mine_estimate,
    open_search,
    search,
    staircase_weights,
    trigger_grid,
    write_search_artifact,
)
from engine.specs import MesaSpec, build_spec


class TinyNet(nn.Module):
    """A few hundred parameters: conv, BN, global max-pool, linear."""

    def __init__(self, classes: int = 4, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.adaptive_max_pool2d(h, 1).flatten(1))


def tiny_setup(n: int = 96, size: int = 8, classes: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet(classes).eval()
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,))
    return model, Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), images, labels


def tiny_config(**overrides) -> MesaConfig:
    values = dict(
        betas=(0.9, 0.5),
        steps=4,
        batch_size=16,
        hidden=32,
        stats_every=2,
        sample_every=2,
        n_eval_triggers=8,
        eval_images=16,
        samples=64,
        channels_last=False,
        placement="per-image",  # the paper's search; the learned one: tests/ml/test_positions.py
    )
    values.update(overrides)
    return MesaConfig(**values)


# ---------------------------------------------------------------------------------------------
# Networks


def test_generator_shapes_and_range():
    g = TriggerGenerator(hidden=32)
    z = torch.rand(10, 64)
    t = g(z)
    assert t.shape == (10, 3, 3, 3)
    assert t.min() > 0 and t.max() < 1
    grey = TriggerGenerator(hidden=16, channels=1, size=5)
    assert grey(torch.randn(7, 64)).shape == (7, 1, 5, 5)
    # noise chunks of 16: first layer sees 16 inputs, the others hidden + 16
    assert g.layers[0].in_features == 16 and g.layers[1].in_features == 32 + 16
    assert g.out.in_features == 32 + 16 and len(g.layers) == 3


def test_statistics_network_shape_and_leaky_output():
    T = StatisticsNetwork(64, 27, hidden=32)
    out = T(torch.rand(12, 64), torch.rand(12, 3, 3, 3))
    assert out.shape == (12,)
    assert T.wz.bias is None and T.wt.bias is None
    with torch.no_grad():  # the leaky ReLU on the scalar output: negatives shrink by 0.2
        T.fc3.bias.fill_(-10.0)
        T.fc3.weight.zero_()
    assert torch.allclose(T(torch.rand(3, 64), torch.rand(3, 27)), torch.full((3,), -2.0))


def test_mine_estimate_on_correlated_gaussians():
    torch.manual_seed(0)
    rho, dim = 0.9, 1
    truth = -0.5 * dim * math.log(1 - rho**2)  # 0.830 nats

    def pairs(n):
        x = torch.randn(n, dim)
        y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, dim)
        return x, y

    T = StatisticsNetwork(dim, dim, hidden=64)
    opt = torch.optim.Adam(T.parameters(), lr=2e-3)
    objective = MineObjective(rate=0.01)
    for _ in range(300):
        x, y = pairs(256)
        opt.zero_grad()
        (-objective(T, x, torch.randn(256, dim), y)).backward()
        opt.step()
    x, y = pairs(20000)
    with torch.no_grad():
        estimate = float(mine_estimate(T, x, torch.randn(20000, dim), y))
    assert abs(estimate - truth) < 0.15, (estimate, truth)


def test_mine_moving_average_starts_at_first_e():
    T = StatisticsNetwork(4, 4, hidden=8)
    obj = MineObjective(rate=0.001)
    z, zm, t = torch.rand(5, 4), torch.rand(5, 4), torch.rand(5, 4)
    obj(T, z, zm, t)
    first = float(torch.exp(T(zm, t)).mean().detach())
    assert float(obj.moving_average) == pytest.approx(first)
    zm2 = torch.rand(5, 4)
    obj(T, z, zm2, t)
    e2 = float(torch.exp(T(zm2, t)).mean().detach())
    assert float(obj.moving_average) == pytest.approx(0.999 * first + 0.001 * e2)


def test_knn_entropy_on_known_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(2000, 3, generator=g)  # entropy of U[0,1]^3 is 0
    assert abs(knn_entropy(uniform)) < 0.15
    sigma = 0.3
    gauss = sigma * torch.randn(2000, 2, generator=g)
    truth = 0.5 * 2 * math.log(2 * math.pi * math.e * sigma**2)
    assert abs(knn_entropy(gauss) - truth) < 0.15


def test_diversity_stats_bw_and_nearest():
    samples = torch.zeros(4, 3, 3, 3)
    samples[1] = 1.0
    samples[2, :, 0, 0] = 1.0
    stats = diversity_stats(samples, bw=True, true_pattern=torch.ones(3, 3, 3))
    assert stats["bw_distinct"] == 3
    assert stats["nearest_to_true"] == 0.0
    assert "nearest_to_true" not in diversity_stats(samples)
    assert "bw_distinct" not in diversity_stats(samples)


def test_the_spec_validates_and_its_defaults_are_the_configs():
    # MesaSpec is the one home of the checks; MesaConfig keeps defaults for the ML layer alone.
    for values, message in (
        ({"betas": [1.2]}, "beta 1.2"),
        ({"noise": "laplace"}, "--noise 'laplace'"),
        ({"score": "logit"}, "--score"),
        ({"n_eval_triggers": 64, "samples": 32}, "exceeds --samples 32"),
    ):
        with pytest.raises(UserError, match=message):
            build_spec("mesa", overrides={"model": "m", **values})
    assert MesaSpec(model="m").mesa_config() == MesaConfig()


# ---------------------------------------------------------------------------------------------
# Training step


def _grads(gen: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in gen.parameters()]


def test_batched_betas_equal_training_each_alone():
    model, norm, images, _ = tiny_setup()
    cfg = tiny_config(betas=(0.9, 0.8, 0.5), placement="per-image")
    pairs = [(b, 1, f"mesa/beta={b}") for b in cfg.betas]
    together = MesaTrainer(model, norm, images, pairs, cfg)
    alone = [MesaTrainer(model, norm, images, [p], cfg) for p in pairs]
    for _ in range(3):
        rows = together.step()
        for i, trainer in enumerate(alone):
            row = trainer.step()
            torch.testing.assert_close(rows[i], row[0], rtol=1e-5, atol=1e-6)
            for a, b in zip(_grads(together.runs[i].G), _grads(trainer.runs[0].G), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the frozen model never receives gradients
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("score", ["prob", "ce"])
def test_hinge_matches_definition(score):
    class ConstantLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor([2.0, 0.0, -1.0]), requires_grad=False)

        def forward(self, x):
            return self.logits.expand(x.shape[0], -1) + 0 * x.sum(dim=(1, 2, 3))[:, None]

    _, norm, images, _ = tiny_setup()
    beta = 0.5
    cfg = tiny_config(betas=(beta,), score=score)
    trainer = MesaTrainer(ConstantLogits(), norm, images, [(beta, 0, "k")], cfg)
    row = trainer.step()
    p0 = float(torch.tensor([2.0, 0.0, -1.0]).softmax(0)[0])
    expected = min(p0, beta) if score == "prob" else max(0.0, -math.log(p0) + math.log(beta))
    assert float(row[0, 0]) == pytest.approx(expected, rel=1e-5)
    assert float(row[0, 2]) == pytest.approx(p0, rel=1e-5)
    assert float(row[0, 3]) == (1.0 if p0 >= beta else 0.0)


@pytest.mark.parametrize(
    "options",
    [
        {"noise": "gaussian"},
        {"placement": "per-batch"},
        {"jitter_clamp": False},
        {"score": "ce", "alpha": 0.0},
    ],
)
def test_options_train(options):
    model, norm, images, _ = tiny_setup()
    trainer = MesaTrainer(model, norm, images, [(0.9, 0, "k")], tiny_config(**options))
    for _ in range(2):
        assert torch.isfinite(trainer.step()).all()


# ---------------------------------------------------------------------------------------------
# The whole search, artifacts and sampling


def test_search_reports_same_keys_and_restores_model(tmp_path):
    from engine.reporter import MemoryReporter

    model, norm, images, labels = tiny_setup()
    model.train()
    reporter = MemoryReporter(tmp_path / "run")
    result = search(
        model,
        norm,
        images,
        1,
        tiny_config(),
        labels=labels,
        reporter=reporter,
        true_pattern=torch.rand(3, 3, 3),
        bw_stats=True,
    )
    assert model.training and all(p.requires_grad for p in model.parameters())
    for beta in ("0.9", "0.5"):
        for name in (
            "hinge",
            "mine",
            "p_target",
            "above_beta",
            "validity",
            "validity_mean",
            "pairwise_l2",
            "pixel_std",
            "knn_entropy",
            "bw_distinct",
            "nearest_to_true",
        ):
            key = f"mesa/beta={beta}/{name}"
            assert key in result.metrics, key
            assert reporter.series(key), key
    assert 0.0 <= result.best_validity <= 1.0
    assert sum(result.histograms["mesa/beta=0.9"]) == 8
    assert result.samples[0].shape == (64, 3, 3, 3)
    assert reporter.check_ins and reporter.progress_calls


def test_search_stops_when_asked(tmp_path):
    from engine.errors import Cancelled
    from engine.reporter import MemoryReporter

    model, norm, images, labels = tiny_setup()
    with pytest.raises(Cancelled):
        search(
            model,
            norm,
            images,
            1,
            tiny_config(steps=50),
            labels=labels,
            reporter=MemoryReporter(tmp_path, stop_after=3),
        )


def test_staircase_weights():
    w = staircase_weights([0.9, 0.8, 0.5], [0.0, 0.0, 0.0])
    assert w == pytest.approx([0.1 / 0.9, 0.3 / 0.9, 0.5 / 0.9])  # widths of the steps
    # log space: huge entropies do not overflow; the more spread generator wins
    w = staircase_weights([0.5, 0.9], [2000.0, 1000.0])
    assert w[0] == pytest.approx(1.0) and math.isfinite(w[1])


def test_artifact_and_sampler_contract(tmp_path):
    model, norm, images, labels = tiny_setup()
    result = search(model, norm, images, 2, tiny_config(betas=(0.9, 0.8, 0.5)), labels=labels)
    truth = torch.rand(3, 3, 3)
    write_search_artifact(result, tmp_path / "s", meta={"model": "m"}, true_pattern=truth)
    for beta in ("0.9", "0.8", "0.5"):
        for name in ("G.safetensors", "T.safetensors", "samples.npy", "grid.png"):
            assert (tmp_path / "s" / f"beta={beta}" / name).exists()
        assert np.load(tmp_path / "s" / f"beta={beta}" / "samples.npy").shape == (64, 3, 3, 3)
    assert (tmp_path / "s" / "embedding.png").exists() and (tmp_path / "s" / "stats.json").exists()

    art = open_search(tmp_path / "s")
    assert art.betas == [0.9, 0.8, 0.5] and art.target == 2
    single = art.sampler(beta=0.8)
    assert (single.size, single.channels) == (3, 3)
    x = single.sample(5, torch.Generator().manual_seed(3))
    assert x.shape == (5, 3, 3, 3) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # the artifact samples exactly like the in-memory result (eval-mode BN)
    same = result.sampler(beta=0.8).sample(5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, same)

    rr = art.sampler(ensemble="round-robin")
    per_beta = [art.sampler(beta=b).sample(4, torch.Generator().manual_seed(9)) for b in art.betas]
    for epoch in range(4):
        rr.set_epoch(epoch)
        got = rr.sample(4, torch.Generator().manual_seed(9))
        torch.testing.assert_close(got, per_beta[epoch % 3])
    for name in ENSEMBLES:
        s = art.sampler(ensemble=name)
        s.set_epoch(1)
        out = s.sample(50, torch.Generator().manual_seed(0))
        assert out.shape == (50, 3, 3, 3) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="beta 0.7"):
        art.sampler(beta=0.7)
    with pytest.raises(UserError, match="ensemble 'mix'"):
        art.sampler(ensemble="mix")


def test_trigger_grid_layout():
    samples = np.random.default_rng(0).random((64, 3, 3, 3)).astype(np.float32)
    plain = trigger_grid(samples)
    with_truth = trigger_grid(samples, np.ones((3, 3, 3), np.float32))
    assert plain.dtype == np.uint8 and plain.shape[2] == 3
    assert with_truth.shape[1] > plain.shape[1]
    assert plain[0, 0].tolist() == [128, 128, 128]  # grey border


@pytest.mark.slow
def test_speed_benchmark_runs_quick():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "mesa_speed.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--betas",
            "0.9,0.5",
            "--device",
            "cpu",
            "--skip-fp32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = json.loads(done.stdout)
    assert out["ours"]["generator_steps_per_s"] > 0
    assert out["reference"]["generator_steps_per_s"] > 0 and out["speedup"] > 0
