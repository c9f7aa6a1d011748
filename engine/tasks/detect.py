"""Target-class detection: ``run(spec: DetectSpec, reporter) -> TaskResult``.

A short MESA search (one beta) for every class; several classes' generators share one pass of
the frozen model, like the betas of a search. A class's score is the validity share of its
sampled triggers (own ASR >= beta on clean non-target images). Only the high side is flagged:
robust z = (score - median) / max(1.4826 * MAD, floor) above ``z_threshold`` AND score at least
``min_score``, so that near-zero scores on a clean model (MAD about 0) flag nothing.

Resume: each finished pass saves its classes' scores in ``checkpoints/detect-scores.safetensors``
(a resumed attempt skips those classes), and the pass under way saves its search state like the
MESA search task does, so a resumed attempt continues it from its last checkpoint step.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.reporter import Reporter, TaskResult, stop_point
from engine.specs import DetectSpec

SCORES = "checkpoints/detect-scores.safetensors"
PASS_CHECKPOINT = "checkpoints/detect-pass-{index}.safetensors"
SCORES_KIND = "detect-scores"


def robust_z(scores: dict[int, float], floor: float) -> dict[int, float]:
    """(score - median) / max(1.4826 * MAD, floor) per class."""
    values = list(scores.values())
    median = statistics.median(values)
    mad = statistics.median([abs(v - median) for v in values])
    scale = max(1.4826 * mad, floor)
    return {c: (s - median) / scale for c, s in scores.items()}


def flag_classes(
    scores: dict[int, float], *, z_threshold: float, min_score: float, floor: float
) -> tuple[list[int], dict[int, float]]:
    z = robust_z(scores, floor)
    flagged = sorted(c for c, s in scores.items() if z[c] > z_threshold and s >= min_score)
    return flagged, z


def scan_flags(
    lifts: dict[int, float], *, z_threshold: float, min_lift: float, floor: float
) -> tuple[list[int], dict[int, float]]:
    """Classes whose position-scan lift (peak minus median of the map) stands out, robust z
    over the classes as for the scores, and reaches ``min_lift``: fixed-position backdoors."""
    return flag_classes(lifts, z_threshold=z_threshold, min_score=min_lift, floor=floor)


def _scan_stage(spec: DetectSpec, config, model, normalizer, images, precision, reporter):  # noqa: ANN001, ANN202
    """The position scan of a ``learned`` detection (None otherwise): one forward sweep serves
    every class, its searches start from it and its lifts flag fixed-position backdoors."""
    from engine.ml.mesa import scan_for

    if not config.learned:
        return None
    return scan_for(model, normalizer, images, config, precision, spec.seed, reporter)


def check_spec(spec: DetectSpec) -> list[int]:
    """Refuse bad input before anything is written; returns the classes to test."""
    from engine.tasks.mesa import read_model_meta

    meta = read_model_meta(spec.model)
    num_classes = int(meta["num_classes"])
    classes = spec.classes if spec.classes is not None else list(range(num_classes))
    bad = [c for c in classes if c >= num_classes]
    if bad:
        raise UserError(
            f"invalid --classes {bad[0]}: the model has {num_classes} classes; "
            f"use classes in 0..{num_classes - 1}"
        )
    return classes


@dataclass
class _Loaded:
    """What the stages share once the model and the defender data are loaded."""

    config: Any
    device: Any
    precision: str
    model: Any
    normalizer: Any
    images: Any
    labels: Any


def _load(spec: DetectSpec, classes: list[int], reporter: Reporter) -> _Loaded:
    """Device set-up, seeding and the defender data. Seeds before the scan and the searches
    so that all their random draws follow from ``spec.seed``."""
    from engine.ml.runtime import (
        configure_cpu,
        configure_device,
        pick_device,
        resolve_precision,
        seed_everything,
    )
    from engine.tasks.mesa import load_defender_data

    config = spec.mesa_config()
    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    seed_everything(spec.seed)
    model, _meta, normalizer, images, labels, _data = load_defender_data(
        spec.model, device, spec.defender_fraction, spec.split_seed
    )
    reporter.text(
        f"detection: {len(classes)} classes, {spec.steps} steps each, beta {spec.beta}, "
        f"placement {spec.placement}, "
        f"{images.shape[0]} defender images, {device} {precision}"
    )
    return _Loaded(config, device, precision, model, normalizer, images, labels)


def _resume_scores(
    spec: DetectSpec, precision: str, workdir: Path, reporter: Reporter
) -> dict[int, dict]:
    """Finished classes of an earlier attempt: {class: {score, validity_mean, p_target,
    histogram[, positions]}}; empty on a fresh run or when the saved scores do not match."""
    from engine.ml import checkpoint as ckpt

    if not reporter.resume:
        return {}
    fingerprint = ckpt.run_fingerprint(spec.spec_hash(), precision)
    saved = ckpt.load_or_none(workdir / SCORES, SCORES_KIND, fingerprint, reporter)
    if saved is None:
        return {}
    finished = {int(c): v for c, v in saved["classes"].items()}
    reporter.text(
        f"resumed: {len(finished)} classes already scored ({sorted(finished)}); skipping them"
    )
    return finished


def _class_record(result: Any, i: int, key: str) -> dict:
    """One class's entry in the saved scores, from its pass's search result."""
    from engine.ml.mesa import position_stats, top_positions

    record = {
        "score": result.metrics[f"{key}/validity"],
        "validity_mean": result.metrics[f"{key}/validity_mean"],
        "p_target": result.metrics[f"{key}/p_target"],
        "histogram": result.histograms[key],
    }
    pi = result.positions[i] if i < len(result.positions) else None
    if pi is not None:  # learned placement: where the class's triggers work
        record["positions"] = {
            **position_stats(pi),
            "grid": list(pi.shape),
            "top": top_positions(pi),
            "probs": [[round(float(v), 6) for v in row] for row in pi.tolist()],
        }
    return record


def _search_pass(
    spec: DetectSpec,
    ld: _Loaded,
    scan: Any,
    group: list[int],
    gi: int,
    n_groups: int,
    workdir: Path,
    reporter: Reporter,
) -> Any:
    """One pass of the frozen model for a group of classes, resumable from its checkpoint."""
    from engine.ml.mesa import SearchCheckpoint, search_targets
    from engine.tasks import mesa as mesa_task

    # Read at call time: tests shorten the checkpoint interval on the mesa task module.
    return search_targets(
        ld.model,
        ld.normalizer,
        ld.images,
        [(spec.beta, c, f"detect/class={c}") for c in group],
        ld.config,
        labels=ld.labels,
        device=ld.device,
        precision=ld.precision,
        reporter=reporter,
        seed=spec.seed,
        stage=f"detect {gi + 1}/{n_groups} (classes {group[0]}..{group[-1]})",
        position_scan=scan,
        checkpoint=SearchCheckpoint(
            workdir / PASS_CHECKPOINT.format(index=gi),
            resume=reporter.resume,
            every_steps=mesa_task.CHECKPOINT_EVERY_STEPS,
            every_s=mesa_task.CHECKPOINT_EVERY_S,
        ),
    )


def _search_classes(
    spec: DetectSpec,
    ld: _Loaded,
    classes: list[int],
    scan: Any,
    workdir: Path,
    reporter: Reporter,
) -> dict[int, dict]:
    """Every class's search, ``classes_per_pass`` at a time; each finished pass's scores are
    saved so that a resumed attempt skips its classes."""
    from engine.ml import checkpoint as ckpt

    finished = _resume_scores(spec, ld.precision, workdir, reporter)
    groups = [
        classes[i : i + spec.classes_per_pass]
        for i in range(0, len(classes), spec.classes_per_pass)
    ]
    for gi, group in enumerate(groups):
        stop_point(reporter)
        if all(c in finished for c in group):
            continue
        result = _search_pass(spec, ld, scan, group, gi, len(groups), workdir, reporter)
        for i, (c, key) in enumerate(zip(group, result.keys, strict=True)):
            finished[c] = _class_record(result, i, key)
        reporter.check_in(120.0)  # flushes this pass's metrics before its scores count as done
        ckpt.save_checkpoint(
            workdir / SCORES,
            SCORES_KIND,
            {"classes": {str(c): v for c, v in finished.items()}},
            ckpt.run_fingerprint(spec.spec_hash(), ld.precision),
        )
        (workdir / PASS_CHECKPOINT.format(index=gi)).unlink(missing_ok=True)
    return finished


def _class_metrics(
    classes: list[int], finished: dict[int, dict]
) -> tuple[dict[str, float], dict[int, float], dict[str, list[int]], dict[str, dict]]:
    """Per-class metrics, scores, histograms and (learned placement) position summaries."""
    metrics: dict[str, float] = {}
    scores: dict[int, float] = {}
    histograms: dict[str, list[int]] = {}
    positions: dict[str, dict] = {}
    for c in classes:
        scores[c] = finished[c]["score"]
        metrics[f"detect/class={c}/score"] = scores[c]
        metrics[f"detect/class={c}/validity_mean"] = finished[c]["validity_mean"]
        metrics[f"detect/class={c}/p_target"] = finished[c]["p_target"]
        histograms[str(c)] = finished[c]["histogram"]
        where = finished[c].get("positions")
        if where is not None:
            positions[str(c)] = where
            for name in ("pos_entropy_ratio", "pos_top_mass", "pos_top_row", "pos_top_col"):
                metrics[f"detect/class={c}/{name}"] = where[name]
    return metrics, scores, histograms, positions


def _flags(
    spec: DetectSpec,
    config: Any,
    classes: list[int],
    scores: dict[int, float],
    scan: Any,
    metrics: dict[str, float],
) -> tuple[list[int], dict[int, float], dict | None]:
    """Flagged classes (by score, and by scan lift when there is a scan), the score z per
    class and the scan's report (None without a scan); adds their metrics to ``metrics``."""
    flagged, z = flag_classes(
        scores, z_threshold=spec.z_threshold, min_score=spec.min_score, floor=spec.mad_floor
    )
    for c in classes:
        metrics[f"detect/class={c}/z"] = z[c]
    scan_report = None
    if scan is not None:
        lifts = {c: scan.lift(c) for c in classes}
        by_scan, scan_z = scan_flags(
            lifts, z_threshold=spec.z_threshold, min_lift=config.scan_min_lift, floor=spec.mad_floor
        )
        flagged = sorted(set(flagged) | set(by_scan))
        scan_report = {
            "flagged": by_scan,
            "classes": {str(c): {**scan.summary(c), "z": round(scan_z[c], 4)} for c in classes},
        }
        for c in classes:
            metrics[f"detect/class={c}/scan_lift"] = lifts[c]
            metrics[f"detect/class={c}/scan_z"] = scan_z[c]
    metrics["detect/flagged_count"] = float(len(flagged))
    metrics["detect/max_score"] = max(scores.values())
    return flagged, z, scan_report


