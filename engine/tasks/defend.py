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
from dataclasses import dataclass, field, replace
from functools import partial
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
    if spec.method == "mesa":  # the spec checked what needs no artifact (_mesa_settings)
        search_meta = _search_meta(spec.search)
        betas = [float(b) for b in search_meta.get("betas", [])]
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
    if spec.method == "ideal" and not (Path(spec.model) / "ground_truth.json").exists():
        raise UserError(
            f"--method ideal needs the original trigger, but {spec.model} has no "
            "ground_truth.json (the attack is unknown); use another method"
        )
    if spec.reversal_from is not None:
        _check_reversal(spec)
    size = tuple(meta.get("image_size", (32, 32)))
    if spec.patch_size > min(size):
        raise UserError(
            f"invalid --patch-size {spec.patch_size}: the images are {size[0]}x{size[1]}"
        )
    return meta


def _check_reversal(spec: DefendSpec) -> dict[str, Any]:
    """The earlier defense whose reversed trigger is reused: same method, same model."""
    from engine.ml.artifacts import read_manifest

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


def _detect_target(d: _Defense):
    """Neural Cleanse over every label: the defender's belief when none was given (sets the
    target and the detection's fields; returns the Neural Cleanse result)."""
    classes = d.meta.num_classes
    d.reporter.text(f"no --target given: Neural Cleanse detection over all {classes} labels")
    result = _cleanse(
        d.spec, d.model, d.normalizer, d.images, range(classes), d.device, d.precision, d.reporter
    )
    d.target = result.most_suspicious()
    det = result.detection
    if det is not None and not det.flagged:
        d.reporter.text(
            f"Neural Cleanse flagged no label; using the smallest mask's label {d.target}",
            "warning",
        )
    d.extra.update(_detection_fields(result))
    return result


def _detection_fields(result) -> dict[str, Any]:
    det = result.detection
    if det is None:
        return {}
    return {
        "flagged": det.flagged,
        "scores": {str(k): v for k, v in zip(det.labels, det.anomaly_index, strict=True)},
        "mask_l1": {str(k): v for k, v in zip(det.labels, det.norms, strict=True)},
    }


@dataclass
class _Defense:
    """One defense's state, handed from stage to stage."""

    spec: DefendSpec
    reporter: Reporter
    started: float
    config: Any  # RepairConfig
    device: Any
    precision: str
    use_cl: bool
    generator: Any  # the repair's stream
    trigger_generator: Any  # the trigger source's own stream
    model: Any
    meta: Any
    normalizer: Any
    images: Any
    labels: Any
    held_out: Any  # EvalSet: evaluation only, never seen by a defense
    truth: Any  # GroundTruth | None: evaluation (and ideal's trigger) only
    workdir: Path
    fingerprint: dict[str, Any]  # ckpt.run_fingerprint: the spec hash and the precision
    reversal_state: dict[str, Any] | None = None
    repair_state: dict[str, Any] | None = None
    anp_state: dict[str, Any] | None = None
    outcomes_before: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # tensors saved as <name>.npy
    upstream: list[str] = field(default_factory=list)
    target: int | None = None
    source: Any = None  # the trigger source the repair stamps with (None: no trigger)
    step: Any = None  # a method's own repair step (I-BAU, FT-SAM)
    last: dict[str, float] = field(default_factory=dict)  # the final evaluation
    final_step: int = 0

    def evaluate(self, **batch) -> dict[str, float]:
        from engine.ml.repair import evaluate_repair

        return evaluate_repair(
            self.model,
            self.normalizer,
            self.held_out,
            precision=self.precision,
            channels_last=self.use_cl,
            **batch,
        )

    def outcomes(self) -> dict[str, str]:
        return held_out_outcomes(
            self.model, self.normalizer, self.held_out, self.precision, self.use_cl, self.spec
        )


