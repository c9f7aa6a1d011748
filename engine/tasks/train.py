"""Training: clean or poisoned (the attack). ``run(spec, reporter) -> TaskResult``.

The whole dataset sits on the device as uint8; each step gathers a batch by index, then
augments, poisons (stamp + relabel, independently per image with ``poison_rate``), normalises and
steps the optimiser, all as batched tensor operations. A checkpoint after every epoch holds the
model, optimiser, schedule and random state, so an interrupted run resumes where it was.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.ml import artifacts
from engine.ml.checkpoint import load_or_none, run_fingerprint, save_checkpoint
from engine.ml.data import Normalizer, augment, batch_indices, load_dataset, to_float
from engine.ml.metrics import evaluate, variation_asr
from engine.ml.models import build_model, count_parameters, stem_modules, whiten_first_conv_
from engine.ml.runtime import (
    autocast,
    configure_cpu,
    configure_device,
    environment,
    peak_memory_mb,
    pick_device,
    resolve_precision,
    seed_everything,
)
from engine.ml.triggers import PatchTrigger, Placement, parse_trigger, stamp
from engine.reporter import Reporter, TaskResult, stop_point
from engine.run_environment import compile_setting
from engine.specs import TrainSpec, check_crop_size, check_padding

CHECKPOINT = "checkpoints/train.safetensors"
WHITEN_IMAGES = 5000  # images whose patches set a whitened stem (airbench's count)


def lr_factor(
    schedule: str, step: int, total_steps: int, steps_per_epoch: int, milestones: list[int]
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    t = step / max(total_steps, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        return 0.1 ** sum(1 for m in milestones if epoch >= m)
    if schedule == "onecycle":
        # Linear warm-up from 0.1 over the first 20 % of steps, then linear decay to zero.
        warm = 0.2
        if t < warm:
            return 0.1 + 0.9 * t / warm
        return max(0.0, (1.0 - t) / (1.0 - warm))
    raise UserError(
        f"schedule '{schedule}' is unknown; use constant, cosine, multistep or onecycle"
    )


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, norm_weight_decay: float | None
) -> list[dict]:
    """The optimizer's parameter groups: one, or the matrices and filters apart from the
    one-dimensional parameters (normalisation scales and shifts, biases) when those take another
    weight decay (``norm_weight_decay``; None: the same)."""
    params = list(model.parameters())
    if norm_weight_decay is None or norm_weight_decay == weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": norm_weight_decay},
    ]


def poison_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: PatchTrigger,
    target: int,
    rate: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp each image independently with probability ``rate`` and relabel it to ``target``.

    Returns (images, labels, mask of poisoned images). One vectorised stamp for the whole batch.
    """
    n = x.shape[0]
    mask = (torch.rand(n, generator=generator) < rate).to(x.device)
    positions = trigger.placement.sample(
        n, (x.shape[2], x.shape[3]), trigger.size, generator, x.device
    )
    # Only the chosen images are stamped (about ``rate`` of the batch), in one operation.
    chosen = mask.nonzero().squeeze(1)
    x = x.clone()
    x[chosen] = stamp(x[chosen], trigger.pattern.to(x.device), positions[chosen])
    y = torch.where(mask, torch.full_like(y, target), y)
    return x, y, mask


