"""The post-training defenses' pieces on tiny networks: FT-SAM's step against its formula, I-BAU's
hypergradient against the implicit function theorem, CLP's bounds and pairing, ANP's masks,
pruning and resume, and that the fine-tuning steps see the same batches as every other repair."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.ml.anp import (
    SWEEP_THRESHOLDS,
    MaskState,
    SweepPoint,
    batchnorm_layers,
    neurons_to_prune,
    optimize_masks,
    prune_batchnorm,
    select_threshold,
    within_budget,
)
from engine.ml.clp import channel_lipschitz, clp_prune, conv_bn_pairs
from engine.ml.data import Normalizer
from engine.ml.ftsam import SAMStep, frozen_batchnorm_statistics, smoothed_cross_entropy
from engine.ml.ibau import INNER_STEP, PENALTY, IBAUStep
from engine.ml.models import build_model
from engine.ml.repair import EvalSet, PlainStep, repair
from tests.ml.planted import PlantedBackdoor, synthetic
from tests.ml.planted import TinyBatchNormNet as TinyBN
from tests.ml.settings import anp_config, repair_config

CPU = torch.device("cpu")
IDENTITY = Normalizer((0.0,) * 3, (1.0,) * 3)


class Recorder:
    """Optimiser stand-in that keeps the gradients it was asked to apply."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": 0.0}]
        self.grads: list[torch.Tensor] = []

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


# ---------------------------------------------------------------------------------------------
# FT-SAM


def test_smoothed_cross_entropy_is_the_cross_entropy_against_smoothed_labels():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 1])
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    target = torch.full((5, 4), 0.1 / 3)
    target[torch.arange(5), y] = 0.9
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.1), expected)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_sam_step_takes_the_gradient_at_the_ascended_weights(adaptive):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    rho, lr = 0.5, 0.1
    start = [p.detach().clone() for p in model.parameters()]
    # By hand: g at w, e = rho * T^2 g / ||T g||, w - lr * g(w + e).
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    scales = [w.abs() if adaptive else torch.ones_like(w) for w in start]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads, strict=True)))
    shifted = [
        (w + rho * t * t * g / norm).requires_grad_(True)
        for w, t, g in zip(start, scales, grads, strict=True)
    ]
    out = F.linear(x, shifted[0], shifted[1])
    second = torch.autograd.grad(F.cross_entropy(out, y), shifted)
    expected = [w - lr * g for w, g in zip(start, second, strict=True)]

    step = SAMStep(CPU, "fp32", rho=rho, adaptive=adaptive, label_smoothing=0.0, lr=lr, epochs=1)
    optimizer = step.make_optimizer(model, repair_config(lr=lr, momentum=0.0))
    step.update(model, x, y, optimizer)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p, e, atol=1e-6)


def test_sam_cosine_and_frozen_statistics():
    step = SAMStep(CPU, "fp32", lr=0.01, epochs=100)
    assert step.learning_rate(0) == pytest.approx(0.01)
    assert step.learning_rate(50) == pytest.approx(0.005)
    assert step.learning_rate(99) == pytest.approx(0.005 * (1 + math.cos(0.99 * math.pi)))
    net = TinyBN().train()
    before = copy.deepcopy(net.bn1.state_dict())
    with frozen_batchnorm_statistics(net):
        net(torch.randn(4, 3, 8, 8))
    assert torch.equal(net.bn1.running_mean, before["running_mean"])
    assert net.bn1.momentum == 0.1  # restored
    net(torch.randn(4, 3, 8, 8))
    assert not torch.equal(net.bn1.running_mean, before["running_mean"])


# ---------------------------------------------------------------------------------------------
# I-BAU