def run(spec: DefendSpec, reporter: Reporter) -> TaskResult:
    started = time.perf_counter()
    check_spec(spec)
    d = _open(spec, reporter, started)
    _read_checkpoints(d)
    _evaluate_before(d)
    _trigger_source(d)
    _repair_or_prune(d)
    _after_repair(d)
    return _finish(d)


def _open(spec: DefendSpec, reporter: Reporter, started: float) -> _Defense:
    """Devices, streams, the defender split and the held-out evaluation set (in this order: the
    streams' draws depend on it)."""
    from engine.ml import artifacts
    from engine.ml import checkpoint as ckpt
    from engine.ml.data import defender_split
    from engine.ml.repair import EvalSet, trigger_stream
    from engine.ml.runtime import (
        configure_cpu,
        configure_device,
        pick_device,
        resolve_precision,
        seed_everything,
    )
    from engine.ml.triggers import PatchTrigger, Placement
    from engine.tasks.mesa import load_defender_data

    config = spec.repair_config()
    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    generator = seed_everything(spec.seed)
    trigger_generator = trigger_stream(spec.seed, generator.device)
    model, meta, normalizer, images, labels, data = load_defender_data(
        spec.model, device, spec.defender_fraction, spec.split_seed
    )
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
    return _Defense(
        spec=spec,
        reporter=reporter,
        started=started,
        config=config,
        device=device,
        precision=precision,
        use_cl=spec.channels_last and device.type != "mps",
        generator=generator,
        trigger_generator=trigger_generator,
        model=model,
        meta=meta,
        normalizer=normalizer,
        images=images,
        labels=labels,
        held_out=held_out,
        truth=truth,
        workdir=Path(reporter.workdir),
        fingerprint=ckpt.run_fingerprint(spec.spec_hash(), precision),
        extra={"method": spec.method, "stamp_rate": spec.stamp_rate},
        upstream=[spec.model],
        target=spec.target,
    )


def _read_checkpoints(d: _Defense) -> None:
    """An earlier attempt's checkpoints (applied by the stages; unusable ones are reported)."""
    from engine.ml import checkpoint as ckpt

    if not d.reporter.resume:
        return
    load = partial(ckpt.load_or_none, fingerprint=d.fingerprint, reporter=d.reporter)
    d.reversal_state = load(d.workdir / REVERSAL, "defend-reversal")
    d.repair_state = load(d.workdir / CHECKPOINT, "defend-repair")
    if d.spec.method == "anp":
        d.anp_state = load(d.workdir / ANP_CHECKPOINT, "defend-anp")


def _evaluate_before(d: _Defense) -> None:
    before = d.evaluate(batch_size=d.spec.eval_batch_size)
    d.outcomes_before = d.outcomes()
    d.metrics = {f"before/{k}": v for k, v in before.items()}
    resumed = any(s is not None for s in (d.reversal_state, d.repair_state, d.anp_state))
    if not resumed:  # a resumed attempt logged them already
        d.reporter.log({f"eval/{k}": v for k, v in before.items()}, 0)
        d.reporter.log(d.metrics, 0)


# -- the trigger source (the only thing that differs between methods) -------------------------


def _trigger_source(d: _Defense) -> None:
    spec = d.spec
    reversing = spec.method in ("point", "neural-cleanse")
    started = time.perf_counter()
    if reversing and d.reversal_state is not None:
        _resume_reversal(d)
    else:
        SOURCES[spec.method](d)
    seconds = time.perf_counter() - started
    if spec.method in PRUNING_METHODS:
        d.metrics["time/prune_s"] = seconds
    if reversing and d.reversal_state is not None:
        seconds = float(d.reversal_state["seconds"])
    elif reversing and not spec.reversal_from:
        _save_reversal(d, seconds)
    _reversal_metrics(d)
    if reversing and not spec.reversal_from:
        d.metrics["time/reverse_s"] = seconds
    d.extra["target"] = d.target
    if spec.method != "ideal" and d.truth is not None and d.target is not None:
        d.metrics["defense/target_correct"] = float(d.target == d.truth.target)