def _save_checkpoint(
    path: Path, fingerprint: Any, model, optimizer, epoch: int, step: int, generator
) -> None:
    """The epoch's state as a safetensors checkpoint (engine.ml.checkpoint: atomic, no pickle)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    save_checkpoint(path, "train", state, fingerprint)


@dataclass
class Job:
    """What one training run holds between its stages."""

    spec: TrainSpec
    reporter: Reporter
    device: torch.device
    precision: str
    generator: torch.Generator
    data: Any
    trigger: PatchTrigger | None
    model: torch.nn.Module
    arch: str
    upstream: list[str]
    normalizer: Normalizer
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def workdir(self) -> Path:
        return Path(self.reporter.workdir)

    def eval_kwargs(self) -> dict[str, Any]:
        return dict(
            num_classes=self.data.num_classes,
            trigger=self.trigger,
            target=self.spec.target if self.trigger is not None else None,
            batch_size=self.spec.eval_batch_size,
            precision=self.precision,
            channels_last=self.spec.channels_last,
        )


@dataclass
class Schedule:
    """The optimiser and where the run stands in it."""

    optimizer: torch.optim.Optimizer
    step_model: Any
    compiled: bool
    steps_per_epoch: int
    total_steps: int
    drop_last: bool
    start_epoch: int = 0
    step: int = 0


def run(spec: TrainSpec, reporter: Reporter) -> TaskResult:
    started = time.perf_counter()
    job = prepare(spec, reporter)
    schedule = make_schedule(job)
    resume(job, schedule)
    env = environment(job.device)
    announce(job, schedule, env)
    train_time, images_seen = 0.0, 0
    for epoch in range(schedule.start_epoch, spec.epochs):
        seconds, seen = train_epoch(job, schedule, epoch)
        train_time += seconds
        images_seen += seen
    metrics = final_metrics(job, schedule.step)
    metrics["time/train_s"] = train_time
    metrics["time/total_s"] = time.perf_counter() - started
    if images_seen:
        metrics["perf/images_per_s"] = images_seen / max(train_time, 1e-9)
    metrics["memory/peak_mb"] = peak_memory_mb(job.device)
    reporter.log(metrics, schedule.step)
    save(job, metrics)
    return TaskResult(
        artifact=str(job.workdir),
        metrics=metrics,
        extra={
            "kind": "train",
            "dataset_sha256": job.data.sha256,
            "environment": env,
            "precision": job.precision,
            "compiled": schedule.compiled,
        },
    )


def prepare(spec: TrainSpec, reporter: Reporter) -> Job:
    """Device, seeds, data, trigger and model (the order of random draws is the run's)."""
    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    generator = seed_everything(spec.seed)
    data = load_dataset(spec.dataset)
    trigger = load_trigger(spec, data)
    model, arch, upstream = load_model(spec, data, device)
    train_x, train_y, test_x, test_y = place_data(spec, data, device)
    job = Job(
        spec, reporter, device, precision, generator, data, trigger, model, arch, upstream,
        Normalizer(data.mean, data.std, device), train_x, train_y, test_x, test_y,
    )  # fmt: skip
    whiten_stem(job)
    return job


def load_trigger(spec: TrainSpec, data) -> PatchTrigger | None:
    if spec.target >= data.num_classes:
        raise UserError(
            f"invalid --target {spec.target}: {spec.dataset} has {data.num_classes} classes; "
            f"use a class in 0..{data.num_classes - 1}"
        )
    trigger = None
    if spec.trigger:
        pattern = parse_trigger(spec.trigger, data.channels)
        if pattern.shape[-1] > min(data.image_size):
            raise UserError(
                f"invalid --trigger {spec.trigger}: bigger than the {data.image_size} images"
            )
        trigger = PatchTrigger(pattern, Placement(spec.placement))
    if spec.crop_epochs:
        check_crop_size(spec.crop_size, data.image_size, None if trigger is None else trigger.size)
    check_padding(spec, data.image_size)
    return trigger


def load_model(spec: TrainSpec, data, device) -> tuple[torch.nn.Module, str, list[str]]:
    """(model, arch, upstream): from scratch, or fine-tuned from a model artifact (whose
    architecture wins)."""
    upstream: list[str] = []
    if spec.init_from:
        model, init_meta, _ = artifacts.load_model(spec.init_from, "cpu")
        if init_meta.num_classes != data.num_classes or init_meta.in_channels != data.channels:
            raise UserError(
                f"--init-from {spec.init_from} has {init_meta.num_classes} classes x {init_meta.in_channels} "
                f"channels, {spec.dataset} has {data.num_classes} x {data.channels}; use a matching model"
            )
        arch = init_meta.arch
        upstream.append(spec.init_from)
    else:
        arch = spec.arch
        model = build_model(arch, data.num_classes, data.channels)
    model = model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, arch, upstream


def place_data(spec: TrainSpec, data, device) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) on the device, cut to the spec's image counts."""
    train_x, train_y = data.train_x, data.train_y
    if spec.max_train_images:
        train_x, train_y = train_x[: spec.max_train_images], train_y[: spec.max_train_images]
    test_x, test_y = data.test_x, data.test_y
    if spec.max_test_images:
        test_x, test_y = test_x[: spec.max_test_images], test_y[: spec.max_test_images]
    return train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device)


