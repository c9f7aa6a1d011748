"""The repair loop shared by every defense (so the comparison is fair).

Fine-tune the model on the defender's images (train mode, SGD lr 1e-3, momentum 0.9, batch 128,
10 epochs: the paper's settings); each image is stamped with a freshly drawn trigger with
probability ``stamp_rate`` and keeps its correct label, so the model unlearns the trigger. Only
the trigger source differs between methods:

- a ``TriggerSampler`` of k x k patches (MESA's generators, with the scan's valid probes mixed
  in by ``ProbeMixSampler``; ``FixedPatternSampler`` for the point reversal and the ideal oracle,
  ``RandomPatchSampler`` for the random-patch control), stamped at placements drawn per image
  (``engine.ml.triggers.Placement``), or, for a MESA search with a learned position
  distribution, at places drawn from that distribution, or, for the ideal oracle of a backdoor
  at one fixed place, at that place;
- a full-image ``MaskTrigger`` (Neural Cleanse), blended at its fixed place;
- nothing (plain fine-tuning, the control the paper lacks).

Every epoch ends with an evaluation on the held-out images: clean accuracy and, when the original
trigger is known (evaluation only), its ASR and robust accuracy.

Repairs are paired: two random streams feed a repair. The repair's generator decides everything
but the trigger itself (image order, augmentation, which images are stamped, where), and it is
drawn from the same way whatever the source, ``finetune`` and Neural Cleanse included; the
trigger source draws only from its own stream (``trigger_stream``). So every method repairs one
model on the same batches with the same images stamped at the same places, and only the stamped
patterns differ: a sampler that returns the original trigger repairs exactly as ``ideal`` does.

How a batch updates the model is a ``RepairStep``: ``PlainStep`` (cross-entropy, SGD; every method
above) by default, or a method's own (FT-SAM's sharpness-aware step in ``engine.ml.ftsam``, I-BAU's
implicit-hypergradient step in ``engine.ml.ibau``). A step never draws from the repair's generator:
its own randomness comes from ``method_stream``, so its batches are still those of every other
repair of the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.ml.data import Normalizer, augment, batch_indices, to_float
from engine.ml.metrics import evaluate
from engine.ml.runtime import autocast
from engine.ml.triggers import MaskTrigger, PatchTrigger, Placement, blend, stamp
from engine.reporter import Reporter, or_null, stop_point


class TriggerSampler(Protocol):
    """What the repair loop samples: ``(n, C, k, k)`` patches in [0, 1], from MESA's generators
    (``engine.ml.mesa``'s samplers subclass it) or a fixed pattern."""

    size: int
    channels: int

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def set_epoch(self, epoch: int) -> None:
        """Only the round-robin ensemble uses the epoch; the others ignore it."""


class FixedPatternSampler:
    """Known patterns (the point reversal's restarts, or the original trigger for ``ideal``),
    handed out in turn so that every pattern is used equally often. ``at``: a fixed placement
    the patterns are stamped at (the ideal repair of a backdoor that lives at one place: where
    the attack stamped); None leaves the repair's own random placements."""

    def __init__(self, patterns: torch.Tensor, at: Placement | None = None):
        if at is not None and not at.fixed:
            raise UserError(f"placement '{at.mode}' is not a fixed place; use corner or at:ROW,COL")
        self.at = at
        if patterns.dim() == 3:
            patterns = patterns.unsqueeze(0)
        if patterns.dim() != 4 or patterns.shape[-1] != patterns.shape[-2]:
            raise UserError(
                f"patterns of shape {tuple(patterns.shape)} are not (N, C, k, k) square patches"
            )
        self.patterns = patterns.float()
        self.size = int(patterns.shape[-1])
        self.channels = int(patterns.shape[1])
        self._cursor = 0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        count = self.patterns.shape[0]
        index = (self._cursor + torch.arange(n)) % count
        self._cursor = (self._cursor + n) % count
        return self.patterns[index]

    def set_epoch(self, epoch: int) -> None:
        """Every epoch sees the same patterns; nothing to switch."""

    def sample_positions(
        self, n: int, image_size: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor | None:
        """The fixed place for every stamp (no draws), or None: the repair's placements."""
        return None if self.at is None else self.at.sample(n, image_size, self.size)

    def state_dict(self) -> dict[str, int]:
        """Which pattern comes next (a resumed repair continues the rotation)."""
        return {"cursor": self._cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._cursor = int(state["cursor"]) % self.patterns.shape[0]


def source_state(source: object) -> dict:
    """The state a trigger source carries between epochs (for checkpoints); ``{}`` when none.
    Generator samplers keep none: their randomness is the repair's generator, and the
    round-robin ensemble is set from the epoch."""
    state_dict = getattr(source, "state_dict", None)
    return state_dict() if callable(state_dict) else {}


def load_source_state(source: object, state: dict) -> None:
    load = getattr(source, "load_state_dict", None)
    if state and callable(load):
        load(state)


class RandomPatchSampler:
    """Uniformly random k x k patches in [0, 1] (the control: does any patch noise do?)."""

    def __init__(self, channels: int = 3, size: int = 3):
        self.size, self.channels = size, channels

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, self.channels, self.size, self.size, generator=generator)

    def set_epoch(self, epoch: int) -> None:
        """Stateless."""


class ProbeMixSampler:
    """A sampler whose patterns are replaced, each with probability ``share``, by one of
    ``probes`` drawn uniformly (a MESA repair's valid scan probes beside its generators'
    samples; docs/method.md). The positions, the epoch and the state are the inner sampler's.
    Its draws follow the inner sampler's on the trigger stream: the share's coin, then the
    probe."""

    def __init__(self, inner: TriggerSampler, probes: torch.Tensor, share: float):
        if probes.dim() != 4 or probes.shape[0] == 0 or not 0.0 <= share <= 1.0:
            raise UserError("a probe mix needs (N, C, k, k) probes, N >= 1, and a share in [0, 1]")
        self.inner, self.probes, self.share = inner, probes.float(), float(share)
        self.size, self.channels = inner.size, inner.channels

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        patterns = self.inner.sample(n, generator)
        take = torch.rand(n, generator=generator, device=generator.device) < self.share
        pick = torch.randint(
            self.probes.shape[0], (n,), generator=generator, device=generator.device
        )
        probes = self.probes.to(patterns.device)[pick.to(patterns.device)]
        return torch.where(take.to(patterns.device)[:, None, None, None], probes, patterns)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def sample_positions(
        self, n: int, image_size: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor | None:
        own = getattr(self.inner, "sample_positions", None)
        return own(n, image_size, generator) if callable(own) else None

    def state_dict(self) -> dict:
        return source_state(self.inner)

    def load_state_dict(self, state: dict) -> None:
        load_source_state(self.inner, state)


TriggerSource = TriggerSampler | MaskTrigger | None


@dataclass(frozen=True)
class RepairConfig:
    """The repair loop's settings. Defaults, bounds and help live in ``engine.specs.DefendSpec``
    alone, which builds this (``DefendSpec.repair_config()``) from values it has checked."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    stamp_rate: float
    placement: str
    augment: bool
    channels_last: bool
    eval_batch_size: int


# The trigger source's stream is seeded apart from the repair's own (``trigger_stream``).
TRIGGER_STREAM_OFFSET = 7_919


def trigger_stream(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The stream a repair's trigger source draws from, the same for every method of a seed."""
    return torch.Generator(device=device).manual_seed(seed + TRIGGER_STREAM_OFFSET)


# A defense's own randomness (ANP's masks and noise, I-BAU's perturbation pass and perturbed rows)
# is seeded apart from the repair's and the trigger source's streams (``method_stream``).
METHOD_STREAM_OFFSET = 104_729


def method_stream(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The stream a defense draws its own randomness from (never the repair's generator)."""
    return torch.Generator(device=device).manual_seed(seed + METHOD_STREAM_OFFSET)


# ---------------------------------------------------------------------------------------------
# How one batch updates the model


class RepairStep(Protocol):
    """One optimisation step of the repair on a prepared batch (normalised, on the device).

    ``train_mode``: the model's mode while it is updated (BatchNorm batch statistics or not).
    ``make_optimizer`` builds the optimiser; ``learning_rate(epoch)`` is the epoch's rate (None: the
    optimiser's own, constant); ``start_epoch`` runs before an epoch's first batch and returns
    metrics to log with the epoch; ``update`` does the whole step (gradients and optimiser step)
    and returns the batch's loss, detached. ``state_dict``/``load_state_dict`` carry the step's own
    state across a checkpoint (optional)."""

    train_mode: bool

    def make_optimizer(self, model: nn.Module, config: RepairConfig) -> torch.optim.Optimizer: ...

    def learning_rate(self, epoch: int) -> float | None: ...

    def start_epoch(
        self, model: nn.Module, epoch: int, reporter: Reporter | None
    ) -> dict[str, float]: ...

    def update(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor: ...


def sgd(model: nn.Module, config: RepairConfig) -> torch.optim.Optimizer:
    """The repair's optimiser: SGD with the config's rate, momentum and weight decay."""
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


class PlainStep:
    """Cross-entropy on the batch, one SGD step (the paper's repair, and every trigger source's)."""

    train_mode = True

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision

    def make_optimizer(self, model: nn.Module, config: RepairConfig) -> torch.optim.Optimizer:
        return sgd(model, config)

    def learning_rate(self, epoch: int) -> float | None:
        return None

    def start_epoch(self, model: nn.Module, epoch: int, reporter: Reporter | None) -> dict:
        return {}

    def update(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()


def step_state(step: object) -> dict:
    """A repair step's own state for checkpoints (``{}`` when it keeps none)."""
    return source_state(step)


def load_step_state(step: object, state: dict) -> None:
    load_source_state(step, state)


def build_repair_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    source: TriggerSource,
    rate: float,
    generator: torch.Generator,
    placement: Placement,
    trigger_generator: torch.Generator | None = None,
    patch_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp each pixel-space image independently with probability ``rate``; labels unchanged.

    Returns (images, labels, stamped mask). Which images are stamped and where (one placement per
    image, for ``patch_size`` patches unless the source has its own size) are drawn from
    ``generator`` for every source, none included, so the repair's stream advances alike for
    every method; the patterns come from ``trigger_generator`` (default: ``generator``). A source
    with a learned position distribution (a MESA search with ``learned`` placement) stamps at
    places drawn from it, from ``trigger_generator`` too, after the patterns, and the ideal of a
    fixed-position attack at the attack's place: the repair's stream still draws its placements,
    so every method's batches stay the same. Every step is one
    vectorised operation on the images' device.
    """
    n = x.shape[0]
    chosen = (torch.rand(n, generator=generator) < rate).to(x.device)
    size = getattr(source, "size", patch_size)
    positions = placement.sample(n, (x.shape[2], x.shape[3]), size, generator, x.device)
    if source is None or rate <= 0.0:
        return x, y, torch.zeros(n, dtype=torch.bool, device=x.device)
    if isinstance(source, MaskTrigger):
        stamped = blend(x, source.mask.to(x.device), source.pattern.to(x.device))
    else:
        patterns = source.sample(n, trigger_generator or generator).to(x.device, x.dtype)
        own_places = getattr(source, "sample_positions", None)
        if callable(own_places):  # a learned search's pi, or the ideal's fixed place
            own = own_places(n, (x.shape[2], x.shape[3]), trigger_generator or generator)
            if own is not None:
                positions = own.to(x.device)
        stamped = stamp(x, patterns, positions)
    return torch.where(chosen[:, None, None, None], stamped, x), y, chosen


@dataclass
class EvalSet:
    """The held-out images and, when known (evaluation only), the original trigger."""

    images: torch.Tensor  # uint8 (N, C, H, W) on the device
    labels: torch.Tensor
    num_classes: int
    trigger: PatchTrigger | None = None
    target: int | None = None


def evaluate_repair(
    model: nn.Module,
    normalizer: Normalizer,
    held_out: EvalSet,
    *,
    precision: str,
    channels_last: bool,
    batch_size: int = 1000,
) -> dict[str, float]:
    """``acc_clean``, and ``asr`` and ``ra`` of the original trigger when it is known."""
    return evaluate(
        model,
        held_out.images,
        held_out.labels,
        normalizer,
        num_classes=held_out.num_classes,
        trigger=held_out.trigger,
        target=held_out.target if held_out.trigger is not None else None,
        batch_size=batch_size,
        precision=precision,
        channels_last=channels_last,
    )


@dataclass
class _Repair:
    """What stays fixed through a repair's epochs; ``repair`` builds it, and its methods are the
    stages of an epoch (start, batches, evaluation)."""

    model: nn.Module
    normalizer: Normalizer
    images_u8: torch.Tensor
    labels: torch.Tensor  # on the images' device
    source: TriggerSource
    config: RepairConfig
    held_out: EvalSet
    step: RepairStep
    optimizer: torch.optim.Optimizer
    placement: Placement
    use_cl: bool
    generator: torch.Generator
    trigger_generator: torch.Generator | None
    patch_size: int
    precision: str
    reporter: Reporter

    def epoch(self, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        """Train one epoch and evaluate; returns the epoch's metrics (logged with ``epoch + 1``
        as the step) and its ``eval/...`` part."""
        started = time.perf_counter()
        lr, step_metrics = self._start_epoch(epoch)
        loss_sum, stamped = self._train_batches(epoch)
        n = self.images_u8.shape[0]
        metrics = {
            "repair/loss": float(loss_sum / n),
            "repair/stamped": float(stamped / n),
            "repair/epoch": epoch + 1,
            "time/epoch_s": time.perf_counter() - started,
            **step_metrics,
        }
        if lr is not None:
            metrics["repair/lr"] = lr
        evaluation = evaluate_repair(
            self.model,
            self.normalizer,
            self.held_out,
            precision=self.precision,
            channels_last=self.use_cl,
            batch_size=self.config.eval_batch_size,
        )
        last = {f"eval/{k}": v for k, v in evaluation.items()}
        metrics.update(last)
        self.reporter.log(metrics, epoch + 1)
        self.reporter.check_in(max(120.0, 5 * metrics["time/epoch_s"]))
        return metrics, last

    def _start_epoch(self, epoch: int) -> tuple[float | None, dict[str, float]]:
        """The source's epoch (round-robin ensemble), the step's rate for the epoch (None: the
        optimiser's own) and the step's own start (I-BAU's perturbation), whose metrics come back."""
        self.model.train(self.step.train_mode)
        if self.source is not None and not isinstance(self.source, MaskTrigger):
            self.source.set_epoch(epoch)
        lr = self.step.learning_rate(epoch)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        step_metrics = self.step.start_epoch(self.model, epoch, self.reporter)
        self.model.train(self.step.train_mode)  # the step's start may leave another mode
        return lr, step_metrics

    def _train_batches(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the defender's images; returns the summed loss (per image) and the
        count of stamped images, on the device (no host sync per batch)."""
        config, device = self.config, self.images_u8.device
        n = self.images_u8.shape[0]
        steps_per_epoch = math.ceil(n / config.batch_size)
        loss_sum = torch.zeros((), device=device)
        stamped = torch.zeros((), device=device)
        for i, idx in enumerate(batch_indices(n, config.batch_size, self.generator, device=device)):
            stop_point(self.reporter)
            x, y, chosen = self._batch(idx)
            loss = self.step.update(self.model, x, y, self.optimizer)
            loss_sum += loss * y.shape[0]
            stamped += chosen.sum()
            self.reporter.progress(
                "repair",
                epoch * steps_per_epoch + i + 1,
                config.epochs * steps_per_epoch,
                {"epoch": epoch + 1},
            )
        return loss_sum, stamped

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch at ``idx``, augmented, stamped and normalised: (x, y, stamped mask)."""
        x = self.images_u8[idx]
        y = self.labels[idx]
        if self.config.augment:
            x = augment(x, self.generator)  # on the uint8 batch: a quarter of the bytes
        x = to_float(x)
        x, y, chosen = build_repair_batch(
            x,
            y,
            self.source,
            self.config.stamp_rate,
            self.generator,
            self.placement,
            trigger_generator=self.trigger_generator,
            patch_size=self.patch_size,
        )
        x = self.normalizer.inplace(x)  # x is this step's own batch
        if self.use_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, chosen


def repair(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    source: TriggerSource,
    config: RepairConfig,
    held_out: EvalSet,
    *,
    generator: torch.Generator,
    trigger_generator: torch.Generator | None = None,
    patch_size: int = 3,
    precision: str = "fp32",
    reporter: Reporter | None = None,
    on_epoch: Callable[[int, dict[str, float], torch.optim.Optimizer], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    step: RepairStep | None = None,
) -> tuple[dict[str, float], torch.optim.Optimizer]:
    """Fine-tune ``model`` in place; returns the last epoch's ``eval/...`` metrics and the
    optimiser. Logs ``repair/loss`` and ``repair/stamped`` per epoch and the evaluation keys
    ``eval/acc_clean``, ``eval/asr``, ``eval/ra`` with the epoch as the step. ``on_epoch`` is
    called after each epoch (checkpoints); ``start_epoch`` and ``optimizer_state`` resume.
    ``trigger_generator`` is the source's own stream (see the module's note on pairing).
    ``step``: how a batch updates the model (default ``PlainStep``: cross-entropy and SGD)."""
    # Checkpoints are the caller's (``on_epoch``), never the reporter's: the null one is safe.
    reporter = or_null(reporter)
    device = images_u8.device
    placement = Placement(config.placement)
    use_cl = config.channels_last and device.type != "mps"
    if use_cl:
        model.to(memory_format=torch.channels_last)
    step = step if step is not None else PlainStep(device, precision)
    optimizer = step.make_optimizer(model, config)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    run = _Repair(
        model=model,
        normalizer=normalizer,
        images_u8=images_u8,
        labels=labels.to(device),
        source=source,
        config=config,
        held_out=held_out,
        step=step,
        optimizer=optimizer,
        placement=placement,
        use_cl=use_cl,
        generator=generator,
        trigger_generator=trigger_generator,
        patch_size=patch_size,
        precision=precision,
        reporter=reporter,
    )
    last: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs):
        metrics, last = run.epoch(epoch)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, optimizer)
    return last, optimizer