def _resume_reversal(d: _Defense) -> None:
    from engine.ml import checkpoint as ckpt

    state = d.reversal_state
    assert state is not None
    d.target, d.extra, d.files = state["target"], state["extra"], state["files"]
    d.source = _reversal_source(d.spec, d.files)
    ckpt.set_global_rng_state(state["rng"])
    d.generator.set_state(state["generator"])
    d.reporter.text(f"resumed: reusing this job's finished {d.spec.method} reversal")


def _save_reversal(d: _Defense, seconds: float) -> None:
    from engine.ml import checkpoint as ckpt

    d.reporter.check_in(120.0)
    state = {
        "target": d.target,
        "extra": d.extra,
        "files": {k: v.detach().cpu() for k, v in d.files.items()},
        "seconds": seconds,
        "rng": ckpt.global_rng_state(),
        "generator": d.generator.get_state(),
    }
    ckpt.save_checkpoint(d.workdir / REVERSAL, "defend-reversal", state, d.fingerprint)


def _reversal_metrics(d: _Defense) -> None:
    for r, success in enumerate(d.extra.get("point_success") or []):
        d.metrics[f"point/restart={r}/success"] = success
    for name, value in d.extra.get("nc", {}).items():
        d.metrics[f"nc/{name}"] = value
    patterns, truth = d.files.get("point_patterns"), d.truth
    if patterns is not None and truth is not None and truth.pattern.shape == patterns.shape[1:]:
        # Evaluation only: how close each restart came to the original trigger.
        distance = (patterns.cpu() - truth.pattern).flatten(1).norm(dim=1)
        for r, value in enumerate(distance.tolist()):
            d.metrics[f"point/restart={r}/distance_to_true"] = value


def _source_mesa(d: _Defense) -> None:
    from engine.ml.mesa import open_search

    spec = d.spec
    search = open_search(spec.search, d.device)
    d.target = search.target
    ensemble = spec.ensemble or (None if spec.beta is not None else "round-robin")
    if spec.beta is None and len(search.betas) == 1:
        ensemble = None
    d.source = search.sampler(beta=spec.beta, ensemble=ensemble)
    d.upstream.append(str(spec.search))
    d.extra["beta"] = spec.beta
    d.extra["ensemble"] = ensemble
    # A search with learned placement: its triggers are stamped where its pi says (a pair with
    # no scan peak has no pi: the repair's own random places). The residual check searches the
    # way this search did, so after a learned one it scans the repaired model again.
    d.extra["positions"] = "learned" if search.positions else spec.placement
    d.extra["search_placement"] = search.manifest["meta"].get("config", {}).get("placement")
    if search.positions:
        d.reporter.text("mesa: stamping at the places the search's position distribution gives")
        if spec.probe_share > 0:
            _mix_probes(d, search)


def _mix_probes(d: _Defense, search) -> None:
    """The scan's probes that are valid triggers of the search join its samples at
    ``probe_share`` (docs/method.md): the defender's own test, no ground truth."""
    from engine.ml.mesa import probe_validity
    from engine.ml.repair import ProbeMixSampler

    spec = d.spec
    betas = [b for b in search.betas if spec.beta is None or math.isclose(b, spec.beta)]
    test_count = d.images.shape[0] + d.held_out.images.shape[0]
    scanned = int(round(test_count * float(search.manifest["meta"]["defender_fraction"])))
    check = probe_validity(
        search, betas, d.model, d.normalizer, d.images, d.labels, scanned, precision=d.precision
    )
    assert check is not None  # a search with positions had a scan
    valid = check.valid
    d.extra["probes"] = {"share": spec.probe_share, **check.to_json()}
    d.metrics["mesa/probes_valid"] = float(valid.sum())
    if not bool(valid.any()):
        d.reporter.text("mesa: no scan probe is a valid trigger; the generators' samples only")
        return
    d.source = ProbeMixSampler(d.source, check.probes[valid], spec.probe_share)
    d.reporter.text(
        f"mesa: {int(valid.sum())} of {len(valid)} scan probes are valid triggers; they make "
        f"{spec.probe_share:.0%} of the stamped ones"
    )


