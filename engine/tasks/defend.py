"""Defense task: ``run(spec: DefendSpec, reporter) -> TaskResult``.

Every method goes through the one repair loop of ``engine.ml.repair``; only the trigger source
differs: ``mesa`` (the search artifact's generators, one beta or an ensemble), ``point`` (restarts
of the pixel-space SGD reversal), ``neural-cleanse`` (its reversed mask and pattern), ``finetune``
(no trigger), ``random-patch`` (uniform random patches) and ``ideal`` (the original trigger).

The post-training defenses of the last years end in the same evaluation, artifact, outcomes and
metrics: ``ft-sam`` (``engine.ml.ftsam``) and ``i-bau`` (``engine.ml.ibau``) are the repair loop
with their own step (no trigger source, the repair's batches, their own epochs and optimiser);
``anp`` (``engine.ml.anp``: masks learnt on the defender split, then pruning) and ``clp``
(``engine.ml.clp``: data-free pruning) change the model without repair epochs, and their
evaluation after pruning is logged at step 1. Each draws its own randomness from
``engine.ml.repair.method_stream``, never from the repair's generator.

``ideal`` is the oracle bound: it is the only method that reads the ground truth for the repair
itself. Every other method sees only the defender split and the defender's belief of the target
(``--target``, the search's target, or Neural Cleanse's detection); the ground truth serves the
evaluation on the held-out split alone, and its metrics are absent when it is missing.

Resume (``reporter.resume``): a finished reversal (point restarts, Neural Cleanse's mask and
pattern, its detection) is saved in ``checkpoints/reversal.safetensors`` and a resumed attempt
skips it; the repair saves the model, optimiser, trigger source, the repair step's own state
(I-BAU's stream) and random state after every epoch in ``checkpoints/repair.safetensors`` and
continues after the saved epoch (FT-SAM's learning rate follows from the epoch; I-BAU finds the
next round's perturbation anew); ANP saves its masks, their optimiser, its stream and the
iteration in ``checkpoints/anp.safetensors`` (every minute at most, at a logged iteration, and
when done) and continues after that iteration, then prunes again from the saved masks; CLP takes
seconds and simply runs again. The residual search checkpoints like a MESA search. A resumed
attempt logs only steps after its checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.reporter import Reporter, TaskResult
from engine.specs import PRUNING_METHODS, DefendSpec

CHECKPOINT = "checkpoints/repair.safetensors"
REVERSAL = "checkpoints/reversal.safetensors"
RESIDUAL = "checkpoints/residual.safetensors"
ANP_CHECKPOINT = "checkpoints/anp.safetensors"
ANP_CHECKPOINT_EVERY_STEPS: int | None = None  # None: by time (tests set a step count)
OUTCOMES_FILE = "outcomes.json"  # per held-out image, before and after: {"clean", "asr"} as 0/1
DEFENSE_FILE = "defense.json"  # the defender's side of the result: target belief, detection
RESIDUAL_SEED_OFFSET = 7_777  # the residual search never shares a stream with the repair's


def check_spec(spec: DefendSpec) -> dict[str, Any]:
    """Everything that can be refused before anything is written; returns the model's meta."""
    from engine.tasks.mesa import read_model_meta

    meta = read_model_meta(spec.model)
    classes = int(meta["num_classes"])
    if spec.target is not None and spec.target >= classes:
        raise UserError(
            f"invalid --target {spec.target}: the model has {classes} classes; "
            f"use a class in 0..{classes - 1}"
        )
    if spec.method == "mesa":
        if not spec.search:
            raise UserError(
                "--method mesa needs --search SEARCH_ARTIFACT (make one with mesa-tui run mesa)"
            )
        search_meta = _search_meta(spec.search)
        betas = [float(b) for b in search_meta.get("betas", [])]
        if spec.beta is not None and spec.ensemble is not None:
            raise UserError("give either --beta or --ensemble, not both")
        if spec.beta is not None and not any(math.isclose(spec.beta, b) for b in betas):
            raise UserError(
                f"invalid --beta {spec.beta}: the search has betas "
                f"{', '.join(f'{b:g}' for b in betas)}; use one of those"
            )
        search_target = int(search_meta["target"])
        if spec.target is not None and spec.target != search_target:
            raise UserError(
                f"invalid --target {spec.target}: the search {spec.search} was made for class "
                f"{search_target}; leave --target out or use {search_target}"
            )
        if search_target >= classes:
            raise UserError(
                f"the search {spec.search} targets class {search_target} but the model has "
                f"{classes} classes; give the search made for this model"
            )
    else:
        for flag, value in (("--search", spec.search), ("--beta", spec.beta)):
            if value is not None:
                raise UserError(f"{flag} is only used by --method mesa; leave it out")
        if spec.ensemble is not None:
            raise UserError("--ensemble is only used by --method mesa; leave it out")
    if spec.method == "ideal" and not (Path(spec.model) / "ground_truth.json").exists():
        raise UserError(
            f"--method ideal needs the original trigger, but {spec.model} has no "
            "ground_truth.json (the attack is unknown); use another method"
        )
    if spec.reversal_from is not None:
        _check_reversal(spec)
    if spec.point_index is not None and spec.point_index >= spec.point_restarts:
        raise UserError(
            f"invalid --point-index {spec.point_index}: there are {spec.point_restarts} restarts; "
            f"use 0..{spec.point_restarts - 1} or leave it out to cycle through all"
        )
    size = tuple(meta.get("image_size", (32, 32)))
    if spec.patch_size > min(size):
        raise UserError(
            f"invalid --patch-size {spec.patch_size}: the images are {size[0]}x{size[1]}"
        )
    return meta