def _write_report(
    spec: DetectSpec,
    workdir: Path,
    classes: list[int],
    *,
    flagged: list[int],
    scores: dict[int, float],
    z: dict[int, float],
    histograms: dict[str, list[int]],
    positions: dict[str, dict],
    scan: Any,
    scan_report: dict | None,
    metrics: dict[str, float],
) -> None:
    """detect.json, the scan's map (scan.npy) when there was a scan, and the manifest."""
    from engine.ml.artifacts import save_array, write_manifest

    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "flagged": flagged,
        "scores": {str(c): s for c, s in scores.items()},
        "z": {str(c): v for c, v in z.items()},
        "histograms": histograms,
        "model": str(Path(spec.model).resolve()),
        "placement": spec.placement,
    }
    if positions:
        report["positions"] = positions
    if scan_report is not None:
        report["scan"] = scan_report
        save_array(workdir / "scan.npy", scan.probs.numpy())
    (workdir / "detect.json").write_text(json.dumps(report, indent=1))
    write_manifest(
        workdir,
        "detection",
        ["detect.json", *(["scan.npy"] if scan_report is not None else [])],
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=[spec.model],
        meta={"flagged": flagged, "classes": classes},
        metrics=metrics,
    )


def run(spec: DetectSpec, reporter: Reporter) -> TaskResult:
    from engine.tasks.mesa import scan_settings

    classes = check_spec(spec)
    ld = _load(spec, classes, reporter)
    scan = _scan_stage(spec, ld.config, ld.model, ld.normalizer, ld.images, ld.precision, reporter)
    workdir = Path(reporter.workdir)
    finished = _search_classes(spec, ld, classes, scan, workdir, reporter)
    metrics, scores, histograms, positions = _class_metrics(classes, finished)
    flagged, z, scan_report = _flags(spec, ld.config, classes, scores, scan, metrics)
    if scan_report is not None:  # what a search must match to reuse this scan (scan_from)
        split = (spec.defender_fraction, spec.split_seed)
        scan_report["settings"] = scan_settings(
            spec.model, ld.config, spec.seed, ld.precision, ld.device, split
        )
    reporter.log(metrics, spec.steps)
    _write_report(
        spec,
        workdir,
        classes,
        flagged=flagged,
        scores=scores,
        z=z,
        histograms=histograms,
        positions=positions,
        scan=scan,
        scan_report=scan_report,
        metrics=metrics,
    )
    # Finish: the per-pass checkpoints are spent once the artifact is written.
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    reporter.artifact(workdir, "detection")
    return TaskResult(
        artifact=str(workdir),
        metrics=metrics,
        extra={
            "flagged": flagged,
            "scores": {c: scores[c] for c in classes},
            "z": {c: round(z[c], 4) for c in classes},
            "device": str(ld.device),
            "precision": ld.precision,
            "placement": spec.placement,
            "top_positions": {c: v["top"][0][:2] for c, v in positions.items()},
        },
    )