def _source_ideal(d: _Defense) -> None:
    from engine.ml.repair import FixedPatternSampler
    from engine.ml.triggers import Placement

    assert d.truth is not None  # check_spec refused a model without ground truth
    d.target = d.truth.target
    # A backdoor at one fixed place answers there only: the oracle stamps where the attack did.
    where = Placement(d.truth.placement)
    d.source = FixedPatternSampler(d.truth.pattern, at=where if where.fixed else None)
    d.extra["positions"] = d.truth.placement if where.fixed else d.spec.placement
    d.reporter.text(
        "ideal: repairing with the original trigger (the oracle bound)"
        + (f", stamped where the attack stamped ({where.mode})" if where.fixed else "")
    )


def _source_random_patch(d: _Defense) -> None:
    from engine.ml.repair import RandomPatchSampler

    d.source = RandomPatchSampler(d.meta.in_channels, d.spec.patch_size)


def _no_source(d: _Defense) -> None:
    """Fine-tuning, I-BAU and FT-SAM: the repair stamps nothing."""


def _source_point(d: _Defense) -> None:
    from engine.ml.repair import FixedPatternSampler
    from engine.ml.reverse import reverse_point
    from engine.ml.triggers import Placement

    spec = d.spec
    if spec.reversal_from:
        return _reuse_point(d)
    if d.target is None:
        _detect_target(d)
    point = reverse_point(
        d.model,
        d.normalizer,
        d.images,
        d.target,
        size=spec.patch_size,
        restarts=spec.point_restarts,
        epochs=spec.point_epochs,
        batch_size=spec.point_batch_size,
        lr=spec.point_lr,
        placement=Placement(spec.placement),
        seed=spec.seed,
        precision=d.precision,
        channels_last=d.use_cl,
        reporter=d.reporter,
    )
    chosen = point.patterns
    if spec.point_index is not None:
        chosen = chosen[spec.point_index : spec.point_index + 1]
    d.source = FixedPatternSampler(chosen)
    d.extra["point_success"] = point.success
    d.files["point_patterns"] = point.patterns


def _reuse_point(d: _Defense) -> None:
    import torch

    from engine.ml import artifacts
    from engine.ml.repair import FixedPatternSampler

    spec = d.spec
    earlier = _check_reversal(spec)
    d.target = int(earlier["target"])
    patterns = torch.from_numpy(
        artifacts.load_array(Path(spec.reversal_from) / "point_patterns.npy")
    )
    if spec.point_index is not None and spec.point_index >= patterns.shape[0]:
        raise UserError(
            f"invalid --point-index {spec.point_index}: the reused reversal has "
            f"{patterns.shape[0]} restarts"
        )
    chosen = patterns if spec.point_index is None else patterns[spec.point_index][None]
    d.source = FixedPatternSampler(chosen)
    d.extra["point_success"] = earlier.get("point_success")
    d.files["point_patterns"] = patterns
    d.upstream.append(str(spec.reversal_from))


def _source_neural_cleanse(d: _Defense) -> None:
    spec = d.spec
    if spec.reversal_from:
        return _reuse_neural_cleanse(d)
    if d.target is None:
        nc = _detect_target(d)
    else:
        nc = _cleanse(
            spec, d.model, d.normalizer, d.images, [d.target], d.device, d.precision, d.reporter
        )
    found = nc.triggers[d.target]
    d.source = found.trigger()
    d.extra["nc"] = {"mask_l1": found.l1, "success": found.success, "reached": float(found.reached)}
    if not found.reached:
        d.reporter.text(
            f"Neural Cleanse found no mask reaching {spec.nc_threshold:.0%} success for class "
            f"{d.target}; unlearning with its last mask",
            "warning",
        )
    d.files["nc_mask"], d.files["nc_pattern"] = found.mask, found.pattern