def _check_reversal(spec: DefendSpec) -> dict[str, Any]:
    """The earlier defense whose reversed trigger is reused: same method, same model."""
    from engine.ml.artifacts import read_manifest

    if spec.method not in ("point", "neural-cleanse"):
        raise UserError("--reversal-from is only used by --method point or neural-cleanse")
    path = Path(spec.reversal_from).expanduser()
    if not (path / DEFENSE_FILE).exists():
        raise UserError(
            f"--reversal-from {spec.reversal_from} is not a defense artifact (no {DEFENSE_FILE}); "
            "give the directory of an earlier point or neural-cleanse defense"
        )
    manifest = read_manifest(path, verify=False, kind="repaired-model")
    earlier = json.loads((path / DEFENSE_FILE).read_text())
    if earlier.get("method") != spec.method:
        raise UserError(
            f"--reversal-from {spec.reversal_from} is a {earlier.get('method')} defense; "
            f"give an earlier {spec.method} defense"
        )
    upstream = [u["path"] for u in manifest.get("upstream", [])]
    if not upstream or upstream[0] != str(Path(spec.model).resolve()):
        raise UserError(
            f"--reversal-from {spec.reversal_from} repaired another model; give a defense of "
            f"{spec.model}"
        )
    if spec.target is not None and earlier.get("target") != spec.target:
        raise UserError(
            f"invalid --target {spec.target}: the reused reversal targets class "
            f"{earlier.get('target')}; leave --target out or use that class"
        )
    return earlier


def _search_meta(directory: str) -> dict[str, Any]:
    from engine.ml.artifacts import read_manifest

    path = Path(directory).expanduser()
    if path.is_file():
        raise UserError(
            f"'{directory}' is a file, not a search directory; give the directory `mesa-tui run "
            "mesa` made (its manifest.json names the kind)"
        )
    if not path.is_dir():
        raise UserError(
            f"search artifact '{directory}' does not exist; give a search directory "
            "(see mesa-tui run mesa)"
        )
    manifest = read_manifest(path, verify=False)
    if manifest.get("kind") != "search":
        raise UserError(f"'{directory}' is a {manifest.get('kind')} artifact; give a search")
    return manifest["meta"]


def _cleanse(spec: DefendSpec, model, normalizer, images, labels_to_run, device, precision, rep):
    from engine.ml.reverse import CostSchedule, neural_cleanse

    schedule = CostSchedule(
        init_cost=spec.nc_init_cost,
        patience=spec.nc_patience,
        threshold=spec.nc_threshold,
        early_stop=spec.nc_early_stop,
        early_stop_patience=5 * spec.nc_patience,
    )
    return neural_cleanse(
        model,
        normalizer,
        images,
        labels_to_run,
        epochs=spec.nc_epochs,
        steps_per_epoch=spec.nc_steps_per_epoch,
        batch_size=spec.nc_batch_size,
        lr=spec.nc_lr,
        schedule=schedule,
        seed=spec.seed,
        precision=precision,
        channels_last=spec.channels_last and device.type != "mps",
        reporter=rep,
    )


def _detect_target(spec, model, normalizer, images, num_classes, device, precision, reporter):
    """Neural Cleanse over every label: the defender's belief when none was given."""
    reporter.text(f"no --target given: Neural Cleanse detection over all {num_classes} labels")
    result = _cleanse(
        spec, model, normalizer, images, range(num_classes), device, precision, reporter
    )
    target = result.most_suspicious()
    det = result.detection
    if det is not None and not det.flagged:
        reporter.text(
            f"Neural Cleanse flagged no label; using the smallest mask's label {target}", "warning"
        )
    return target, result


