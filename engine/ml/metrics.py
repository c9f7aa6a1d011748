"""Evaluation: clean accuracy, attack success rate, robust accuracy, ASR under variations.

Definitions (metric keys in brackets, prefixed ``eval/`` by the tasks):
- clean accuracy [acc_clean]: top-1 on unstamped images;
- ASR [asr]: share of non-target-class images predicted as the target when the trigger is stamped;
  patch positions come from a fixed seeded stream, so every epoch sees the same placements, and
  ``repeats`` > 1 averages over several placements per image;
- robust accuracy [ra]: the same stamped non-target images scored against their true labels;
- per-class accuracy [acc_class/<i>];
- ASR under variations [asr_noise, asr_rot90, asr_invert, asr_flip1, asr_occlude1, asr_corner].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.ml.data import Normalizer, to_float
from engine.ml.runtime import autocast
from engine.ml.triggers import MaskTrigger, PatchTrigger, Placement, trigger_variations

Trigger = PatchTrigger | MaskTrigger


@torch.no_grad()
def predict(
    model: nn.Module,
    x_u8: torch.Tensor,
    normalizer: Normalizer,
    *,
    transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """Predicted labels for uint8 images; ``transform(x_float, start)`` stamps in pixel space."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in range(0, x_u8.shape[0], batch_size):
        x = to_float(x_u8[start : start + batch_size].to(device))
        if transform is not None:
            x = transform(x, start)
        x = normalizer(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        preds.append(logits.argmax(1))
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)


def _fixed_positions(
    n: int, image_size: tuple[int, int], k: int, placement: Placement, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if placement.mode == "per-batch":
        # Evaluation draws per image even for per-batch attacks: a fairer average over places.
        placement = Placement("per-image")
    return placement.sample(n, image_size, k, g)


def stamped_predictions(
    model: nn.Module,
    x_u8: torch.Tensor,
    normalizer: Normalizer,
    trigger: Trigger,
    *,
    seed: int = 1234,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """Predictions on stamped images; patch positions fixed by ``seed``."""
    if isinstance(trigger, PatchTrigger):
        from engine.ml.triggers import stamp

        positions = _fixed_positions(
            x_u8.shape[0], (x_u8.shape[2], x_u8.shape[3]), trigger.size, trigger.placement, seed
        )

        def transform(x: torch.Tensor, start: int) -> torch.Tensor:
            pos = positions[start : start + x.shape[0]].to(x.device)
            return stamp(x, trigger.pattern.to(x.device), pos)
    else:

        def transform(x: torch.Tensor, start: int) -> torch.Tensor:
            return trigger.apply(x)

    return predict(
        model,
        x_u8,
        normalizer,
        transform=transform,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )


def clean_accuracy(preds: torch.Tensor, y: torch.Tensor) -> float:
    return float((preds == y).float().mean()) if y.numel() else float("nan")


def per_class_accuracy(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[int, float]:
    out = {}
    for c in range(num_classes):
        mask = y == c
        if mask.any():
            out[c] = float((preds[mask] == c).float().mean())
    return out


def attack_success_rate(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    trigger: Trigger,
    target: int,
    *,
    repeats: int = 1,
    seed: int = 1234,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[float, float]:
    """(ASR, robust accuracy) over non-target-class images, averaged over ``repeats`` placements."""
    keep = y != target
    xs, ys = x_u8[keep], y[keep]
    if ys.numel() == 0:
        return float("nan"), float("nan")
    asr = ra = 0.0
    for r in range(repeats):
        preds = stamped_predictions(
            model,
            xs,
            normalizer,
            trigger,
            seed=seed + r,
            batch_size=batch_size,
            precision=precision,
            channels_last=channels_last,
        )
        asr += float((preds == target).float().mean())
        ra += float((preds == ys.to(preds.device)).float().mean())
    return asr / repeats, ra / repeats


def outcomes(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    *,
    trigger: Trigger | None = None,
    target: int | None = None,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
    seed: int = 1234,
) -> dict[str, torch.Tensor]:
    """Per-image results behind ``evaluate``'s rates, for paired statistics: ``clean`` (every
    image: predicted correctly) and, when the trigger is known, ``asr`` (each non-target image in
    order, stamped at the same fixed placements as ``attack_success_rate``: predicted as the
    target). Boolean tensors on the CPU; their means are ``acc_clean`` and ``asr``."""
    options = {"batch_size": batch_size, "precision": precision, "channels_last": channels_last}
    preds = predict(model, x_u8, normalizer, **options)
    y_dev = y.to(preds.device)
    out = {"clean": (preds == y_dev).cpu()}
    if trigger is not None and target is not None:
        keep = y_dev != target
        stamped = stamped_predictions(model, x_u8[keep], normalizer, trigger, seed=seed, **options)
        out["asr"] = (stamped == target).cpu()
    return out


def outcome_bits(values: torch.Tensor) -> str:
    """A boolean vector as a string of 0 and 1 (readable in JSON, recomputable by anyone)."""
    return "".join("1" if v else "0" for v in values.tolist())


def evaluate(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    *,
    num_classes: int,
    trigger: Trigger | None = None,
    target: int | None = None,
    repeats: int = 1,
    per_class: bool = False,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
    seed: int = 1234,
) -> dict[str, float]:
    """The standard evaluation; keys without the ``eval/`` prefix."""
    preds = predict(
        model,
        x_u8,
        normalizer,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )
    y_dev = y.to(preds.device)
    out = {"acc_clean": clean_accuracy(preds, y_dev)}
    if per_class:
        for c, acc in per_class_accuracy(preds, y_dev, num_classes).items():
            out[f"acc_class/{c}"] = acc
    if trigger is not None and target is not None:
        asr, ra = attack_success_rate(
            model,
            x_u8,
            y_dev,
            normalizer,
            trigger,
            target,
            repeats=repeats,
            seed=seed,
            batch_size=batch_size,
            precision=precision,
            channels_last=channels_last,
        )
        out["asr"] = asr
        out["ra"] = ra
    return out


def variation_asr(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    trigger: PatchTrigger,
    target: int,
    *,
    seed: int = 4321,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, float]:
    """ASR of variations of the pattern (noise, rotation, inversion, one pixel flipped or occluded)
    and of the original pattern at the fixed bottom-right corner."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    variants = trigger_variations(trigger.pattern.cpu(), g)
    for name, pattern in variants.items():
        asr, _ = attack_success_rate(
            model,
            x_u8,
            y,
            normalizer,
            PatchTrigger(pattern, trigger.placement),
            target,
            seed=seed,
            batch_size=batch_size,
            precision=precision,
            channels_last=channels_last,
        )
        out[f"asr_{name}"] = asr
    asr, _ = attack_success_rate(
        model,
        x_u8,
        y,
        normalizer,
        PatchTrigger(trigger.pattern, Placement("corner")),
        target,
        seed=seed,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )
    out["asr_corner"] = asr
    return out