def _reuse_neural_cleanse(d: _Defense) -> None:
    import torch

    from engine.ml import artifacts
    from engine.ml.triggers import MaskTrigger

    spec = d.spec
    earlier = _check_reversal(spec)
    d.target = int(earlier["target"])
    directory = Path(spec.reversal_from)
    mask = torch.from_numpy(artifacts.load_array(directory / "nc_mask.npy"))
    pattern = torch.from_numpy(artifacts.load_array(directory / "nc_pattern.npy"))
    d.source = MaskTrigger(mask, pattern)
    reused = ("flagged", "scores", "mask_l1", "nc")
    d.extra.update({k: earlier[k] for k in reused if k in earlier})
    d.files["nc_mask"], d.files["nc_pattern"] = mask, pattern
    d.upstream.append(str(spec.reversal_from))


def _source_clp(d: _Defense) -> None:
    d.extra["clp"], d.files["clp_uclc"] = _clp(d.spec, d.model, d.meta, d.reporter)
    d.metrics["clp/pruned"] = float(d.extra["clp"]["pruned"])
    d.metrics["clp/pruned_share"] = d.extra["clp"]["pruned"] / d.extra["clp"]["channels"]


def _source_anp(d: _Defense) -> None:
    d.extra["anp"], d.files["anp_masks"] = _anp(d)
    d.metrics["anp/pruned"] = float(d.extra["anp"]["pruned"])
    d.metrics["anp/pruned_share"] = d.extra["anp"]["pruned"] / d.extra["anp"]["neurons"]


SOURCES = {
    "mesa": _source_mesa,
    "ideal": _source_ideal,
    "random-patch": _source_random_patch,
    "point": _source_point,
    "neural-cleanse": _source_neural_cleanse,
    "finetune": _no_source,
    "i-bau": _no_source,
    "ft-sam": _no_source,
    "clp": _source_clp,
    "anp": _source_anp,
}


# -- the repair loop (the pruning methods have none) ------------------------------------------


def _repair_or_prune(d: _Defense) -> None:
    if d.spec.method in PRUNING_METHODS:
        d.last = {f"eval/{k}": v for k, v in d.evaluate(batch_size=d.spec.eval_batch_size).items()}
        d.final_step = 1
        d.reporter.log(d.last, d.final_step)
    else:
        _method_step(d)
        _repair(d)
    d.metrics.update(d.last)


def _method_step(d: _Defense) -> None:
    """I-BAU's and FT-SAM's own step in the repair loop, with their epochs and optimiser."""
    from engine.ml.repair import method_stream

    spec = d.spec
    if spec.method == "i-bau":
        from engine.ml.ibau import IBAUStep

        d.step = IBAUStep(
            d.device,
            d.precision,
            d.images,
            d.normalizer,
            method_stream(spec.seed, d.generator.device),
            k=spec.ibau_k,
            lr=spec.ibau_lr,
            portion=spec.ibau_portion,
            batch_size=spec.batch_size,
            channels_last=d.use_cl,
        )
        d.config = replace(d.config, epochs=spec.ibau_rounds)
    elif spec.method == "ft-sam":
        from engine.ml.ftsam import SAMStep

        d.step = SAMStep(
            d.device,
            d.precision,
            rho=spec.sam_rho,
            adaptive=spec.sam_adaptive,
            label_smoothing=spec.sam_label_smoothing,
            lr=spec.sam_lr,
            epochs=spec.sam_epochs,
        )
        d.config = replace(
            d.config, epochs=spec.sam_epochs, lr=spec.sam_lr, weight_decay=spec.sam_weight_decay
        )