def _detection_fields(result) -> dict[str, Any]:
    det = result.detection
    if det is None:
        return {}
    return {
        "flagged": det.flagged,
        "scores": {str(k): v for k, v in zip(det.labels, det.anomaly_index, strict=True)},
        "mask_l1": {str(k): v for k, v in zip(det.labels, det.norms, strict=True)},
    }


def run(spec: DefendSpec, reporter: Reporter) -> TaskResult:
    import torch

    from engine.ml import artifacts
    from engine.ml import checkpoint as ckpt
    from engine.ml.data import defender_split
    from engine.ml.mesa import SearchCheckpoint
    from engine.ml.metrics import variation_asr
    from engine.ml.repair import (
        EvalSet,
        FixedPatternSampler,
        RandomPatchSampler,
        RepairConfig,
        evaluate_repair,
        load_source_state,
        load_step_state,
        method_stream,
        repair,
        source_state,
        step_state,
        trigger_stream,
    )
    from engine.ml.runtime import (
        configure_cpu,
        configure_device,
        environment,
        pick_device,
        resolve_precision,
        seed_everything,
    )
    from engine.ml.triggers import PatchTrigger, Placement
    from engine.tasks import mesa as mesa_task
    from engine.tasks.mesa import load_defender_data

    started = time.perf_counter()
    check_spec(spec)
    config = RepairConfig(
        epochs=spec.epochs,
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        batch_size=spec.batch_size,
        stamp_rate=spec.stamp_rate,
        placement=spec.placement,
        augment=spec.augment,
        channels_last=spec.channels_last,
        eval_batch_size=spec.eval_batch_size,
    )
    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    generator = seed_everything(spec.seed)
    trigger_generator = trigger_stream(spec.seed, generator.device)
    model, meta, normalizer, images, labels, data = load_defender_data(
        spec.model, device, spec.defender_fraction, spec.split_seed
    )
    use_cl = spec.channels_last and device.type != "mps"
    _, held = defender_split(data.test_x.shape[0], spec.defender_fraction, spec.split_seed)
    # Evaluation only: the held-out images and the original trigger never reach a defense.
    truth = artifacts.load_ground_truth(spec.model)
    held_out = EvalSet(
        images=data.test_x[held].to(device),
        labels=data.test_y[held].to(device),
        num_classes=meta.num_classes,
        trigger=PatchTrigger(truth.pattern, Placement(truth.placement)) if truth else None,
        target=truth.target if truth else None,
    )
    if truth is None:
        reporter.text("no ground truth in the model artifact: ASR and robust accuracy are absent")
    # Checkpoints of an earlier attempt (read now, applied below; unusable ones are reported).
    workdir = Path(reporter.workdir)
    fingerprint = spec.spec_hash()
    reversal_state = repair_state = anp_state = None
    if reporter.resume:
        reversal_state = ckpt.load_or_none(
            workdir / REVERSAL, "defend-reversal", fingerprint, reporter
        )
        repair_state = ckpt.load_or_none(
            workdir / CHECKPOINT, "defend-repair", fingerprint, reporter
        )
        if spec.method == "anp":
            anp_state = ckpt.load_or_none(
                workdir / ANP_CHECKPOINT, "defend-anp", fingerprint, reporter
            )
    before = evaluate_repair(
        model,
        normalizer,
        held_out,
        precision=precision,
        channels_last=use_cl,
        batch_size=spec.eval_batch_size,
    )
    outcomes_before = held_out_outcomes(model, normalizer, held_out, precision, use_cl, spec)
    result_metrics: dict[str, float] = {f"before/{k}": v for k, v in before.items()}
    resumed = any(state is not None for state in (reversal_state, repair_state, anp_state))
    if not resumed:  # a resumed attempt logged them already
        reporter.log({f"eval/{k}": v for k, v in before.items()}, 0)
        reporter.log(result_metrics, 0)

    # -- the trigger source (the only thing that differs between methods) ---------------------
    extra: dict[str, Any] = {"method": spec.method, "stamp_rate": spec.stamp_rate}
    extra_files: dict[str, torch.Tensor] = {}
    upstream: list[str] = [spec.model]
    target: int | None = spec.target
    reverse_started = time.perf_counter()
    source: Any = None
    reversed_before = reversal_state is not None and spec.method in ("point", "neural-cleanse")
    if reversed_before:
        assert reversal_state is not None
        target = reversal_state["target"]
        extra = reversal_state["extra"]
        extra_files = reversal_state["files"]
        source = _reversal_source(spec, extra_files)
        ckpt.set_global_rng_state(reversal_state["rng"])
        generator.set_state(reversal_state["generator"])
        reporter.text(f"resumed: reusing this job's finished {spec.method} reversal")
    elif spec.method == "mesa":
        from engine.ml.mesa import open_search

        search = open_search(spec.search, device)
        target = search.target
        ensemble = spec.ensemble or (None if spec.beta is not None else "round-robin")
        if spec.beta is None and len(search.betas) == 1:
            ensemble = None
        source = search.sampler(beta=spec.beta, ensemble=ensemble)
        upstream.append(str(spec.search))
        extra["beta"] = spec.beta
        extra["ensemble"] = ensemble
        # A search with learned placement: its triggers are stamped where its pi says.
        extra["positions"] = "learned" if search.positions else spec.placement
        if search.positions:
            reporter.text("mesa: stamping at the places the search's position distribution gives")
    elif spec.method == "ideal":
        assert truth is not None  # check_spec refused a model without ground truth
        target = truth.target
        source = FixedPatternSampler(truth.pattern)
        reporter.text("ideal: repairing with the original trigger (the oracle bound)")
    elif spec.method == "random-patch":
        source = RandomPatchSampler(meta.in_channels, spec.patch_size)
    elif spec.method == "point" and spec.reversal_from:
        earlier = _check_reversal(spec)
        target = int(earlier["target"])
        patterns = torch.from_numpy(
            artifacts.load_array(Path(spec.reversal_from) / "point_patterns.npy")
        )
        if spec.point_index is not None and spec.point_index >= patterns.shape[0]:
            raise UserError(
                f"invalid --point-index {spec.point_index}: the reused reversal has "
                f"{patterns.shape[0]} restarts"
            )
        chosen = patterns if spec.point_index is None else patterns[spec.point_index][None]
        source = FixedPatternSampler(chosen)
        extra["point_success"] = earlier.get("point_success")
        extra_files["point_patterns"] = patterns
        upstream.append(str(spec.reversal_from))
    elif spec.method == "neural-cleanse" and spec.reversal_from:
        from engine.ml.triggers import MaskTrigger

        earlier = _check_reversal(spec)
        target = int(earlier["target"])
        mask = torch.from_numpy(artifacts.load_array(Path(spec.reversal_from) / "nc_mask.npy"))
        pattern = torch.from_numpy(
            artifacts.load_array(Path(spec.reversal_from) / "nc_pattern.npy")
        )
        source = MaskTrigger(mask, pattern)
        reused = ("flagged", "scores", "mask_l1", "nc")
        extra.update({k: earlier[k] for k in reused if k in earlier})
        extra_files["nc_mask"], extra_files["nc_pattern"] = mask, pattern
        upstream.append(str(spec.reversal_from))
    elif spec.method == "point":
        from engine.ml.reverse import reverse_point

        if target is None:
            target, nc = _detect_target(
                spec, model, normalizer, images, meta.num_classes, device, precision, reporter
            )
            extra.update(_detection_fields(nc))
        point = reverse_point(
            model,
            normalizer,
            images,
            target,
            size=spec.patch_size,
            restarts=spec.point_restarts,
            epochs=spec.point_epochs,
            batch_size=spec.point_batch_size,
            lr=spec.point_lr,
            placement=Placement(spec.placement),
            seed=spec.seed,
            precision=precision,
            channels_last=use_cl,
            reporter=reporter,
        )
        chosen = point.patterns
        if spec.point_index is not None:
            chosen = chosen[spec.point_index : spec.point_index + 1]
        source = FixedPatternSampler(chosen)
        extra["point_success"] = point.success
        extra_files["point_patterns"] = point.patterns
    elif spec.method == "neural-cleanse":
        if target is None:
            target, nc = _detect_target(
                spec, model, normalizer, images, meta.num_classes, device, precision, reporter
            )
            extra.update(_detection_fields(nc))
        else:
            nc = _cleanse(spec, model, normalizer, images, [target], device, precision, reporter)
        reversed_trigger = nc.triggers[target]
        source = reversed_trigger.trigger()
        extra["nc"] = {
            "mask_l1": reversed_trigger.l1,
            "success": reversed_trigger.success,
            "reached": float(reversed_trigger.reached),
        }
        if not reversed_trigger.reached:
            reporter.text(
                f"Neural Cleanse found no mask reaching {spec.nc_threshold:.0%} success for class "
                f"{target}; unlearning with its last mask",
                "warning",
            )
        extra_files["nc_mask"] = reversed_trigger.mask
        extra_files["nc_pattern"] = reversed_trigger.pattern
    elif spec.method == "clp":
        extra["clp"], extra_files["clp_uclc"] = _clp(spec, model, meta, reporter)
        result_metrics["clp/pruned"] = float(extra["clp"]["pruned"])
        result_metrics["clp/pruned_share"] = extra["clp"]["pruned"] / extra["clp"]["channels"]
        result_metrics["time/prune_s"] = time.perf_counter() - reverse_started
    elif spec.method == "anp":
        extra["anp"], extra_files["anp_masks"] = _anp(
            spec,
            model,
            meta,
            normalizer,
            images,
            labels,
            anp_state,
            method_stream(spec.seed, generator.device),
            precision,
            use_cl,
            reporter,
            fingerprint,
        )
        result_metrics["anp/pruned"] = float(extra["anp"]["pruned"])
        result_metrics["anp/pruned_share"] = extra["anp"]["pruned"] / extra["anp"]["neurons"]
        result_metrics["time/prune_s"] = time.perf_counter() - reverse_started
    reverse_s = time.perf_counter() - reverse_started
    if reversed_before:
        assert reversal_state is not None
        reverse_s = float(reversal_state["seconds"])
    elif spec.method in ("point", "neural-cleanse") and not spec.reversal_from:
        reporter.check_in(120.0)
        ckpt.save_checkpoint(
            workdir / REVERSAL,
            "defend-reversal",
            {
                "target": target,
                "extra": extra,
                "files": {k: v.detach().cpu() for k, v in extra_files.items()},
                "seconds": reverse_s,
                "rng": ckpt.global_rng_state(),
                "generator": generator.get_state(),
            },
            fingerprint,
        )
    for r, success in enumerate(extra.get("point_success") or []):
        result_metrics[f"point/restart={r}/success"] = success
    for name, value in extra.get("nc", {}).items():
        result_metrics[f"nc/{name}"] = value
    patterns = extra_files.get("point_patterns")
    if patterns is not None and truth is not None and truth.pattern.shape == patterns.shape[1:]:
        # Evaluation only: how close each restart came to the original trigger.
        distance = (patterns.cpu() - truth.pattern).flatten(1).norm(dim=1)
        for r, value in enumerate(distance.tolist()):
            result_metrics[f"point/restart={r}/distance_to_true"] = value
    if spec.method in ("point", "neural-cleanse") and not spec.reversal_from:
        result_metrics["time/reverse_s"] = reverse_s
    extra["target"] = target
    if spec.method != "ideal" and truth is not None and target is not None:
        result_metrics["defense/target_correct"] = float(target == truth.target)

    # -- the repair loop (the pruning methods have none) --------------------------------------
    step: Any = None
    if spec.method == "i-bau":
        from engine.ml.ibau import IBAUStep

        step = IBAUStep(
            device,
            precision,
            images,
            normalizer,
            method_stream(spec.seed, generator.device),
            k=spec.ibau_k,
            lr=spec.ibau_lr,
            portion=spec.ibau_portion,
            batch_size=spec.batch_size,
            channels_last=use_cl,
        )
        config = replace(config, epochs=spec.ibau_rounds)
    elif spec.method == "ft-sam":
        from engine.ml.ftsam import SAMStep

        step = SAMStep(
            device,
            precision,
            rho=spec.sam_rho,
            adaptive=spec.sam_adaptive,
            label_smoothing=spec.sam_label_smoothing,
            lr=spec.sam_lr,
            epochs=spec.sam_epochs,
        )
        config = replace(
            config, epochs=spec.sam_epochs, lr=spec.sam_lr, weight_decay=spec.sam_weight_decay
        )
    start_epoch, optimizer_state = 0, None
    if repair_state is not None:
        current = model.state_dict()
        saved = repair_state.get("model")
        if not isinstance(saved, dict) or {k: tuple(v.shape) for k, v in saved.items()} != {
            k: tuple(v.shape) for k, v in current.items()
        }:
            reporter.text(
                f"checkpoint {workdir / CHECKPOINT} does not fit this model; "
                "repairing from the beginning",
                "warning",
            )
        else:
            model.load_state_dict(saved)
            optimizer_state = repair_state["optimizer"]
            generator.set_state(repair_state["generator"])
            if "trigger_generator" in repair_state:  # absent from checkpoints before pairing
                trigger_generator.set_state(repair_state["trigger_generator"])
            ckpt.set_global_rng_state(repair_state["rng"])
            load_source_state(source, repair_state["source"])
            load_step_state(step, repair_state.get("step", {}))
            start_epoch = int(repair_state["epoch"])
            reporter.text(f"resumed the repair after epoch {start_epoch}")

    def save_checkpoint(epoch: int, _metrics: dict[str, float], optimizer) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "generator": generator.get_state(),
            "trigger_generator": trigger_generator.get_state(),
            "rng": ckpt.global_rng_state(),
            "source": source_state(source),
            "step": step_state(step),
        }
        ckpt.save_checkpoint(workdir / CHECKPOINT, "defend-repair", state, fingerprint)

    final_step = config.epochs
    if spec.method in PRUNING_METHODS:
        last = {
            f"eval/{k}": v
            for k, v in evaluate_repair(
                model,
                normalizer,
                held_out,
                precision=precision,
                channels_last=use_cl,
                batch_size=spec.eval_batch_size,
            ).items()
        }
        final_step = 1
        reporter.log(last, final_step)
    else:
        schedule = {
            "i-bau": f"{config.epochs} rounds",
            "ft-sam": f"{config.epochs} epochs of sharpness-aware fine-tuning",
        }.get(spec.method, f"stamp rate {spec.stamp_rate}, {config.epochs} epochs")
        reporter.text(
            f"repair: {spec.method}, {schedule} on {images.shape[0]} defender images, "
            f"{device} {precision}"
        )
        repair_started = time.perf_counter()
        last, _ = repair(
            model,
            normalizer,
            images,
            labels,
            source,
            config,
            held_out,
            generator=generator,
            trigger_generator=trigger_generator,
            patch_size=spec.patch_size,
            precision=precision,
            reporter=reporter,
            on_epoch=save_checkpoint,
            start_epoch=start_epoch,
            optimizer_state=optimizer_state,
            step=step,
        )
        result_metrics["time/repair_s"] = time.perf_counter() - repair_started
        if not last:  # resumed after the last epoch: evaluate the checkpointed model
            last = {
                f"eval/{k}": v
                for k, v in evaluate_repair(
                    model, normalizer, held_out, precision=precision, channels_last=use_cl
                ).items()
            }
    result_metrics.update(last)

    # -- after the repair: pattern variations and the residual search ------------------------
    if truth is not None and spec.variations:
        variations = variation_asr(
            model,
            held_out.images,
            held_out.labels,
            normalizer,
            held_out.trigger,
            truth.target,
            batch_size=spec.eval_batch_size,
            precision=precision,
            channels_last=use_cl,
        )
        result_metrics.update({f"eval/{k}": v for k, v in variations.items()})
    if spec.residual_steps > 0 and target is not None:
        residual_started = time.perf_counter()
        result_metrics.update(
            residual_check(
                model,
                normalizer,
                images,
                labels,
                target,
                steps=spec.residual_steps,
                beta=spec.residual_beta,
                batch_size=spec.residual_batch_size,
                hidden=spec.residual_hidden,
                seed=spec.seed + RESIDUAL_SEED_OFFSET,
                device=device,
                precision=precision,
                reporter=reporter,
                true_pattern=truth.pattern if truth else None,
                checkpoint=SearchCheckpoint(
                    workdir / RESIDUAL,
                    resume=reporter.resume,
                    every_steps=mesa_task.CHECKPOINT_EVERY_STEPS,
                    every_s=mesa_task.CHECKPOINT_EVERY_S,
                ),
            )
        )
        result_metrics["time/residual_s"] = time.perf_counter() - residual_started
    elif spec.residual_steps > 0:
        reporter.text("residual check skipped: no target class is known (give --target)")
    result_metrics["time/total_s"] = time.perf_counter() - started

    # -- the repaired model artifact ---------------------------------------------------------
    model_cpu = model.to("cpu").to(memory_format=torch.contiguous_format)
    artifacts.save_model(
        workdir,
        model_cpu,
        meta,
        kind="repaired-model",
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=upstream,
        metrics=result_metrics,
        ground_truth=truth,
    )
    names = [DEFENSE_FILE, OUTCOMES_FILE]
    defense = {k: v for k, v in extra.items() if k != "environment"}
    (workdir / DEFENSE_FILE).write_text(json.dumps(defense, indent=1))
    outcomes_after = held_out_outcomes(model, normalizer, held_out, precision, use_cl, spec)
    (workdir / OUTCOMES_FILE).write_text(
        json.dumps({"before": outcomes_before, "after": outcomes_after}, indent=1)
    )
    for name, tensor in extra_files.items():
        artifacts.save_array(workdir / f"{name}.npy", tensor.detach().float().cpu())
        names.append(f"{name}.npy")
    artifacts.write_manifest(
        workdir,
        "repaired-model",
        ["model.safetensors", *names],
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=upstream,
        meta=artifacts.read_manifest(workdir, verify=False)["meta"],
        metrics=result_metrics,
    )
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    final_only = {
        k: v for k, v in result_metrics.items() if k not in last and not k.startswith("before/")
    }
    reporter.log(final_only, final_step)
    reporter.artifact(workdir, "repaired-model")
    extra.update(
        {"device": str(device), "precision": precision, "environment": environment(device)}
    )
    return TaskResult(artifact=str(workdir), metrics=result_metrics, extra=extra)


