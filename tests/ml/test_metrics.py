"""Evaluation on a hand-made case: a model whose answers are known for every image.

Images are flat grey 3x8x8 pictures whose value encodes a class (10 * class + 5; the model reads
the median pixel, which a 3x3 patch cannot change). The model un-normalises its input and
- predicts the target class when a pure white pixel (the stamped ``square:white`` patch) is present,
  except for class 3 images, which ignore the trigger;
- otherwise predicts the encoded class, except class 4, which it always calls class 2.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.ml.data import Normalizer
from engine.ml.metrics import (
    attack_success_rate,
    clean_accuracy,
    evaluate,
    per_class_accuracy,
    predict,
    stamped_predictions,
    variation_asr,
)
from engine.ml.triggers import MaskTrigger, PatchTrigger, Placement, parse_trigger

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
TARGET = 0
NUM_CLASSES = 5
# class -> number of test images; 6 target-class images make "all images" differ from "non-target".
COUNTS = {0: 6, 1: 4, 2: 4, 3: 2, 4: 4}


class HandMadeModel(nn.Module):
    def __init__(self, top_half_only: bool = False):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)
        self.top_half_only = top_half_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean
        white = pixels > 0.999
        if self.top_half_only:  # the trigger only works in rows 0..3
            white = white[:, :, :4]
        has_patch = white.flatten(1).any(1)
        encoded = ((pixels.flatten(1).median(1).values * 255).round() - 5) / 10
        cls = encoded.round().long()
        clean_pred = torch.where(cls == 4, torch.full_like(cls, 2), cls)
        fires = has_patch & (cls != 3)
        pred = torch.where(fires, torch.full_like(cls, TARGET), clean_pred)
        return nn.functional.one_hot(pred, NUM_CLASSES).float() * 10


def hand_made_data() -> tuple[torch.Tensor, torch.Tensor]:
    labels = [c for c, n in COUNTS.items() for _ in range(n)]
    y = torch.tensor(labels)[
        torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    ]
    x = (10 * y + 5).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    return x, y


@pytest.fixture
def case():
    x, y = hand_made_data()
    trigger = PatchTrigger(parse_trigger("square:white"), Placement("per-image"))
    return HandMadeModel(), x, y, Normalizer(MEAN, STD), trigger


def test_the_hand_made_model_behaves_as_described(case):
    model, x, y, norm, trigger = case
    preds = predict(model, x, norm)
    expected = torch.where(y == 4, torch.full_like(y, 2), y)
    assert torch.equal(preds, expected)


def test_asr_counts_non_target_images_only(case):
    model, x, y, norm, trigger = case
    asr, ra = attack_success_rate(model, x, y, norm, trigger, TARGET)
    # 14 non-target images: classes 1, 2, 4 (12 images) flip to the target, class 3 (2) does not.
    assert asr == pytest.approx(12 / 14)
    assert asr != pytest.approx(18 / 20)  # what counting the 6 target-class images would give
    # Robust accuracy: stamped non-target images scored against their labels (only class 3).
    assert ra == pytest.approx(2 / 14)


def test_evaluate_keys_and_values(case):
    model, x, y, norm, trigger = case
    out = evaluate(
        model, x, y, norm, num_classes=NUM_CLASSES, trigger=trigger, target=TARGET, per_class=True
    )
    assert out["acc_clean"] == pytest.approx(16 / 20)
    assert out["asr"] == pytest.approx(12 / 14)
    assert out["ra"] == pytest.approx(2 / 14)
    assert {k: out[f"acc_class/{k}"] for k in range(5)} == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}
    clean_only = evaluate(model, x, y, norm, num_classes=NUM_CLASSES)
    assert set(clean_only) == {"acc_clean"}


def test_clean_and_per_class_accuracy_helpers():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    y = torch.tensor([0, 1, 0, 2, 2, 1])
    assert clean_accuracy(preds, y) == pytest.approx(4 / 6)
    assert per_class_accuracy(preds, y, 4) == {0: 0.5, 1: 0.5, 2: 1.0}  # class 3 absent
    assert math.isnan(clean_accuracy(preds[:0], y[:0]))


def test_asr_is_nan_without_non_target_images(case):
    model, x, y, norm, trigger = case
    keep = y == TARGET
    asr, ra = attack_success_rate(model, x[keep], y[keep], norm, trigger, TARGET)
    assert math.isnan(asr) and math.isnan(ra)


def test_fixed_placements_give_the_same_result_twice():
    x, y = hand_made_data()
    x, y = x.repeat(10, 1, 1, 1), y.repeat(10)
    model, norm = HandMadeModel(top_half_only=True), Normalizer(MEAN, STD)
    trigger = PatchTrigger(parse_trigger("square:white"), Placement("per-image"))
    first = attack_success_rate(model, x, y, norm, trigger, TARGET, batch_size=7)
    second = attack_success_rate(model, x, y, norm, trigger, TARGET, batch_size=64)
    assert first == second
    assert 0.1 < first[0] < 12 / 14  # the placement matters for this model
    a = stamped_predictions(model, x, norm, trigger, seed=5)
    assert torch.equal(a, stamped_predictions(model, x, norm, trigger, seed=5))
    assert not torch.equal(a, stamped_predictions(model, x, norm, trigger, seed=6))
    # repeats averages over placement sets seed, seed+1, ...
    r0 = attack_success_rate(model, x, y, norm, trigger, TARGET, seed=10)[0]
    r1 = attack_success_rate(model, x, y, norm, trigger, TARGET, seed=11)[0]
    both = attack_success_rate(model, x, y, norm, trigger, TARGET, seed=10, repeats=2)[0]
    assert both == pytest.approx((r0 + r1) / 2)


def test_per_batch_attacks_are_evaluated_at_per_image_placements():
    x, y = hand_made_data()
    x, y = x.repeat(10, 1, 1, 1), y.repeat(10)
    model, norm = HandMadeModel(top_half_only=True), Normalizer(MEAN, STD)
    pattern = parse_trigger("square:white")
    per_batch = attack_success_rate(
        model, x, y, norm, PatchTrigger(pattern, Placement("per-batch")), TARGET
    )
    per_image = attack_success_rate(
        model, x, y, norm, PatchTrigger(pattern, Placement("per-image")), TARGET
    )
    assert per_batch == per_image


def test_variation_asr_keys_and_values(case):
    model, x, y, norm, trigger = case
    out = variation_asr(model, x, y, norm, trigger, TARGET)
    assert set(out) == {
        "asr_noise",
        "asr_rot90",
        "asr_invert",
        "asr_flip1",
        "asr_occlude1",
        "asr_corner",
    }
    assert out["asr_invert"] == 0.0  # a black square has no white pixel
    for key in ("asr_rot90", "asr_flip1", "asr_occlude1", "asr_corner", "asr_noise"):
        assert out[key] == pytest.approx(12 / 14), key


def test_mask_trigger_evaluation(case):
    model, x, y, norm, _ = case
    mask = torch.zeros(8, 8)
    mask[6, 1] = 1.0
    trigger = MaskTrigger(mask, torch.ones(3, 8, 8))
    asr, ra = attack_success_rate(model, x, y, norm, trigger, TARGET)
    assert (asr, ra) == (pytest.approx(12 / 14), pytest.approx(2 / 14))