def _resume_repair(d: _Defense) -> tuple[int, Any]:
    """(the epoch to start after, the optimiser's state) from a fitting repair checkpoint."""
    from engine.ml import checkpoint as ckpt
    from engine.ml.repair import load_source_state, load_step_state

    state = d.repair_state
    if state is None:
        return 0, None
    saved, current = state.get("model"), d.model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in current.items()}
    if not isinstance(saved, dict) or {k: tuple(v.shape) for k, v in saved.items()} != shapes:
        d.reporter.text(
            f"checkpoint {d.workdir / CHECKPOINT} does not fit this model; "
            "repairing from the beginning",
            "warning",
        )
        return 0, None
    d.model.load_state_dict(saved)
    d.generator.set_state(state["generator"])
    if "trigger_generator" in state:  # absent from checkpoints before pairing
        d.trigger_generator.set_state(state["trigger_generator"])
    ckpt.set_global_rng_state(state["rng"])
    load_source_state(d.source, state["source"])
    load_step_state(d.step, state.get("step", {}))
    start_epoch = int(state["epoch"])
    d.reporter.text(f"resumed the repair after epoch {start_epoch}")
    return start_epoch, state["optimizer"]


def _save_repair(d: _Defense, epoch: int, _metrics: dict[str, float], optimizer) -> None:
    from engine.ml import checkpoint as ckpt
    from engine.ml.repair import source_state, step_state

    state = {
        "model": d.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "generator": d.generator.get_state(),
        "trigger_generator": d.trigger_generator.get_state(),
        "rng": ckpt.global_rng_state(),
        "source": source_state(d.source),
        "step": step_state(d.step),
    }
    ckpt.save_checkpoint(d.workdir / CHECKPOINT, "defend-repair", state, d.fingerprint)


def _repair(d: _Defense) -> None:
    from engine.ml.repair import repair

    spec, config = d.spec, d.config
    start_epoch, optimizer_state = _resume_repair(d)
    schedule = {
        "i-bau": f"{config.epochs} rounds",
        "ft-sam": f"{config.epochs} epochs of sharpness-aware fine-tuning",
    }.get(spec.method, f"stamp rate {spec.stamp_rate}, {config.epochs} epochs")
    d.reporter.text(
        f"repair: {spec.method}, {schedule} on {d.images.shape[0]} defender images, "
        f"{d.device} {d.precision}"
    )
    started = time.perf_counter()
    d.last, _ = repair(
        d.model,
        d.normalizer,
        d.images,
        d.labels,
        d.source,
        config,
        d.held_out,
        generator=d.generator,
        trigger_generator=d.trigger_generator,
        patch_size=spec.patch_size,
        precision=d.precision,
        reporter=d.reporter,
        on_epoch=partial(_save_repair, d),
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
        step=d.step,
    )
    d.metrics["time/repair_s"] = time.perf_counter() - started
    d.final_step = config.epochs
    if not d.last:  # resumed after the last epoch: evaluate the checkpointed model
        d.last = {f"eval/{k}": v for k, v in d.evaluate().items()}


# -- after the repair: pattern variations and the residual search -----------------------------


def _after_repair(d: _Defense) -> None:
    from engine.ml.metrics import variation_asr

    spec, truth = d.spec, d.truth
    if truth is not None and spec.variations:
        variations = variation_asr(
            d.model,
            d.held_out.images,
            d.held_out.labels,
            d.normalizer,
            d.held_out.trigger,
            truth.target,
            batch_size=spec.eval_batch_size,
            precision=d.precision,
            channels_last=d.use_cl,
        )
        d.metrics.update({f"eval/{k}": v for k, v in variations.items()})
    if spec.residual_steps > 0 and d.target is not None:
        started = time.perf_counter()
        d.metrics.update(_residual(d))
        d.metrics["time/residual_s"] = time.perf_counter() - started
    elif spec.residual_steps > 0:
        d.reporter.text("residual check skipped: no target class is known (give --target)")
    d.metrics["time/total_s"] = time.perf_counter() - d.started


