"""Reverse-engineering baselines: one trigger by pixel-space SGD (``point``) and Neural Cleanse.

Both see only the defender's images (the first part of ``engine.ml.data.defender_split``); the
held-out images are for evaluation alone, and no code here reads the ground truth.

- ``reverse_point``: a k x k patch whose size and random placement are known; random init, CE to
  the target, SGD (lr 0.1, momentum 0.9) on the normalised patch, 5 epochs in batches of 100,
  clipped to [0, 1] in pixel space after each epoch (mesa-method.md section 4). N restarts, each
  with its own seed, trained side by side as one concatenated batch (the model is frozen in eval
  mode, so each restart's arithmetic is that of training it alone).
- ``neural_cleanse``: Wang et al. 2019. A mask m in [0, 1]^{HxW} shared over channels and a
  full-image pattern, both tanh-parametrised; loss CE(target) + lambda * |m|_1; Adam (lr 0.1,
  betas (0.5, 0.9)); the original's dynamic lambda (``CostSchedule``); the smallest-L1 mask whose
  attack success reaches the threshold is kept; MAD outlier detection over the labels' norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.ml.data import Normalizer, to_float
from engine.ml.runtime import autocast
from engine.ml.triggers import MaskTrigger, Placement, stamp
from engine.reporter import Reporter, or_null, stop_point

MAD_CONSTANT = 1.4826
TANH_EPS = 1e-7


def _stream_seed(seed: int, index: int, salt: int) -> int:
    """A random stream per restart or label that does not depend on which others run beside it."""
    return (seed * 1_000_003 + index * 7919 + salt * 104_729) % (2**62)


class _Frozen:
    """Eval mode and no weight gradients for the duration of a search; restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.was_training = self.model.training
        return self.model.eval().requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.model.parameters(), self.flags, strict=True):
            p.requires_grad_(flag)
        self.model.train(self.was_training)


def _check_images(images_u8: torch.Tensor, batch_size: int, what: str) -> None:
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise UserError(f"{what} needs the defender's images as uint8 (N, C, H, W) tensors")
    if images_u8.shape[0] < 1:
        raise UserError(f"{what} needs at least one defender image")
    if batch_size < 1:
        raise UserError(f"{what}: batch size {batch_size} must be at least 1")


# ---------------------------------------------------------------------------------------------
# point: one patch by pixel-space SGD


@dataclass
class PointResult:
    """Restart r's pattern ``patterns[r]`` (C, k, k) in [0, 1]; ``success[r]`` is its attack
    success on the defender images at the end (the defender's own data, fixed placements)."""

    patterns: torch.Tensor
    success: list[float]
    losses: list[list[float]] = field(default_factory=list)  # per restart, per epoch

    def pattern_list(self) -> list[torch.Tensor]:
        return list(self.patterns)


def reverse_point(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    target: int,
    *,
    size: int = 3,
    restarts: int = 10,
    epochs: int = 5,
    batch_size: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    placement: Placement | None = None,
    seed: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    reporter: Reporter | None = None,
) -> PointResult:
    """Reverse-engineer ``restarts`` independent k x k patches that flip images to ``target``."""
    reporter = or_null(reporter)
    _check_images(images_u8, batch_size, "point reversal")
    if restarts < 1:
        raise UserError(f"point restarts {restarts} must be at least 1")
    placement = placement or Placement("per-image")
    device = images_u8.device
    n, c, h, w = images_u8.shape
    mean = normalizer.mean.to(device).view(1, c, 1, 1)
    std = normalizer.std.to(device).view(1, c, 1, 1)
    streams = [torch.Generator().manual_seed(_stream_seed(seed, r, 1)) for r in range(restarts)]
    # The variable is the normalised patch (the script's choice); it starts from uniform pixels.
    init = torch.stack([torch.rand(c, size, size, generator=g) for g in streams]).to(device)
    patch = ((init - mean) / std).requires_grad_(True)
    optimizer = torch.optim.SGD([patch], lr=lr, momentum=momentum)
    per_epoch = math.ceil(n / batch_size)
    losses: list[list[float]] = [[] for _ in range(restarts)]
    targets = torch.full((restarts * min(batch_size, n),), target, device=device)
    with _Frozen(model) as frozen:
        for epoch in range(epochs):
            orders = [torch.randperm(n, generator=g) for g in streams]
            epoch_loss = torch.zeros(restarts, device=device)
            for i in range(per_epoch):
                stop_point(reporter)
                idx = torch.cat([o[i * batch_size : (i + 1) * batch_size] for o in orders])
                b = idx.shape[0] // restarts
                pos = torch.cat([placement.sample(b, (h, w), size, g) for g in streams]).to(device)
                x = normalizer(to_float(images_u8[idx.to(device)]))
                x = stamp(x, patch.repeat_interleave(b, dim=0), pos)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    logits = frozen(x)
                ce = F.cross_entropy(logits.float(), targets[: b * restarts], reduction="none")
                per_restart = ce.view(restarts, b).mean(1)
                optimizer.zero_grad(set_to_none=True)
                # Summing keeps each restart's gradient equal to that of its own mean loss.
                per_restart.sum().backward()
                optimizer.step()
                epoch_loss += per_restart.detach() * b
                reporter.progress("point", epoch * per_epoch + i + 1, epochs * per_epoch, {})
            with torch.no_grad():
                pixels = (patch * std + mean).clamp_(0.0, 1.0)
                patch.copy_((pixels - mean) / std)
            for r, value in enumerate((epoch_loss / n).tolist()):
                losses[r].append(value)
            reporter.check_in(120.0)
        patterns = (patch.detach() * std + mean).clamp(0.0, 1.0)
        success = _patch_success(frozen, normalizer, images_u8, patterns, target, size, seed)
    return PointResult(patterns=patterns.float(), success=success, losses=losses)


