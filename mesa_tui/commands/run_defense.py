"""``mesa-tui run mesa|detect|defend``: the MESA search, target-class detection and the defenses.

Each command validates its spec and its model artifact before anything is written, then runs the
task in the foreground (progress bar, results table or ``--json``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from mesa_tui.commands.common import cli_errors
from mesa_tui.commands.run import app

# ---------------------------------------------------------------------------------------------
# run mesa


@app.command("mesa")
@cli_errors
def mesa(
    model: str | None = typer.Option(None, "--model", help="model artifact directory"),
    target: int | None = typer.Option(None, help="class whose triggers are searched"),
    betas: str | None = typer.Option(None, help="thresholds, comma separated (0.9,0.8,0.5)"),
    preset: str | None = typer.Option(None, help="cpu-quick or paper"),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with spec values (flags override it)"
    ),
    alpha: float | None = typer.Option(None, help="weight of the entropy (MINE) term"),
    steps: int | None = typer.Option(None, help="generator steps (default 620)"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    hidden: int | None = typer.Option(None, help="hidden width of the generator and T"),
    lr_g: float | None = typer.Option(None, "--lr-g"),
    lr_t: float | None = typer.Option(None, "--lr-t"),
    noise: str | None = typer.Option(None, help="uniform or gaussian"),
    score: str | None = typer.Option(None, help="prob (softmax probability) or ce"),
    jitter: float | None = typer.Option(None, help="std of the stamping noise"),
    jitter_clamp: bool | None = typer.Option(None, "--jitter-clamp/--no-jitter-clamp"),
    placement: str | None = typer.Option(
        None, help="learned (default: positions searched too), per-image or per-batch"
    ),
    stats_every: int | None = typer.Option(None, "--stats-every"),
    sample_every: int | None = typer.Option(None, "--sample-every"),
    n_eval_triggers: int | None = typer.Option(None, "--n-eval-triggers"),
    eval_images: int | None = typer.Option(None, "--eval-images"),
    samples: int | None = typer.Option(None, help="triggers stored per beta"),
    defender_fraction: float | None = typer.Option(None, "--defender-fraction"),
    split_seed: int | None = typer.Option(None, "--split-seed"),
    seed: int | None = typer.Option(None),
    precision: str | None = typer.Option(None, help="auto, fp32 or bf16"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Recover the distribution of triggers of a backdoored model (one generator per beta)."""
    from engine.specs import build_spec
    from engine.tasks.mesa import check_spec
    from mesa_tui.foreground import run_foreground

    overrides = dict(
        model=model,
        target=target,
        betas=betas,
        alpha=alpha,
        steps=steps,
        batch_size=batch_size,
        hidden=hidden,
        lr_g=lr_g,
        lr_t=lr_t,
        noise=noise,
        score=score,
        jitter=jitter,
        jitter_clamp=jitter_clamp,
        placement=placement,
        stats_every=stats_every,
        sample_every=sample_every,
        n_eval_triggers=n_eval_triggers,
        eval_images=eval_images,
        samples=samples,
        defender_fraction=defender_fraction,
        split_seed=split_seed,
        seed=seed,
        precision=precision,
        device=device,
    )
    spec = _require_model(
        lambda: build_spec("mesa", preset=preset, file=config, overrides=overrides)
    )
    check_spec(spec)
    run_foreground("mesa", spec, json_output)


# ---------------------------------------------------------------------------------------------
# run detect