def _clp(spec: DefendSpec, model, meta, reporter: Reporter):
    """CLP's pruning of ``model`` (in place): (the defense.json entry, every channel's UCLC)."""
    import torch

    from engine.ml.anp import require_batchnorm
    from engine.ml.clp import clp_prune

    require_batchnorm(model, "clp", meta.arch)
    layers = clp_prune(model, spec.clp_u, spec.clp_pairing)
    if not layers:
        raise UserError(
            f"--method clp found no convolution feeding a BatchNorm in the {meta.arch} network "
            "(nothing to prune); use another method"
        )
    pruned = sum(int(layer.pruned.sum()) for layer in layers)
    channels = sum(layer.uclc.numel() for layer in layers)
    reporter.text(
        f"clp: pruned {pruned} of {channels} channels in {len(layers)} layers (u = {spec.clp_u:g})"
    )
    entry = {
        "u": spec.clp_u,
        "pairing": spec.clp_pairing,
        "pruned": pruned,
        "channels": channels,
        "layers": [
            {
                "conv": layer.conv,
                "bn": layer.bn,
                "channels": layer.uclc.numel(),
                "pruned": layer.pruned.nonzero().flatten().tolist(),
            }
            for layer in layers
        ],
    }
    return entry, torch.cat([layer.uclc for layer in layers])


