"""``mesa-tui run train``: the attack (or clean training) in the foreground."""

from __future__ import annotations

from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors
from mesa_tui.commands.run import app


def _trigger_value(trigger: str | None) -> str | None:
    return (
        None if trigger is None else ("none" if trigger.lower() in ("none", "clean") else trigger)
    )


@app.command("train")
@cli_errors
def train(
    preset: str | None = typer.Option(
        None, help="cpu-quick, paper-cifar10, backdoorbench-cifar10, clean-cifar10"
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with spec values (flags override it)"
    ),
    dataset: str | None = typer.Option(
        None, help="cifar10, cifar100, mnist, fashion-mnist, imagefolder:PATH, or an imported name"
    ),
    arch: str | None = typer.Option(
        None, help="resnet18, preact-resnet18, vgg11-bn, small, small-wide"
    ),
    init_from: str | None = typer.Option(
        None, "--init-from", help="model artifact to fine-tune from"
    ),
    trigger: str | None = typer.Option(
        None, help="bw:ID, color:SEED, square:white, file:PATH, or none"
    ),
    target: int | None = typer.Option(None, help="target class of the backdoor"),
    poison_rate: float | None = typer.Option(
        None, "--poison-rate", help="probability that an image is poisoned"
    ),
    placement: str | None = typer.Option(
        None, help="per-image, per-batch, corner or at:ROW,COL (a fixed top-left offset)"
    ),
    epochs: int | None = typer.Option(None),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None),
    momentum: float | None = typer.Option(None),
    weight_decay: float | None = typer.Option(None, "--weight-decay"),
    norm_weight_decay: float | None = typer.Option(
        None, "--norm-weight-decay", help="weight decay of BatchNorm scales, shifts and biases"
    ),
    schedule: str | None = typer.Option(None, help="constant, cosine, multistep or onecycle"),
    milestones: str | None = typer.Option(None, help="multistep epochs, comma separated"),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing"),
    augment: bool | None = typer.Option(None, "--augment/--no-augment"),
    crop_padding: int | None = typer.Option(
        None, "--crop-padding", help="pixels padded on each side before the random crop"
    ),
    padding_mode: str | None = typer.Option(
        None, "--padding-mode", help="zeros or reflect (the image mirrored at its border)"
    ),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="evaluate every N epochs; 0: after the last only"
    ),
    crop_epochs: int | None = typer.Option(
        None, "--crop-epochs", help="first N epochs on random crop-size windows (cheaper steps)"
    ),
    crop_size: int | None = typer.Option(None, "--crop-size", help="side of those windows"),
    whiten_stem: bool | None = typer.Option(
        None,
        "--whiten-stem/--no-whiten-stem",
        help="from scratch: first convolution fixed to the whitening of image patches",
    ),
    seed: int | None = typer.Option(None),
    precision: str | None = typer.Option(None, help="auto, fp32 or bf16"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N"),
    channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last"),
    max_train_images: int | None = typer.Option(
        None, "--max-train-images", help="use only the first N training images"
    ),
    max_test_images: int | None = typer.Option(
        None, "--max-test-images", help="use only the first N test images"
    ),
    json_output: bool = typer.Option(
        False, "--json", help="print one JSON object instead of tables"
    ),
) -> None:
    """Train a model, poisoned with a patch trigger (the attack) or clean."""
    from engine.specs import build_spec, check_against_dataset
    from mesa_tui.foreground import run_foreground

    overrides = dict(
        dataset=dataset,
        arch=arch,
        init_from=init_from,
        trigger=_trigger_value(trigger),
        target=target,
        poison_rate=poison_rate,
        placement=placement,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        norm_weight_decay=norm_weight_decay,
        schedule=schedule,
        label_smoothing=label_smoothing,
        augment=augment,
        crop_padding=crop_padding,
        padding_mode=padding_mode,
        eval_every=eval_every,
        crop_epochs=crop_epochs,
        crop_size=crop_size,
        whiten_stem=whiten_stem,
        seed=seed,
        precision=precision,
        device=device,
        channels_last=channels_last,
        max_train_images=max_train_images,
        max_test_images=max_test_images,
        milestones=[int(m) for m in milestones.split(",") if m.strip()] if milestones else None,
    )
    spec = build_spec("train", preset=preset, file=config, overrides=overrides)
    check_against_dataset(spec)
    run_foreground("train", spec, json_output)