def whiten_stem(job: Job) -> None:
    spec = job.spec
    if spec.whiten_stem and spec.init_from:
        job.reporter.text("whiten_stem applies to training from scratch: the model keeps its stem")
    elif spec.whiten_stem:
        sample = torch.randperm(
            job.train_x.shape[0], generator=torch.Generator().manual_seed(spec.seed)
        )
        images = job.normalizer(to_float(job.train_x[sample[:WHITEN_IMAGES].to(job.device)]))
        whiten_first_conv_(job.model, images)
        for module in stem_modules(job.model):  # fixed: nothing back-propagates into the stem
            module.requires_grad_(False)


def make_schedule(job: Job) -> Schedule:
    spec = job.spec
    n = job.train_x.shape[0]
    drop_last = n > spec.batch_size
    steps_per_epoch = n // spec.batch_size if drop_last else math.ceil(n / spec.batch_size)
    # The training step's forward (and so its backward) through torch.compile when
    # MESA_TUI_COMPILE=1; evaluation and the saved weights use the model itself.
    compiled = compile_setting()
    optimizer = torch.optim.SGD(
        parameter_groups(job.model, spec.weight_decay, spec.norm_weight_decay),
        lr=spec.lr,
        momentum=spec.momentum,
        nesterov=spec.nesterov and spec.momentum > 0,
    )
    return Schedule(
        optimizer=optimizer,
        step_model=torch.compile(job.model) if compiled else job.model,
        compiled=compiled,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * spec.epochs,
        drop_last=drop_last,
    )


def checkpoint_fingerprint(job: Job) -> dict[str, Any]:
    """What a checkpoint must have been made with to continue this run."""
    return run_fingerprint(job.spec.model_dump(mode="json"), job.precision)


def resume(job: Job, schedule: Schedule) -> None:
    """Continue from the last epoch's checkpoint when the reporter resumes and one matches."""
    reporter = job.reporter
    path = job.workdir / CHECKPOINT
    fingerprint = checkpoint_fingerprint(job)
    state = load_or_none(path, "train", fingerprint, reporter) if reporter.resume else None
    if state is None:
        return
    job.model.load_state_dict(state["model"])
    schedule.optimizer.load_state_dict(state["optimizer"])
    job.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    schedule.start_epoch, schedule.step = int(state["epoch"]), int(state["step"])
    reporter.text(
        f"resumed from the checkpoint after epoch {schedule.start_epoch} (step {schedule.step})"
    )


def announce(job: Job, schedule: Schedule, env: dict[str, Any]) -> None:
    spec = job.spec
    params_m = count_parameters(job.model) / 1e6
    job.reporter.text(
        f"training {job.arch} ({params_m:.2f} M parameters) on {spec.dataset} "
        f"({job.train_x.shape[0]} images) for {spec.epochs} epochs on {env['device_name']}, "
        f"precision {job.precision}"
        + (", compiled" if schedule.compiled else "")
        + (
            f", trigger {spec.trigger} -> class {spec.target} at rate {spec.poison_rate}"
            if spec.poisoned
            else ", clean"
        )
    )
    if schedule.step == 0:  # a resumed attempt logs only steps after its checkpoint
        job.reporter.log({"info/params_m": params_m}, 0)