def _residual(d: _Defense) -> dict[str, float]:
    from engine.ml.mesa import SearchCheckpoint
    from engine.tasks import mesa as mesa_task

    spec = d.spec
    assert d.target is not None
    return residual_check(
        d.model,
        d.normalizer,
        d.images,
        d.labels,
        d.target,
        steps=spec.residual_steps,
        beta=spec.residual_beta,
        batch_size=spec.residual_batch_size,
        hidden=spec.residual_hidden,
        seed=spec.seed + RESIDUAL_SEED_OFFSET,
        device=d.device,
        precision=d.precision,
        reporter=d.reporter,
        true_pattern=d.truth.pattern if d.truth else None,
        placement=d.extra.get("search_placement") or spec.placement,
        checkpoint=SearchCheckpoint(
            d.workdir / RESIDUAL,
            resume=d.reporter.resume,
            every_steps=mesa_task.CHECKPOINT_EVERY_STEPS,
            every_s=mesa_task.CHECKPOINT_EVERY_S,
        ),
    )


# -- the repaired model artifact ------------------------------------------------------------


def _finish(d: _Defense) -> TaskResult:
    from engine.ml.runtime import environment

    _save_artifact(d)
    final_only = {
        k: v for k, v in d.metrics.items() if k not in d.last and not k.startswith("before/")
    }
    d.reporter.log(final_only, d.final_step)
    d.reporter.artifact(d.workdir, "repaired-model")
    d.extra.update(
        {"device": str(d.device), "precision": d.precision, "environment": environment(d.device)}
    )
    return TaskResult(artifact=str(d.workdir), metrics=d.metrics, extra=d.extra)


def _save_artifact(d: _Defense) -> None:
    """The repaired model, the defender's side (defense.json), the held-out outcomes before and
    after, the reversal's tensors, and the manifest over all of them; checkpoints go."""
    import torch

    from engine.ml import artifacts

    spec, workdir = d.spec, d.workdir
    names = [DEFENSE_FILE, OUTCOMES_FILE]
    defense = {k: v for k, v in d.extra.items() if k != "environment"}
    (workdir / DEFENSE_FILE).write_text(json.dumps(defense, indent=1))
    outcomes = {"before": d.outcomes_before, "after": d.outcomes()}
    (workdir / OUTCOMES_FILE).write_text(json.dumps(outcomes, indent=1))
    for name, tensor in d.files.items():
        artifacts.save_array(workdir / f"{name}.npy", tensor.detach().float().cpu())
        names.append(f"{name}.npy")
    model_cpu = d.model.to("cpu").to(memory_format=torch.contiguous_format)
    artifacts.save_model(
        workdir,
        model_cpu,
        d.meta,
        kind="repaired-model",
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=d.upstream,
        metrics=d.metrics,
        ground_truth=d.truth,
        extra_files=names,
    )
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


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


def _anp(d: _Defense):
    """ANP: learn the masks (resuming from a checkpoint), prune the model in place; (the
    defense.json entry, every neuron's mask in module order)."""
    import torch

    from engine.ml import anp
    from engine.ml.repair import method_stream

    layers = anp.require_batchnorm(d.model, "anp", d.meta.arch)
    config = d.spec.anp_config()
    stream = method_stream(d.spec.seed, d.generator.device)
    masks = _anp_resume(d, stream)
    if masks is None or masks.iteration < config.iterations:
        d.reporter.text(
            f"anp: {config.iterations} mask steps of {config.batch_size} defender images "
            f"(eps {config.eps:g}, alpha {config.alpha:g})"
        )
    masks = anp.optimize_masks(
        d.model,
        d.normalizer,
        d.images,
        d.labels,
        config,
        generator=stream,
        precision=d.precision,
        channels_last=d.use_cl,
        reporter=d.reporter,
        state=masks,
        on_log=_anp_saver(d, config, stream),
    )
    selection = _anp_select(d, masks.masks, config)
    if selection is None:
        chosen = anp.neurons_to_prune(masks.masks, config)
    else:
        chosen = selection.neurons(masks.masks)
    pruned = anp.prune_batchnorm(d.model, layers, chosen)
    neurons = sum(m.numel() for m in masks.masks)
    d.reporter.text(f"anp: pruned {pruned} of {neurons} neurons ({_anp_rule(config, selection)})")
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
    if selection is not None:  # the sweep chose the threshold (None: it pruned nothing)
        entry["threshold"] = selection.chosen.threshold if selection.chosen else None
        entry["max_acc_drop"] = config.max_acc_drop
        entry["sweep"] = selection.to_json()
    return entry, torch.cat([m.detach().cpu().flatten() for m in masks.masks])