@app.command("detect")
@cli_errors
def detect(
    model: str | None = typer.Option(None, "--model", help="model artifact directory"),
    classes: str | None = typer.Option(None, help="classes to test, comma separated (default all)"),
    preset: str | None = typer.Option(None, help="cpu-quick"),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with spec values (flags override it)"
    ),
    steps: int | None = typer.Option(None, help="search steps per class (default 200)"),
    beta: float | None = typer.Option(None, help="validity threshold (default 0.9)"),
    alpha: float | None = typer.Option(None),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    hidden: int | None = typer.Option(None),
    lr_g: float | None = typer.Option(None, "--lr-g"),
    lr_t: float | None = typer.Option(None, "--lr-t"),
    n_eval_triggers: int | None = typer.Option(None, "--n-eval-triggers"),
    eval_images: int | None = typer.Option(None, "--eval-images"),
    classes_per_pass: int | None = typer.Option(None, "--classes-per-pass"),
    z_threshold: float | None = typer.Option(None, "--z-threshold"),
    min_score: float | None = typer.Option(None, "--min-score"),
    mad_floor: float | None = typer.Option(None, "--mad-floor"),
    placement: str | None = typer.Option(
        None, help="learned (default: finds fixed-position triggers too), per-image or per-batch"
    ),
    seed: int | None = typer.Option(None),
    precision: str | None = typer.Option(None, help="auto, fp32 or bf16"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Find the attacked class: a short search per class, flag classes full of valid triggers."""
    from engine.specs import build_spec
    from engine.tasks.detect import check_spec
    from mesa_tui.foreground import run_foreground

    overrides = dict(
        model=model,
        classes=classes,
        steps=steps,
        beta=beta,
        alpha=alpha,
        batch_size=batch_size,
        hidden=hidden,
        lr_g=lr_g,
        lr_t=lr_t,
        n_eval_triggers=n_eval_triggers,
        eval_images=eval_images,
        classes_per_pass=classes_per_pass,
        z_threshold=z_threshold,
        min_score=min_score,
        mad_floor=mad_floor,
        placement=placement,
        seed=seed,
        precision=precision,
        device=device,
    )
    spec = _require_model(
        lambda: build_spec("detect", preset=preset, file=config, overrides=overrides)
    )
    check_spec(spec)
    run_foreground("detect", spec, json_output)


def _require_model(build):
    """Build a spec; a missing --model reads as one line naming the flag."""
    from engine.errors import UserError

    try:
        return build()
    except UserError as exc:
        if "model" in str(exc) and "Field required" in str(exc):
            raise UserError("--model is required; give a model artifact directory") from None
        raise


# ---------------------------------------------------------------------------------------------
# run defend


# The settings `run defend` takes without an option of its own (``--name value``, checked by the
# spec like every other): the post-training defenses' own. A test keeps this list and the spec's
# fields together.
DEFEND_EPILOG = (
    "Every other setting of the defend spec is accepted as --name value (--no-name for a false "
    "switch), among them each post-training defense's own (papers' defaults): anp: "
    "--anp-iterations, --anp-batch-size, --anp-lr, --anp-eps, --anp-steps, --anp-alpha, "
    "--anp-threshold, --anp-prune-count; i-bau: --ibau-rounds, --ibau-k, --ibau-lr, "
    "--ibau-portion; clp: --clp-u, --clp-pairing; ft-sam: --sam-epochs, --sam-lr, "
    "--sam-weight-decay, --sam-rho, --sam-adaptive/--no-sam-adaptive, --sam-label-smoothing; and "
    "--weight-decay, --placement, --patch-size, --nc-lr, --nc-init-cost, --nc-patience, "
    "--nc-threshold, --nc-early-stop, --reversal-from, --residual-beta, --residual-batch-size, "
    "--residual-hidden, --point-epochs, --point-batch-size, --point-lr, --channels-last, "
    "--eval-batch-size."
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("defend", context_settings=EXTRA, epilog=DEFEND_EPILOG)
@cli_errors
def defend(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="backdoored model artifact directory"),
    method: str | None = typer.Option(
        None,
        help="mesa, ideal, point, neural-cleanse, finetune, random-patch, anp, i-bau, clp or "
        "ft-sam (default mesa)",
    ),
    search: str | None = typer.Option(None, help="search artifact directory (--method mesa)"),
    beta: float | None = typer.Option(None, help="repair with this beta's generator only"),
    ensemble: str | None = typer.Option(
        None, help="round-robin (default), equal or staircase (experimental)"
    ),
    stamp_rate: float | None = typer.Option(
        None, "--stamp-rate", help="probability that an image is stamped (default 0.01)"
    ),
    target: int | None = typer.Option(
        None, help="believed target class (point, neural-cleanse; default: detect it)"
    ),
    preset: str | None = typer.Option(None, help="cpu-quick or paper"),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with spec values (flags override it)"
    ),
    epochs: int | None = typer.Option(None, help="repair epochs (default 10)"),
    lr: float | None = typer.Option(None, help="SGD learning rate (default 1e-3)"),
    momentum: float | None = typer.Option(None),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    augment: bool | None = typer.Option(None, "--augment/--no-augment"),
    point_restarts: int | None = typer.Option(None, "--point-restarts"),
    point_index: int | None = typer.Option(
        None, "--point-index", help="repair with one restart (default: all, in turn)"
    ),
    nc_epochs: int | None = typer.Option(
        None, "--nc-epochs", help="Neural Cleanse outer steps (default 1000)"
    ),
    nc_steps_per_epoch: int | None = typer.Option(None, "--nc-steps-per-epoch"),
    nc_batch_size: int | None = typer.Option(None, "--nc-batch-size"),
    residual_steps: int | None = typer.Option(
        None, "--residual-steps", help="steps of the residual MESA search (0 skips it)"
    ),
    variations: bool | None = typer.Option(None, "--variations/--no-variations"),
    defender_fraction: float | None = typer.Option(None, "--defender-fraction"),
    split_seed: int | None = typer.Option(None, "--split-seed"),
    seed: int | None = typer.Option(None),
    precision: str | None = typer.Option(None, help="auto, fp32 or bf16"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Repair a backdoored model: fine-tune with stamped triggers that keep their true labels,
    or run one of the post-training defenses (anp, i-bau, clp, ft-sam)."""
    from engine.specs import build_spec
    from engine.tasks.defend import check_spec
    from mesa_tui.commands.submit import parse_extra
    from mesa_tui.foreground import run_foreground

    extra = parse_extra(list(ctx.args))
    overrides = dict(
        model=model,
        method=method,
        search=search,
        beta=beta,
        ensemble=ensemble,
        stamp_rate=stamp_rate,
        target=target,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        batch_size=batch_size,
        augment=augment,
        point_restarts=point_restarts,
        point_index=point_index,
        nc_epochs=nc_epochs,
        nc_steps_per_epoch=nc_steps_per_epoch,
        nc_batch_size=nc_batch_size,
        residual_steps=residual_steps,
        variations=variations,
        defender_fraction=defender_fraction,
        split_seed=split_seed,
        seed=seed,
        precision=precision,
        device=device,
    )
    overrides.update(extra)
    spec = _require_model(
        lambda: build_spec("defend", preset=preset, file=config, overrides=overrides)
    )
    check_spec(spec)
    run_foreground("defend", spec, json_output)
