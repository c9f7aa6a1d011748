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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.ml import artifacts
from engine.ml.checkpoint import load_or_none, save_checkpoint
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


def run(spec: TrainSpec, reporter: Reporter) -> TaskResult:
    started = time.perf_counter()
    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    generator = seed_everything(spec.seed)

    data = load_dataset(spec.dataset)
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

    # Model: from scratch, or fine-tuned from a model artifact (whose architecture wins).
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

    train_x, train_y = data.train_x, data.train_y
    if spec.max_train_images:
        train_x, train_y = train_x[: spec.max_train_images], train_y[: spec.max_train_images]
    test_x, test_y = data.test_x, data.test_y
    if spec.max_test_images:
        test_x, test_y = test_x[: spec.max_test_images], test_y[: spec.max_test_images]
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    normalizer = Normalizer(data.mean, data.std, device)
    if spec.whiten_stem and spec.init_from:
        reporter.text("whiten_stem applies to training from scratch: the model keeps its stem")
    elif spec.whiten_stem:
        sample = torch.randperm(
            train_x.shape[0], generator=torch.Generator().manual_seed(spec.seed)
        )
        images = normalizer(to_float(train_x[sample[:WHITEN_IMAGES].to(device)]))
        whiten_first_conv_(model, images)
        for module in stem_modules(model):  # fixed: nothing back-propagates into the stem
            module.requires_grad_(False)

    n = train_x.shape[0]
    drop_last = n > spec.batch_size
    steps_per_epoch = n // spec.batch_size if drop_last else math.ceil(n / spec.batch_size)
    total_steps = steps_per_epoch * spec.epochs

    # The training step's forward (and so its backward) through torch.compile when
    # MESA_TUI_COMPILE=1; evaluation and the saved weights use the model itself.
    compiled = compile_setting()
    step_model = torch.compile(model) if compiled else model

    optimizer = torch.optim.SGD(
        parameter_groups(model, spec.weight_decay, spec.norm_weight_decay),
        lr=spec.lr,
        momentum=spec.momentum,
        nesterov=spec.nesterov and spec.momentum > 0,
    )
    workdir = Path(reporter.workdir)
    ckpt_path = workdir / CHECKPOINT
    start_epoch, step = 0, 0
    fingerprint = spec.model_dump(mode="json")
    state = load_or_none(ckpt_path, "train", fingerprint, reporter) if reporter.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        reporter.text(f"resumed from the checkpoint after epoch {start_epoch} (step {step})")

    env = environment(device)
    reporter.text(
        f"training {arch} ({count_parameters(model) / 1e6:.2f} M parameters) on {spec.dataset} "
        f"({n} images) for {spec.epochs} epochs on {env['device_name']}, precision {precision}"
        + (", compiled" if compiled else "")
        + (
            f", trigger {spec.trigger} -> class {spec.target} at rate {spec.poison_rate}"
            if spec.poisoned
            else ", clean"
        )
    )
    if step == 0:  # a resumed attempt logs only steps after its checkpoint
        reporter.log({"info/params_m": count_parameters(model) / 1e6}, 0)

    eval_kwargs = dict(
        num_classes=data.num_classes,
        trigger=trigger,
        target=spec.target if trigger is not None else None,
        batch_size=spec.eval_batch_size,
        precision=precision,
        channels_last=spec.channels_last,
    )
    last_eval: dict[str, float] = {}
    train_time = 0.0
    images_seen = 0
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        # Crop epochs: random windows of crop_size, cut before the stamp so the trigger is inside.
        # The last epoch always sees whole images (and leaves their BatchNorm statistics).
        crop = spec.crop_size if epoch < min(spec.crop_epochs, spec.epochs - 1) else None
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for i, idx in enumerate(
            batch_indices(n, spec.batch_size, generator, True, drop_last, device)
        ):
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * lr_factor(
                    spec.schedule, step, total_steps, steps_per_epoch, spec.milestones
                )
            x = train_x[idx]
            y = train_y[idx]
            if spec.augment:
                x = augment(  # on the uint8 batch: a quarter of the bytes
                    x,
                    generator,
                    padding=spec.crop_padding,
                    size=crop,
                    padding_mode=spec.padding_mode,
                )
            elif crop is not None:
                x = augment(x, generator, padding=0, flip=False, size=crop)
            x = to_float(x)
            if trigger is not None and spec.poison_rate > 0:
                x, y, _ = poison_batch(x, y, trigger, spec.target, spec.poison_rate, generator)
            x = normalizer.inplace(x)  # x is this step's own batch
            if spec.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += y.shape[0]
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            if i % 20 == 0 or i == steps_per_epoch - 1:
                elapsed = time.perf_counter() - epoch_start
                loss_now = float(loss_sum / seen)
                reporter.log(
                    {"train/loss": loss_now, "train/lr": optimizer.param_groups[0]["lr"]}, step
                )
                reporter.progress(
                    "train",
                    epoch * steps_per_epoch + i + 1,
                    total_steps,
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
        train_time += epoch_time
        images_seen += seen
        metrics = {
            "train/loss_epoch": float(loss_sum / max(seen, 1)),
            "train/acc": float(correct / max(seen, 1)),
            "train/epoch": epoch + 1,
            "time/epoch_s": epoch_time,
            "perf/images_per_s": seen / max(epoch_time, 1e-9),
        }
        # The last epoch is scored once, by the final evaluation below (same step, same keys).
        if spec.eval_every and (epoch + 1) % spec.eval_every == 0 and epoch + 1 < spec.epochs:
            last_eval = evaluate(model, test_x, test_y, normalizer, **eval_kwargs)
            metrics.update({f"eval/{k}": v for k, v in last_eval.items()})
        reporter.log(metrics, step)
        reporter.check_in(120.0)  # flushes the epoch's metrics before the checkpoint passes them
        _save_checkpoint(ckpt_path, fingerprint, model, optimizer, epoch + 1, step, generator)

    # Final evaluation: per-class accuracy and the variations of the pattern.
    final = evaluate(model, test_x, test_y, normalizer, per_class=True, **eval_kwargs)
    if trigger is not None:
        final.update(
            variation_asr(
                model,
                test_x,
                test_y,
                normalizer,
                trigger,
                spec.target,
                batch_size=spec.eval_batch_size,
                precision=precision,
                channels_last=spec.channels_last,
            )
        )
    result_metrics = {f"eval/{k}": v for k, v in final.items()}
    result_metrics["time/train_s"] = train_time
    result_metrics["time/total_s"] = time.perf_counter() - started
    if images_seen:
        result_metrics["perf/images_per_s"] = images_seen / max(train_time, 1e-9)
    result_metrics["memory/peak_mb"] = peak_memory_mb(device)
    reporter.log(result_metrics, step)

    meta = artifacts.ModelMeta(
        arch=arch,
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
    if trigger is not None and spec.poison_rate > 0:
        truth = artifacts.GroundTruth(
            spec.trigger or "", trigger.pattern, spec.target, spec.placement
        )
    model_cpu = model.to("cpu").to(memory_format=torch.contiguous_format)
    artifacts.save_model(
        workdir,
        model_cpu,
        meta,
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=upstream,
        metrics=result_metrics,
        ground_truth=truth,
    )
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    reporter.artifact(workdir, "model")
    return TaskResult(
        artifact=str(workdir),
        metrics=result_metrics,
        extra={
            "kind": "train",
            "dataset_sha256": data.sha256,
            "environment": env,
            "precision": precision,
            "compiled": compiled,
        },
    )