def _anp_select(d: _Defense, masks, config):
    """The threshold sweep on the defender's images when the budget rule is on (else None); the
    chosen threshold goes into the metrics (``anp/threshold``)."""
    from engine.ml import anp

    if config.max_acc_drop is None:
        return None
    selection = anp.select_threshold(
        d.model,
        masks,
        d.normalizer,
        d.images,
        d.labels,
        config.max_acc_drop,
        precision=d.precision,
        channels_last=d.use_cl,
        batch_size=d.spec.eval_batch_size,
    )
    for p in selection.points:
        d.reporter.text(
            f"anp sweep: threshold {p.threshold:.2f} prunes {p.pruned}, defender accuracy "
            f"{p.defender_acc:.4f} (unpruned {selection.unpruned_acc:.4f})"
        )
    if selection.chosen is None:
        d.reporter.text(
            f"anp: every threshold costs more than {config.max_acc_drop:g} of the defender "
            "accuracy; nothing is pruned",
            "warning",
        )
    else:
        d.metrics["anp/threshold"] = selection.chosen.threshold
        d.metrics["anp/defender_acc"] = selection.chosen.defender_acc
    return selection


def _anp_rule(config, selection) -> str:
    if config.prune_count is not None:
        return f"the {config.prune_count} smallest masks"
    if selection is None:
        return f"masks at most {config.threshold:g}"
    budget = f"defender accuracy within {config.max_acc_drop:g} of the unpruned model's"
    if selection.chosen is None:
        return f"no threshold keeps the {budget}"
    return f"masks at most {selection.chosen.threshold:g}, the largest threshold with the {budget}"


def _anp_resume(d: _Defense, stream):
    """The masks of an earlier attempt (its stream restored), or None."""
    from engine.ml import anp

    state = d.anp_state
    if state is None:
        return None
    masks = anp.MaskState(
        masks=list(state["masks"]),
        optimizer=state["optimizer"],
        iteration=int(state["iteration"]),
        history=list(state["history"]),
    )
    stream.set_state(state["generator"])
    d.reporter.text(f"resumed ANP's mask optimisation after iteration {masks.iteration}")
    return masks


def _anp_saver(d: _Defense, config, stream):
    """ANP's checkpoint writer: at a logged iteration, every minute at most, and when done."""
    from engine.ml import checkpoint as ckpt
    from engine.tasks import mesa as mesa_task

    cadence = ckpt.Cadence(ANP_CHECKPOINT_EVERY_STEPS, every_s=mesa_task.CHECKPOINT_EVERY_S)

    def save(current) -> None:
        finished = current.iteration >= config.iterations
        if not finished and not cadence.due(current.iteration):
            return
        d.reporter.check_in(120.0)  # flushes the logged points before the checkpoint passes them
        state = {
            "masks": [m.detach().cpu() for m in current.masks],
            "optimizer": current.optimizer,
            "iteration": current.iteration,
            "history": current.history,
            "generator": stream.get_state(),
        }
        seconds = ckpt.save_checkpoint(
            d.workdir / ANP_CHECKPOINT, "defend-anp", state, d.fingerprint
        )
        cadence.wrote(seconds)

    return save


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
    placement: str = "per-image",
    checkpoint=None,
) -> dict[str, float]:
    """A fresh short MESA search on the repaired model (new generators, their own seed): the best
    validity its samples reach over the search's evaluations (``residual/validity``).
    ``placement``: where its triggers go. A repair after a ``learned`` search passes ``learned``
    (a fixed-position backdoor is only found by scanning again); the others keep the repair's
    random places, so a residual check costs no position scan (230k forward passes) there.
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
        placement=placement,
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