@torch.no_grad()
def _patch_success(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    patterns: torch.Tensor,
    target: int,
    size: int,
    seed: int,
    max_images: int = 1000,
) -> list[float]:
    """Each pattern's attack success on (up to ``max_images``) defender images."""
    x_u8 = images_u8[:max_images]
    g = torch.Generator().manual_seed(_stream_seed(seed, 0, 2))
    pos = Placement("per-image").sample(x_u8.shape[0], x_u8.shape[2:], size, g)
    x = to_float(x_u8)
    out = []
    for pattern in patterns:
        preds = model(normalizer(stamp(x, pattern, pos))).argmax(1)
        out.append(float((preds == target).float().mean()))
    return out


# ---------------------------------------------------------------------------------------------
# Neural Cleanse


@dataclass
class CostSchedule:
    """Neural Cleanse's dynamic lambda, per label, advanced once per outer step.

    lambda starts at 0; after ``patience`` consecutive successful steps (attack success >=
    ``threshold``) it is set to ``init_cost``; then ``patience`` successes in a row multiply it
    by ``up`` and ``patience`` failures in a row divide it by ``down``. Early stop (the
    original's): once a valid mask exists and lambda has gone both up and down, stop when the best
    norm has not improved for ``early_stop_patience`` steps.
    """

    init_cost: float = 1e-3
    patience: int = 5
    threshold: float = 0.99
    up: float = 2.0
    down: float = 2.0**1.5
    early_stop: bool = True
    early_stop_patience: int = 25
    cost: float = 0.0
    set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    best_norm: float = math.inf
    early_stop_best: float = math.inf
    early_stop_counter: int = 0

    def update(self, success: float, norm: float) -> tuple[bool, bool]:
        """Record one step's (success, mask L1). Returns (new best mask, stop now)."""
        improved = success >= self.threshold and norm < self.best_norm
        if improved:
            self.best_norm = norm
        stop = False
        if self.early_stop:
            if self.best_norm < math.inf:
                if self.best_norm >= self.early_stop_best:
                    self.early_stop_counter += 1
                else:
                    self.early_stop_counter = 0
            self.early_stop_best = min(self.best_norm, self.early_stop_best)
            stop = (
                self.up_flag
                and self.down_flag
                and self.early_stop_counter >= self.early_stop_patience
            )
        if self.cost == 0 and success >= self.threshold:
            self.set_counter += 1
            if self.set_counter >= self.patience:
                self.cost = self.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if success >= self.threshold:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= self.patience:
            self.up_counter = 0
            self.cost *= self.up
            self.up_flag = True
        elif self.down_counter >= self.patience:
            self.down_counter = 0
            self.cost /= self.down
            self.down_flag = True
        return improved, stop


def tanh_to_unit(raw: torch.Tensor) -> torch.Tensor:
    """The tanh parametrisation: any real into [0, 1] (the clamp absorbs float rounding)."""
    return (torch.tanh(raw) / (2 - TANH_EPS) + 0.5).clamp(0.0, 1.0)