def train_epoch(job: Job, schedule: Schedule, epoch: int) -> tuple[float, int]:
    """One epoch, its metrics logged and its checkpoint written: (seconds, images seen)."""
    spec, reporter = job.spec, job.reporter
    job.model.train()
    # Crop epochs: random windows of crop_size, cut before the stamp so the trigger is inside.
    # The last epoch always sees whole images (and leaves their BatchNorm statistics).
    crop = spec.crop_size if epoch < min(spec.crop_epochs, spec.epochs - 1) else None
    epoch_start = time.perf_counter()
    loss_sum = torch.zeros((), device=job.device)
    correct = torch.zeros((), device=job.device)
    seen = 0
    n = job.train_x.shape[0]
    batches = batch_indices(n, spec.batch_size, job.generator, True, schedule.drop_last, job.device)
    for i, idx in enumerate(batches):
        x, y, logits, loss = train_step(job, schedule, idx, crop)
        seen += y.shape[0]
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        if i % 20 == 0 or i == schedule.steps_per_epoch - 1:
            loss_now = float(loss_sum / seen)
            elapsed = time.perf_counter() - epoch_start
            lr = schedule.optimizer.param_groups[0]["lr"]
            reporter.log({"train/loss": loss_now, "train/lr": lr}, schedule.step)
            reporter.progress(
                "train",
                epoch * schedule.steps_per_epoch + i + 1,
                schedule.total_steps,
                {
                    "epoch": epoch + 1,
                    "loss": loss_now,
                    "acc": float(correct / seen),
                    "img/s": seen / max(elapsed, 1e-9),
                },
            )
            reporter.check_in(120.0)
        stop_point(reporter)
    epoch_time = time.perf_counter() - epoch_start
    metrics = {
        "train/loss_epoch": float(loss_sum / max(seen, 1)),
        "train/acc": float(correct / max(seen, 1)),
        "train/epoch": epoch + 1,
        "time/epoch_s": epoch_time,
        "perf/images_per_s": seen / max(epoch_time, 1e-9),
    }
    # The last epoch is scored once, by the final evaluation (same step, same keys).
    if spec.eval_every and (epoch + 1) % spec.eval_every == 0 and epoch + 1 < spec.epochs:
        scores = evaluate(job.model, job.test_x, job.test_y, job.normalizer, **job.eval_kwargs())
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
    reporter.log(metrics, schedule.step)
    reporter.check_in(120.0)  # flushes the epoch's metrics before the checkpoint passes them
    _save_checkpoint(
        job.workdir / CHECKPOINT,
        checkpoint_fingerprint(job),
        job.model,
        schedule.optimizer,
        epoch + 1,
        schedule.step,
        job.generator,
    )
    return epoch_time, seen


def train_step(job: Job, schedule: Schedule, idx: torch.Tensor, crop: int | None):
    """One optimiser step on the batch ``idx``: (x, y, logits, loss)."""
    spec = job.spec
    for group in schedule.optimizer.param_groups:
        group["lr"] = spec.lr * lr_factor(
            spec.schedule, schedule.step, schedule.total_steps, schedule.steps_per_epoch,
            spec.milestones,
        )  # fmt: skip
    x, y = job.train_x[idx], job.train_y[idx]
    if spec.augment:
        x = augment(  # on the uint8 batch: a quarter of the bytes
            x, job.generator, padding=spec.crop_padding, size=crop, padding_mode=spec.padding_mode
        )
    elif crop is not None:
        x = augment(x, job.generator, padding=0, flip=False, size=crop)
    x = to_float(x)
    if job.trigger is not None and spec.poison_rate > 0:
        x, y, _ = poison_batch(x, y, job.trigger, spec.target, spec.poison_rate, job.generator)
    x = job.normalizer.inplace(x)  # x is this step's own batch
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(job.device, job.precision):
        logits = schedule.step_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
    schedule.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    schedule.optimizer.step()
    schedule.step += 1
    return x, y, logits, loss


def final_metrics(job: Job, step: int) -> dict[str, float]:
    """Final evaluation: per-class accuracy and the variations of the pattern."""
    spec = job.spec
    final = evaluate(
        job.model, job.test_x, job.test_y, job.normalizer, per_class=True, **job.eval_kwargs()
    )
    if job.trigger is not None:
        final.update(
            variation_asr(
                job.model, job.test_x, job.test_y, job.normalizer, job.trigger, spec.target,
                batch_size=spec.eval_batch_size, precision=job.precision,
                channels_last=spec.channels_last,
            )
        )  # fmt: skip
    return {f"eval/{k}": v for k, v in final.items()}


def save(job: Job, metrics: dict[str, float]) -> None:
    """The model artifact (weights, meta, spec, metrics, ground truth); checkpoints go."""
    spec, data = job.spec, job.data
    meta = artifacts.ModelMeta(
        arch=job.arch,
        num_classes=data.num_classes,
        in_channels=data.channels,
        image_size=data.image_size,
        mean=tuple(data.mean),
        std=tuple(data.std),
        dataset=spec.dataset,
        dataset_sha256=data.sha256,
        seed=spec.seed,
    )
    truth = None
    if job.trigger is not None and spec.poison_rate > 0:
        truth = artifacts.GroundTruth(
            spec.trigger or "", job.trigger.pattern, spec.target, spec.placement
        )
    model_cpu = job.model.to("cpu").to(memory_format=torch.contiguous_format)
    artifacts.save_model(
        job.workdir,
        model_cpu,
        meta,
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=job.upstream,
        metrics=metrics,
        ground_truth=truth,
    )
    shutil.rmtree(job.workdir / "checkpoints", ignore_errors=True)
    job.reporter.artifact(job.workdir, "model")
