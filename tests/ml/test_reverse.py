"""Reverse-engineering baselines: the point SGD reversal and Neural Cleanse (schedule, ranges,
MAD detection), on a hand-built backdoored model and tiny synthetic images."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.ml.data import Normalizer
from engine.ml.metrics import attack_success_rate
from engine.ml.reverse import (
    CostSchedule,
    mad_detection,
    neural_cleanse,
    reverse_point,
    tanh_to_unit,
    unit_to_tanh,
)
from engine.ml.triggers import PatchTrigger
from tests.ml.planted import PlantedBackdoor, synthetic

IDENTITY = Normalizer((0.0,) * 3, (1.0,) * 3)


# ---------------------------------------------------------------------------------------------
# point


def test_point_reversal_finds_a_working_trigger():
    model = PlantedBackdoor(target=1)
    images, labels = synthetic(120, seed=1)
    result = reverse_point(model, IDENTITY, images, 1, restarts=2, epochs=2, batch_size=60)
    assert result.patterns.shape == (2, 3, 3, 3)
    assert len(result.success) == 2 and min(result.success) > 0.9
    # Fresh images: the reversed patterns flip them, a random patch does not.
    fresh, fresh_y = synthetic(200, seed=9)
    for pattern in result.patterns:
        asr, _ = attack_success_rate(model, fresh, fresh_y, IDENTITY, PatchTrigger(pattern), 1)
        assert asr > 0.9
    random_asr, _ = attack_success_rate(
        model, fresh, fresh_y, IDENTITY, PatchTrigger(torch.rand(3, 3, 3)), 1
    )
    assert random_asr < 0.2
    # Its own loss (CE to the target) falls.
    assert all(losses[-1] < losses[0] for losses in result.losses)


def test_point_clips_in_pixel_space_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 12, 12))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    images, _ = synthetic(50, seed=2)
    normalizer = Normalizer((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    result = reverse_point(
        model, normalizer, images, 0, restarts=3, epochs=2, batch_size=20, lr=5.0, seed=3
    )
    assert result.patterns.min() >= 0.0 and result.patterns.max() <= 1.0
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # Restarts are independent: each has its own seed and its own start.
    assert not torch.allclose(result.patterns[0], result.patterns[1])


def test_point_restarts_side_by_side_equal_each_alone():
    model = PlantedBackdoor(target=2)
    images, _ = synthetic(60, seed=4)
    both = reverse_point(model, IDENTITY, images, 2, restarts=2, epochs=2, batch_size=30, seed=5)
    alone = reverse_point(model, IDENTITY, images, 2, restarts=1, epochs=2, batch_size=30, seed=5)
    assert torch.allclose(both.patterns[0], alone.patterns[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Neural Cleanse: the lambda schedule


def test_cost_starts_at_zero_and_is_set_after_patience_successes():
    s = CostSchedule(init_cost=1e-3, patience=5, early_stop=False)
    assert s.cost == 0.0
    for _ in range(4):
        s.update(1.0, 10.0)
    assert s.cost == 0.0
    s.update(1.0, 10.0)
    assert s.cost == 1e-3
    # A failure resets the set counter while the cost is still zero.
    t = CostSchedule(patience=3, early_stop=False)
    for success in (1.0, 1.0, 0.5, 1.0, 1.0):
        t.update(success, 1.0)
    assert t.cost == 0.0


def test_cost_goes_up_and_down_with_patience():
    s = CostSchedule(init_cost=1e-3, patience=5, early_stop=False)
    for _ in range(5):
        s.update(1.0, 10.0)
    assert s.cost == 1e-3 and not s.up_flag  # setting it resets the counters (the original)
    for _ in range(3):
        s.update(1.0, 10.0)
    assert s.cost == 1e-3
    s.update(1.0, 10.0)  # the fifth success in a row since the cost was set
    assert math.isclose(s.cost, 2e-3) and s.up_flag
    for _ in range(4):
        s.update(0.5, 10.0)
    assert math.isclose(s.cost, 2e-3)
    s.update(0.5, 10.0)
    assert math.isclose(s.cost, 2e-3 / 2**1.5) and s.down_flag


def test_best_mask_needs_the_threshold_and_a_smaller_norm():
    s = CostSchedule(threshold=0.99, early_stop=False)
    assert s.update(0.98, 1.0) == (False, False)
    assert s.update(0.99, 5.0)[0] is True
    assert s.update(1.0, 6.0)[0] is False
    assert s.update(1.0, 4.0)[0] is True
    assert s.best_norm == 4.0


def test_early_stop_waits_for_both_directions_and_no_progress():
    s = CostSchedule(patience=1, early_stop=True, early_stop_patience=3)
    assert s.update(1.0, 5.0) == (True, False)  # sets the cost
    s.update(0.1, 5.0)  # down
    s.update(1.0, 5.0)  # up; no improvement
    assert s.up_flag and s.down_flag
    stops = [s.update(1.0, 5.0)[1] for _ in range(3)]
    assert stops[-1] is True


# ---------------------------------------------------------------------------------------------
# Neural Cleanse: parametrisation, the search, detection


def test_tanh_parametrisation_round_trips_inside_the_unit_interval():
    values = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])
    raw = unit_to_tanh(values)
    assert torch.isfinite(raw).all()
    assert torch.allclose(tanh_to_unit(raw), values, atol=1e-3)
    extreme = tanh_to_unit(torch.tensor([-1e4, 1e4]))
    assert extreme.min() >= 0.0 and extreme.max() <= 1.0


def test_neural_cleanse_finds_the_small_mask_of_the_backdoor_label():
    model = PlantedBackdoor(target=1)
    images, _ = synthetic(200, seed=6)
    result = neural_cleanse(
        model, IDENTITY, images, range(4), epochs=40, steps_per_epoch=4, batch_size=32, seed=1
    )
    assert set(result.triggers) == {0, 1, 2, 3}
    for trig in result.triggers.values():
        assert trig.mask.shape == (12, 12) and trig.pattern.shape == (3, 12, 12)
        assert trig.mask.min() >= 0 and trig.mask.max() <= 1
        assert trig.pattern.min() >= 0 and trig.pattern.max() <= 1
        assert math.isclose(trig.l1, float(trig.mask.sum()), rel_tol=0.05) or not trig.reached
    backdoor = result.triggers[1]
    assert backdoor.reached and backdoor.success >= 0.99
    assert backdoor.l1 < min(result.triggers[k].l1 for k in (0, 2, 3)) / 3
    assert result.detection is not None and result.detection.flagged == [1]
    assert result.most_suspicious() == 1


def test_mad_detection_on_hand_made_norms():
    norms = {0: 40.0, 1: 42.0, 2: 38.0, 3: 41.0, 4: 39.0, 5: 5.0, 6: 40.5, 7: 39.5}
    det = mad_detection(norms)
    values = torch.tensor(list(norms.values()), dtype=torch.float64)
    median = values.quantile(0.5)
    mad = 1.4826 * (values - median).abs().quantile(0.5)
    assert math.isclose(det.median, float(median)) and math.isclose(det.mad, float(mad))
    assert det.flagged == [5]
    assert math.isclose(det.anomaly_index[5], float((median - 5.0) / mad))
    # Only the small side is suspicious: a huge norm is not a backdoor.
    assert mad_detection([10.0, 11.0, 9.0, 10.0, 100.0]).flagged == []
    # A clean model: similar norms, nothing flagged.
    assert mad_detection([10.0, 11.0, 9.5, 10.5, 9.0, 10.2]).flagged == []