def unit_to_tanh(value: torch.Tensor) -> torch.Tensor:
    """The inverse; 0 and 1 map to large finite values rather than infinities."""
    return torch.atanh(((value - 0.5) * (2 - TANH_EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


@dataclass
class LabelTrigger:
    """One label's reversed trigger: the smallest-L1 mask that reached the threshold (or the last
    mask when none did: ``reached`` False)."""

    label: int
    mask: torch.Tensor  # (H, W) in [0, 1]
    pattern: torch.Tensor  # (C, H, W) in [0, 1]
    l1: float
    success: float
    reached: bool
    steps: int
    cost: float

    def trigger(self) -> MaskTrigger:
        return MaskTrigger(self.mask, self.pattern)


@dataclass
class Detection:
    """MAD outlier test over the labels' mask norms (flagged: small side, index > threshold)."""

    labels: list[int]
    norms: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    median: float
    mad: float


@dataclass
class CleanseResult:
    triggers: dict[int, LabelTrigger]
    detection: Detection | None

    def most_suspicious(self) -> int:
        """The flagged label with the smallest norm, else the smallest norm overall."""
        pool = self.detection.flagged if self.detection and self.detection.flagged else None
        labels = pool or list(self.triggers)
        return min(labels, key=lambda label: self.triggers[label].l1)


def mad_detection(norms: dict[int, float] | Sequence[float], threshold: float = 2.0) -> Detection:
    """Anomaly index |norm - median| / (1.4826 * MAD); flag labels below the median whose index
    exceeds ``threshold`` (a backdoor needs an unusually small mask)."""
    if not isinstance(norms, dict):
        norms = dict(enumerate(norms))
    labels = list(norms)
    values = torch.tensor([float(norms[k]) for k in labels], dtype=torch.float64)
    median = values.quantile(0.5)  # numpy's median: the mean of the middle two when even
    mad = MAD_CONSTANT * (values - median).abs().quantile(0.5)
    if mad > 0:
        index = ((values - median).abs() / mad).tolist()
    else:
        # Every norm equal to the median but some: those are infinitely anomalous.
        index = [0.0 if v == median else math.inf for v in values.tolist()]
    flagged = [
        label
        for label, v, a in zip(labels, values.tolist(), index, strict=True)
        if v < float(median) and a > threshold
    ]
    return Detection(labels, values.tolist(), index, flagged, float(median), float(mad))


def neural_cleanse(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    labels: Sequence[int],
    *,
    epochs: int = 1000,
    steps_per_epoch: int = 31,
    batch_size: int = 32,
    lr: float = 0.1,
    adam_betas: tuple[float, float] = (0.5, 0.9),
    schedule: CostSchedule | None = None,
    detect_threshold: float = 2.0,
    seed: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    reporter: Reporter | None = None,
) -> CleanseResult:
    """Reverse a mask and pattern for every label in ``labels`` (side by side, each with its own
    parameters, schedule and random stream); detection runs when there are 3 labels or more.

    ``epochs`` outer steps of ``steps_per_epoch`` mini-batches of ``batch_size`` (the original:
    1000 x 31 x 32); lambda and the best mask are updated once per outer step from its mean
    attack success and mean mask norm, as in the original.
    """
    _check_images(images_u8, batch_size, "Neural Cleanse")
    reporter = or_null(reporter)
    labels = list(labels)
    if not labels:
        raise UserError("Neural Cleanse needs at least one label to reverse")
    search = _Cleanse.start(images_u8, labels, lr, adam_betas, schedule or CostSchedule(), seed)
    search.batch = min(batch_size, images_u8.shape[0])
    with _Frozen(model) as frozen:
        for epoch in range(epochs):
            if not search.active:
                break
            means = search.outer_step(
                frozen, normalizer, images_u8, steps_per_epoch, precision, channels_last, reporter
            )
            search.update(epoch, means)
            reporter.progress("neural-cleanse", epoch + 1, epochs, {"labels": len(search.active)})
            if (epoch + 1) % 10 == 0:
                reporter.check_in(300.0)
    triggers = search.triggers()
    detection = None
    if len(labels) >= 3:
        detection = mad_detection({k: t.l1 for k, t in triggers.items()}, detect_threshold)
    return CleanseResult(triggers, detection)


@dataclass
class _Cleanse:
    """Every label's mask and pattern, reversed side by side: each with its own parameters,
    schedule and random stream; ``active`` holds the labels whose schedule has not stopped."""

    labels: list[int]
    streams: list[torch.Generator]
    mask_raw: torch.Tensor
    pattern_raw: torch.Tensor
    optimizer: torch.optim.Optimizer
    schedules: list[CostSchedule]
    active: list[int]
    batch: int = 0
    best: dict[int, LabelTrigger] = field(default_factory=dict)
    steps_done: list[int] = field(default_factory=list)
    last_stats: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        images_u8: torch.Tensor,
        labels: list[int],
        lr: float,
        adam_betas: tuple[float, float],
        template: CostSchedule,
        seed: int,
    ) -> _Cleanse:
        _, c, h, w = images_u8.shape
        streams = [torch.Generator().manual_seed(_stream_seed(seed, lab, 3)) for lab in labels]
        mask_init = torch.stack([torch.rand(h, w, generator=g) for g in streams])
        pattern_init = torch.stack([torch.rand(c, h, w, generator=g) for g in streams])
        mask_raw = unit_to_tanh(mask_init).to(images_u8.device).requires_grad_(True)
        pattern_raw = unit_to_tanh(pattern_init).to(images_u8.device).requires_grad_(True)
        optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=adam_betas)
        schedules = [
            CostSchedule(**{k: getattr(template, k) for k in _SCHEDULE_SETTINGS}) for _ in labels
        ]
        count = len(labels)
        return cls(
            labels, streams, mask_raw, pattern_raw, optimizer, schedules, list(range(count)),
            steps_done=[0] * count, last_stats=[(0.0, math.inf)] * count,
        )  # fmt: skip

    def outer_step(
        self,
        frozen: nn.Module,
        normalizer: Normalizer,
        images_u8: torch.Tensor,
        steps: int,
        precision: str,
        channels_last: bool,
        reporter: Reporter,
    ) -> list[list[float]]:
        """``steps`` mini-batches for the active labels: their mean (success, mask L1)."""
        device = images_u8.device
        n, c, h, w = images_u8.shape
        active, b = self.active, self.batch
        sums = torch.zeros(len(active), 2, device=device)  # success, mask L1
        costs = torch.tensor([self.schedules[i].cost for i in active], device=device)
        act = torch.tensor(active, device=device)
        targets = torch.tensor(self.labels, device=device)[act].repeat_interleave(b)
        for _ in range(steps):
            stop_point(reporter)
            idx = torch.cat([torch.randint(0, n, (b,), generator=self.streams[i]) for i in active])
            x = to_float(images_u8[idx.to(device)]).view(len(active), b, c, h, w)
            mask = tanh_to_unit(self.mask_raw[act])  # (A, H, W)
            pattern = tanh_to_unit(self.pattern_raw[act])  # (A, C, H, W)
            blended = x * (1 - mask[:, None, None]) + mask[:, None, None] * pattern[:, None]
            xs = normalizer(blended.view(-1, c, h, w))
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = frozen(xs).float()
            ce = F.cross_entropy(logits, targets, reduction="none").view(len(active), b).mean(1)
            l1 = mask.abs().sum(dim=(1, 2))
            loss = ce + costs * l1
            self.optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            self.optimizer.step()
            with torch.no_grad():
                hit = (logits.argmax(1) == targets).float().view(len(active), b).mean(1)
                sums += torch.stack([hit, l1.detach()], dim=1)
        return (sums / steps).tolist()

    def update(self, epoch: int, means: list[list[float]]) -> None:
        """Lambda and the best mask, once per outer step, as in the original."""
        still = []
        for j, i in enumerate(self.active):
            success, norm = means[j]
            self.steps_done[i] = epoch + 1
            self.last_stats[i] = (success, norm)
            improved, stop = self.schedules[i].update(success, norm)
            if improved:
                snap = _snapshot(
                    self.labels[i], self.mask_raw[i], self.pattern_raw[i], success, norm
                )
                snap.steps, snap.cost = epoch + 1, self.schedules[i].cost
                self.best[i] = snap
            if not stop:
                still.append(i)
        self.active = still

    def triggers(self) -> dict[int, LabelTrigger]:
        """Each label's best mask, or its last one marked as not reached."""
        out = {}
        for i, label in enumerate(self.labels):
            if i in self.best:
                out[label] = self.best[i]
                continue
            success, norm = self.last_stats[i]
            snap = _snapshot(label, self.mask_raw[i], self.pattern_raw[i], success, norm)
            snap.reached, snap.steps, snap.cost = False, self.steps_done[i], self.schedules[i].cost
            out[label] = snap
        return out


_SCHEDULE_SETTINGS = (
    "init_cost",
    "patience",
    "threshold",
    "up",
    "down",
    "early_stop",
    "early_stop_patience",
)


def _snapshot(
    label: int, mask_raw: torch.Tensor, pattern_raw: torch.Tensor, success: float, norm: float
) -> LabelTrigger:
    with torch.no_grad():
        mask = tanh_to_unit(mask_raw).detach().float().cpu()
        pattern = tanh_to_unit(pattern_raw).detach().float().cpu()
    return LabelTrigger(label, mask, pattern, float(norm), float(success), True, 0, 0.0)