def _anp(
    spec: DefendSpec,
    model,
    meta,
    normalizer,
    images,
    labels,
    state: dict[str, Any] | None,
    method_generator,
    precision: str,
    channels_last: bool,
    reporter: Reporter,
    fingerprint: str,
):
    """ANP: learn the masks (resuming from ``state``), prune ``model`` in place; (the
    defense.json entry, every neuron's mask in module order)."""
    import torch

    from engine.ml import anp
    from engine.ml import checkpoint as ckpt
    from engine.tasks import mesa as mesa_task

    layers = anp.require_batchnorm(model, "anp", meta.arch)
    config = anp.ANPConfig(
        iterations=spec.anp_iterations,
        batch_size=spec.anp_batch_size,
        lr=spec.anp_lr,
        eps=spec.anp_eps,
        steps=spec.anp_steps,
        alpha=spec.anp_alpha,
        threshold=spec.anp_threshold,
        prune_count=spec.anp_prune_count,
    )
    workdir = Path(reporter.workdir)
    masks = None
    if state is not None:
        masks = anp.MaskState(
            masks=list(state["masks"]),
            optimizer=state["optimizer"],
            iteration=int(state["iteration"]),
            history=list(state["history"]),
        )
        method_generator.set_state(state["generator"])
        reporter.text(f"resumed ANP's mask optimisation after iteration {masks.iteration}")
    cadence = ckpt.Cadence(ANP_CHECKPOINT_EVERY_STEPS, every_s=mesa_task.CHECKPOINT_EVERY_S)

    def save(current: anp.MaskState) -> None:
        finished = current.iteration >= config.iterations
        if not finished and not cadence.due(current.iteration):
            return
        reporter.check_in(120.0)  # flushes the logged points before the checkpoint passes them
        seconds = ckpt.save_checkpoint(
            workdir / ANP_CHECKPOINT,
            "defend-anp",
            {
                "masks": [m.detach().cpu() for m in current.masks],
                "optimizer": current.optimizer,
                "iteration": current.iteration,
                "history": current.history,
                "generator": method_generator.get_state(),
            },
            fingerprint,
        )
        cadence.wrote(seconds)

    if masks is None or masks.iteration < config.iterations:
        reporter.text(
            f"anp: {config.iterations} mask steps of {config.batch_size} defender images "
            f"(eps {config.eps:g}, alpha {config.alpha:g})"
        )
    masks = anp.optimize_masks(
        model,
        normalizer,
        images,
        labels,
        config,
        generator=method_generator,
        precision=precision,
        channels_last=channels_last,
        reporter=reporter,
        state=masks,
        on_log=save,
    )
    chosen = anp.neurons_to_prune(masks.masks, config)
    pruned = anp.prune_batchnorm(model, layers, chosen)
    neurons = sum(m.numel() for m in masks.masks)
    rule = (
        f"the {config.prune_count} smallest masks"
        if config.prune_count is not None
        else f"masks at most {config.threshold:g}"
    )
    reporter.text(f"anp: pruned {pruned} of {neurons} neurons ({rule})")
    entry = {
        "pruned": pruned,
        "neurons": neurons,
        "threshold": None if config.prune_count is not None else config.threshold,
        "prune_count": config.prune_count,
        "layers": [
            {"bn": name, "neurons": bn.num_features, "pruned": c.nonzero().flatten().tolist()}
            for (name, bn), c in zip(layers, chosen, strict=True)
        ],
        "history": masks.history,
    }
    return entry, torch.cat([m.detach().cpu().flatten() for m in masks.masks])