@pytest.mark.parametrize("k", [1, 3])
def test_the_ibau_hypergradient_is_the_truncated_implicit_function_theorems(k):
    """The step's gradient is dL/dtheta + (dF/dtheta)^T sum_{i<K} (dF/ddelta)^T^i dL/ddelta (the
    reference's K fixed-point iterations: a truncated Neumann series of (I - dF/ddelta)^-T),
    computed here with explicit Jacobians of a linear model."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8)
    x = images.float() / 255
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    delta0 = 0.3 * torch.randn(1, 3, 2, 2)
    step = IBAUStep(
        CPU, "fp32", images, IDENTITY, torch.Generator().manual_seed(0), k=k, portion=0.5,
        channels_last=False,
    )  # fmt: skip
    step.perturbation = delta0
    rows = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3]  # its draw
    params = [p.detach().clone() for p in model.parameters()]
    recorder = Recorder(model.parameters())
    step.update(model, x, y, recorder)

    carries = torch.zeros(6, 1, 1, 1)
    carries[rows] = 1.0

    def outer(delta, w, b):
        return F.cross_entropy(F.linear((x + carries * delta).flatten(1), w, b), y)

    def mapped(delta, w, b):
        d = delta.clone().requires_grad_(True)
        logits = F.linear((x + d).flatten(1), w, b)
        inner = -F.cross_entropy(logits, y) + PENALTY * d.square().sum()
        (grad,) = torch.autograd.grad(inner, d, create_graph=True)
        return d - INNER_STEP * grad

    jac = torch.autograd.functional.jacobian
    d_delta, d_w, d_b = jac(outer, (delta0, *params))
    j_delta = jac(lambda d: mapped(d, *params), delta0).reshape(12, 12)
    v = torch.zeros(12)
    for _ in range(k):
        v = j_delta.T @ v + d_delta.reshape(12)
    j_w = jac(lambda w: mapped(delta0, w, params[1]), params[0]).reshape(12, -1)
    j_b = jac(lambda b: mapped(delta0, params[0], b), params[1]).reshape(12, -1)
    assert torch.allclose(recorder.grads[0], d_w + (v @ j_w).reshape(d_w.shape), atol=1e-6)
    assert torch.allclose(recorder.grads[1], d_b + (v @ j_b).reshape(d_b.shape), atol=1e-6)
    if k > 1:  # the implicit term is there: not the plain gradient
        assert not torch.allclose(recorder.grads[1], d_b, atol=1e-4)


def test_the_ibau_round_finds_a_perturbation_and_keeps_batchnorm_frozen():
    torch.manual_seed(2)
    net = TinyBN()
    images, _ = synthetic(40, seed=3, size=8)
    step = IBAUStep(CPU, "fp32", images, IDENTITY, torch.Generator().manual_seed(0),
                    batch_size=16, channels_last=False)  # fmt: skip
    stats = copy.deepcopy(net.bn1.state_dict())
    metrics = step.start_epoch(net, 0, None)
    assert step.perturbation.shape == (1, 3, 8, 8) and metrics["ibau/perturbation_l2"] > 0
    optimizer = step.make_optimizer(net, repair_config())
    assert isinstance(optimizer, torch.optim.Adam)
    net.train(step.train_mode)
    step.update(net, images[:16].float() / 255, torch.zeros(16, dtype=torch.long), optimizer)
    assert torch.equal(net.bn1.running_mean, stats["running_mean"])


# ---------------------------------------------------------------------------------------------
# Pairing: the fine-tuning steps see the batches every repair sees


class Recording:
    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.train_mode = inner.train_mode

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, model, x, y, optimizer):
        self.batches.append((x.detach().clone(), y.clone()))
        return self.inner.update(model, x, y, optimizer)


def test_sam_and_ibau_steps_see_the_same_batches_as_plain_fine_tuning():
    images, labels = synthetic(96, seed=4)
    held = EvalSet(images[:20], labels[:20], 4)
    config = repair_config(epochs=2, batch_size=32, stamp_rate=0.3, channels_last=False)
    seen, states = [], []
    for make in (
        lambda: PlainStep(CPU, "fp32"),
        lambda: SAMStep(CPU, "fp32", epochs=2),
        lambda: IBAUStep(CPU, "fp32", images, IDENTITY, torch.Generator().manual_seed(9),
                         k=2, batch_size=32, channels_last=False),
    ):  # fmt: skip
        step = Recording(make())
        generator = torch.Generator().manual_seed(7)
        repair(PlantedBackdoor(), IDENTITY, images, labels, None, config, held,
               generator=generator, step=step)  # fmt: skip
        seen.append(step.batches)
        states.append(generator.get_state())
    for other, state in zip(seen[1:], states[1:], strict=True):
        assert len(other) == len(seen[0]) == 6
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(seen[0], other, strict=True))  # fmt: skip
        assert torch.equal(state, states[0])


# ---------------------------------------------------------------------------------------------
# CLP


def test_channel_lipschitz_is_the_largest_singular_value_times_the_bn_scale():
    torch.manual_seed(3)
    net = TinyBN()
    with torch.no_grad():
        net.bn2.weight.uniform_(0.5, 2)
        net.bn2.running_var.uniform_(0.5, 2)
    uclc = channel_lipschitz(net.conv2, net.bn2)
    for k in range(8):
        w = net.conv2.weight[k].reshape(6, -1)
        sigma = torch.linalg.svdvals(w)[0]
        expected = sigma * (net.bn2.weight[k] / net.bn2.running_var[k].sqrt()).abs()
        assert float(uclc[k]) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_clp_prunes_the_outlying_channel_of_each_layer():
    torch.manual_seed(4)
    net = TinyBN()
    with torch.no_grad():
        net.conv2.weight.mul_(0.01)
        net.conv2.weight[5] = 1.0  # one channel far above the others
    layers = clp_prune(net, u=2.0)
    assert [(layer.conv, layer.bn) for layer in layers] == [("conv1", "bn1"), ("conv2", "bn2")]
    assert layers[1].pruned.nonzero().flatten().tolist() == [5]
    assert float(net.bn2.weight.detach()[5]) == 0.0 and float(net.bn2.bias.detach()[5]) == 0.0
    assert float(net.bn2.weight.detach()[4]) != 0.0


def test_clp_pairs_through_max_pooling_and_not_across_a_residual_sum():
    small = build_model("small", 10, 3)
    traced = conv_bn_pairs(small)
    assert traced == conv_bn_pairs(small, "registration")  # the reference's pairing, here
    assert ("layer1.conv1", "layer1.norm1") in traced and len(traced) == 7
    preact = build_model("preact-resnet18", 10, 3)
    traced = dict((b, c) for c, b in conv_bn_pairs(preact))
    registered = dict((b, c) for c, b in conv_bn_pairs(preact, "registration"))
    assert traced["layer1.0.bn1"] == "conv1" and traced["layer2.0.bn2"] == "layer2.0.conv1"
    assert "layer2.1.bn1" not in traced  # fed by a residual sum
    assert registered["layer2.1.bn1"] == "layer2.0.shortcut.0"  # the reference's pairing


# ---------------------------------------------------------------------------------------------
# ANP


def _anp_data():
    images, labels = synthetic(64, seed=5, size=8)
    return images, labels


def test_anp_learns_masks_on_a_copy_and_resumes_to_the_same_masks(monkeypatch):
    monkeypatch.setattr("engine.ml.anp.LOG_EVERY", 2)
    torch.manual_seed(5)
    net = TinyBN()
    before = copy.deepcopy(net.state_dict())
    images, labels = _anp_data()
    config = anp_config(iterations=6, batch_size=16)
    whole = optimize_masks(net, IDENTITY, images, labels, config,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert len(whole.masks) == 2 and whole.iteration == 6 and len(whole.history) == 3
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in whole.masks)
    assert any(float(m.min()) < 1 for m in whole.masks)

    saved = []
    g = torch.Generator().manual_seed(0)

    def keep(state):
        if state.iteration == 2:
            saved.append((copy.deepcopy(state), g.get_state()))

    optimize_masks(net, IDENTITY, images, labels, anp_config(iterations=2, batch_size=16),
                   generator=g, on_log=keep)  # fmt: skip
    state, generator_state = saved[0]
    g2 = torch.Generator()
    g2.set_state(generator_state)
    resumed = optimize_masks(net, IDENTITY, images, labels, config, generator=g2,
                             state=MaskState(state.masks, state.optimizer, 2, state.history))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(whole.masks, resumed.masks, strict=True))
    assert resumed.history == whole.history


def test_anp_prunes_by_threshold_or_count_and_zeroes_the_bn_scale():
    masks = [torch.tensor([0.9, 0.1, 0.2]), torch.tensor([0.05, 0.5])]
    by_threshold = neurons_to_prune(masks, anp_config(threshold=0.2))
    assert [c.tolist() for c in by_threshold] == [[False, True, True], [True, False]]
    by_count = neurons_to_prune(masks, anp_config(prune_count=2))
    assert [c.tolist() for c in by_count] == [[False, True, False], [True, False]]
    net = TinyBN()
    layers = batchnorm_layers(net)
    chosen = [torch.zeros(6, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)]
    chosen[1][3] = True
    bias = net.bn2.bias.detach().clone()
    assert prune_batchnorm(net, layers, chosen) == 1
    assert float(net.bn2.weight.detach()[3]) == 0.0 and torch.equal(net.bn2.bias, bias)


def _one_neuron_per_class():
    """A BatchNorm whose neuron k is class k's logit, and 100 one-pixel images: 50 of class 1,
    30 of class 2, 20 of class 3, each lit in its own channel (class 0 has none: an image whose
    neuron is pruned has all-zero logits and falls to class 0, wrong)."""
    net = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten()).eval()
    labels = torch.tensor([1] * 50 + [2] * 30 + [3] * 20)
    images = torch.zeros(100, 4, 1, 1, dtype=torch.uint8)
    images[torch.arange(100), labels] = 255
    return net, images, labels


# Neuron 3 (20 images) goes at 0.1, neuron 2 (30) at 0.3, neuron 1 (50) at 0.5; neuron 0 never.
MASKS = [torch.tensor([1.0, 0.5, 0.3, 0.1])]
FOUR = Normalizer((0.0,) * 4, (1.0,) * 4)


@pytest.mark.parametrize(
    ("max_drop", "threshold", "acc"),
    [(0.1, 0.05, 1.0), (0.25, 0.25, 0.8), (0.6, 0.45, 0.5), (1.0, 0.9, 0.0)],
)
def test_anp_sweep_prunes_at_the_largest_threshold_within_the_accuracy_budget(
    max_drop, threshold, acc
):
    net, images, labels = _one_neuron_per_class()
    before = copy.deepcopy(net.state_dict())
    selection = select_threshold(net, MASKS, FOUR, images, labels, max_drop)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # a copy pruned
    assert selection.unpruned_acc == 1.0
    assert [p.threshold for p in selection.points] == list(SWEEP_THRESHOLDS)
    assert (SWEEP_THRESHOLDS[0], SWEEP_THRESHOLDS[-1], len(SWEEP_THRESHOLDS)) == (0.0, 0.9, 19)
    pruned = {p.threshold: p.pruned for p in selection.points}
    assert (pruned[0.05], pruned[0.1], pruned[0.25], pruned[0.3], pruned[0.5]) == (0, 1, 1, 2, 3)
    accs = {p.threshold: p.defender_acc for p in selection.points}
    assert accs[0.05] == 1.0 and accs[0.45] == pytest.approx(0.5) and accs[0.9] == 0.0
    assert selection.chosen is not None
    assert selection.chosen.threshold == threshold
    assert selection.chosen.defender_acc == pytest.approx(acc)
    chosen = selection.neurons(MASKS)
    assert chosen[0].tolist() == (MASKS[0] <= threshold).tolist()
    assert selection.to_json()["chosen"] == threshold


def test_anp_sweep_prunes_nothing_when_no_threshold_keeps_the_accuracy():
    net, images, labels = _one_neuron_per_class()
    masks = [torch.tensor([1.0, 0.5, 0.3, 0.0])]  # neuron 3 goes even at threshold 0
    selection = select_threshold(net, masks, FOUR, images, labels, 0.1)
    assert selection.chosen is None and selection.points[0].defender_acc == pytest.approx(0.8)
    assert [c.tolist() for c in selection.neurons(masks)] == [[False] * 4]
    assert selection.to_json()["chosen"] is None


def test_anp_budget_takes_the_largest_threshold_that_fits_not_the_first_that_fails():
    points = [SweepPoint(0.0, 0, 0.9), SweepPoint(0.05, 3, 0.7), SweepPoint(0.1, 5, 0.85)]
    assert within_budget(points, 0.9, 0.1) == points[2]  # 0.85 >= 0.81, 0.7 < 0.81
    assert within_budget(points, 0.9, 0.01) == points[0]
    assert within_budget(points, 1.0, 0.05) is None