def held_out_outcomes(model, normalizer, held_out, precision, channels_last, spec) -> dict:
    """Per-image outcomes on the held-out split as 0/1 strings (``engine.ml.metrics.outcomes``),
    so repairs of one model can be compared image by image (paired statistics)."""
    from engine.ml.metrics import outcome_bits, outcomes

    found = outcomes(
        model,
        held_out.images,
        held_out.labels,
        normalizer,
        trigger=held_out.trigger,
        target=held_out.target,
        batch_size=spec.eval_batch_size,
        precision=precision,
        channels_last=channels_last,
    )
    return {name: outcome_bits(values) for name, values in found.items()}


def _reversal_source(spec: DefendSpec, files: dict):
    """The trigger source of a saved reversal (as the reversal branches build it)."""
    from engine.ml.repair import FixedPatternSampler
    from engine.ml.triggers import MaskTrigger

    if spec.method == "point":
        patterns = files["point_patterns"]
        if spec.point_index is not None:
            patterns = patterns[spec.point_index : spec.point_index + 1]
        return FixedPatternSampler(patterns)
    return MaskTrigger(files["nc_mask"], files["nc_pattern"])


def residual_check(
    model,
    normalizer,
    images,
    labels,
    target: int,
    *,
    steps: int,
    beta: float = 0.9,
    batch_size: int = 128,
    hidden: int = 512,
    seed: int = 0,
    device=None,
    precision: str = "fp32",
    reporter: Reporter | None = None,
    true_pattern=None,
    checkpoint=None,
) -> dict[str, float]:
    """A fresh short MESA search on the repaired model (new generators, their own seed): the best
    validity its samples reach over the search's evaluations (``residual/validity``).
    ``checkpoint``: an ``engine.ml.mesa.SearchCheckpoint`` (resumable, like any search)."""
    from engine.ml.mesa import MesaConfig, search_targets

    batch_size = min(batch_size, int(images.shape[0]))
    # Validity at half way and at the end: 64 triggers x 64 images each, cheap beside the steps.
    config = MesaConfig(
        betas=(beta,),
        steps=steps,
        batch_size=batch_size,
        hidden=hidden,
        stats_every=max(1, min(20, steps)),
        sample_every=max(1, steps // 2),
        n_eval_triggers=64,
        eval_images=min(64, int(images.shape[0])),
        samples=256,
    )
    key = f"residual/beta={beta:g}"
    result = search_targets(
        model,
        normalizer,
        images,
        [(beta, target, key)],
        config,
        labels=labels,
        device=device or images.device,
        precision=precision,
        reporter=reporter,
        true_pattern=true_pattern,
        seed=seed,
        stage="residual",
        checkpoint=checkpoint,
    )
    seen = [e["metrics"].get(f"{key}/validity") for e in result.evaluations]
    seen = [v for v in seen if v is not None]
    out = {
        "residual/validity": max(seen) if seen else result.metrics[f"{key}/validity"],
        "residual/validity_final": result.metrics[f"{key}/validity"],
        "residual/validity_mean": result.metrics.get(f"{key}/validity_mean", float("nan")),
    }
    if f"{key}/nearest_to_true" in result.metrics:
        out["residual/nearest_to_true"] = result.metrics[f"{key}/nearest_to_true"]
    return out
