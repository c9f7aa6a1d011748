"""MESA search task: ``run(spec: MesaSpec, reporter) -> TaskResult``.

Loads the model artifact, its dataset and normalisation, takes the defender split of the test
set (the held-out images are never touched), and trains one trigger generator per beta for
``spec.target`` (engine.ml.mesa). The ground truth of the model artifact is read only for
evaluation metrics (``nearest_to_true``, ``bw_distinct``, the original trigger beside the grid);
the search itself never sees it, so stripping ``ground_truth.json`` gives identical generators.

The search saves its whole state in ``checkpoints/search.safetensors`` of the work directory
now and then (``CHECKPOINT_EVERY_S``, and never more than 2 % of the time); a resumed attempt
continues from that step with the same generators an uninterrupted search would reach.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.reporter import Reporter, TaskResult
from engine.specs import MesaSpec
from engine.triggerspec import trigger_kind

CHECKPOINT = "checkpoints/search.safetensors"
# How often the search saves its state: every N steps when set (tests), else by the clock.
CHECKPOINT_EVERY_STEPS: int | None = None
CHECKPOINT_EVERY_S = 60.0


def read_model_meta(model_dir: str | Path) -> dict[str, Any]:
    """The model artifact's meta (architecture, classes, dataset) without loading weights."""
    from engine.ml.artifacts import read_manifest

    path = Path(model_dir).expanduser()
    if path.is_file() and (path.parent / "manifest.json").is_file():
        raise UserError(
            f"'{model_dir}' is a file of the artifact {path.parent}; give that directory"
        )
    if path.is_file():
        raise UserError(
            f"'{model_dir}' is a file, not a model directory; give the directory `mesa-tui run "
            "train` made, or turn foreign weights into one with `mesa-tui model import "
            f"{model_dir} --arch ARCH --classes N --normalize DATASET`"
        )
    if not path.is_dir():
        raise UserError(
            f"model artifact '{model_dir}' does not exist; give a model directory "
            "(see mesa-tui run train, or mesa-tui model import for foreign weights)"
        )
    manifest = read_manifest(path, verify=False)
    if manifest.get("kind") not in ("model", "repaired-model"):
        raise UserError(
            f"'{model_dir}' is a {manifest.get('kind')} artifact; give a model artifact"
        )
    return manifest["meta"]


def check_spec(spec: MesaSpec) -> dict[str, Any]:
    """Everything that can be refused before anything is written; returns the model's meta."""
    meta = read_model_meta(spec.model)
    classes = int(meta["num_classes"])
    if spec.target >= classes:
        raise UserError(
            f"invalid --target {spec.target}: the model has {classes} classes; "
            f"use a class in 0..{classes - 1}"
        )
    return meta


def load_defender_data(model_dir: str, device, defender_fraction: float, split_seed: int):
    """(model, meta, normalizer, defender images on the device (uint8), their labels)."""
    from engine.ml.artifacts import load_model
    from engine.ml.data import Normalizer, defender_split, load_dataset

    model, meta, _ = load_model(model_dir, device)
    data = load_dataset(meta.dataset)
    if (data.channels, data.image_size) != (meta.in_channels, tuple(meta.image_size)):
        raise UserError(
            f"dataset '{meta.dataset}' has {data.channels}x{data.image_size} images but the model "
            f"expects {meta.in_channels}x{tuple(meta.image_size)}; import the matching dataset"
        )
    defender, _held_out = defender_split(data.test_x.shape[0], defender_fraction, split_seed)
    images = data.test_x[defender].to(device)
    labels = data.test_y[defender]
    normalizer = Normalizer(meta.mean, meta.std, device)
    return model, meta, normalizer, images, labels, data


def scan_settings(
    model_dir: str, config: Any, seed: int, precision: str, device: Any, split: tuple[float, int]
) -> dict[str, Any]:
    """Everything a position scan's map depends on: the model's weights, the scan's settings,
    its seed, precision and device, and the defender split it stamps. A detection records them
    beside its scan; a search reuses that scan only when its own are equal."""
    from engine.ml.artifacts import read_manifest

    weights = read_manifest(model_dir, verify=False)["files"]["model.safetensors"]["sha256"]
    return {
        "model_sha256": weights,
        "probes": config.scan_probes,
        "images": config.scan_images,
        "trigger_size": config.trigger_size,
        "seed": seed,
        "precision": precision,
        "device": str(device),
        "defender_fraction": split[0],
        "split_seed": split[1],
    }


def reused_scan(spec: MesaSpec, d: _Loaded, reporter: Reporter):  # noqa: ANN201  (PositionScan)
    """The position scan of the detection ``spec.scan_from`` when it was made with this
    search's scan settings on this model (then scanning again would give the same map), else
    None (the search scans, saying why)."""
    import torch

    from engine.ml.artifacts import load_array, read_manifest
    from engine.ml.position_scan import PositionScan

    config = spec.mesa_config()
    if spec.scan_from is None or not config.learned:
        return None
    path = Path(spec.scan_from).expanduser()
    mine = scan_settings(
        spec.model,
        config,
        spec.seed,
        d.precision,
        d.device,
        (spec.defender_fraction, spec.split_seed),
    )
    try:
        read_manifest(path, kind="detection")
        recorded = json.loads((path / "detect.json").read_text()).get("scan", {})
    except (UserError, OSError, json.JSONDecodeError) as exc:
        reporter.text(f"scan_from {path}: not a readable detection ({exc}); scanning", "warning")
        return None
    if recorded.get("settings") != mine:
        reporter.text(f"scan_from {path}: made with other scan settings; scanning")
        return None
    probs = torch.from_numpy(load_array(path / "scan.npy"))
    reporter.text(f"position scan: reusing the detection's ({path})")
    return PositionScan(probs, config.trigger_size)


def run(spec: MesaSpec, reporter: Reporter) -> TaskResult:
    check_spec(spec)
    loaded = _load(spec, reporter)
    result = _search(spec, loaded, reporter)
    workdir = Path(reporter.workdir)
    _write(spec, loaded, result, workdir)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    reporter.artifact(workdir, "search")
    return _task_result(spec, loaded, result, workdir)


@dataclass
class _Loaded:
    """What the search runs on: the model and defender images, and (evaluation only) the
    ground-truth pattern, which the search itself never receives."""

    device: Any
    precision: str
    model: Any
    meta: Any
    normalizer: Any
    images: Any
    labels: Any
    true_pattern: Any
    bw_task: bool


def _load(spec: MesaSpec, reporter: Reporter) -> _Loaded:
    from engine.ml.artifacts import load_ground_truth
    from engine.ml.runtime import (
        configure_cpu,
        configure_device,
        pick_device,
        resolve_precision,
        seed_everything,
    )

    configure_cpu()
    device = pick_device(spec.device)
    configure_device(device)
    precision = resolve_precision(spec.precision, device)
    seed_everything(spec.seed)
    model, meta, normalizer, images, labels, data = load_defender_data(
        spec.model, device, spec.defender_fraction, spec.split_seed
    )
    if meta.dataset_sha256 and data.sha256 != meta.dataset_sha256:
        reporter.text(
            f"dataset '{meta.dataset}' differs from the one the model was trained on "
            "(hash mismatch); results may not be comparable",
            "warning",
        )
    truth = load_ground_truth(spec.model)
    return _Loaded(
        device=device,
        precision=precision,
        model=model,
        meta=meta,
        normalizer=normalizer,
        images=images,
        labels=labels,
        true_pattern=truth.pattern if truth is not None else None,
        bw_task=truth is not None and trigger_kind(truth.trigger) == "bw",
    )


def _search(spec: MesaSpec, d: _Loaded, reporter: Reporter):  # noqa: ANN202  (SearchResult: torch)
    from engine.ml.mesa import SearchCheckpoint, search

    reporter.text(
        f"MESA search: target {spec.target}, betas {spec.betas}, {spec.steps} steps, "
        f"{d.images.shape[0]} defender images, {d.device} {d.precision}"
    )
    return search(
        d.model,
        d.normalizer,
        d.images,
        spec.target,
        spec.mesa_config(),
        labels=d.labels,
        device=d.device,
        precision=d.precision,
        reporter=reporter,
        true_pattern=d.true_pattern,
        bw_stats=d.bw_task,
        seed=spec.seed,
        position_scan=reused_scan(spec, d, reporter),
        checkpoint=SearchCheckpoint(
            Path(reporter.workdir) / CHECKPOINT,
            resume=reporter.resume,
            every_steps=CHECKPOINT_EVERY_STEPS,
            every_s=CHECKPOINT_EVERY_S,
        ),
    )


def _write(spec: MesaSpec, d: _Loaded, result: Any, workdir: Path) -> None:
    from engine.ml.mesa import write_search_artifact

    write_search_artifact(
        result,
        workdir,
        spec=spec.to_json(),
        spec_hash=spec.spec_hash(),
        upstream=[spec.model],
        meta={
            "model": str(Path(spec.model).resolve()),
            "dataset": d.meta.dataset,
            "num_classes": d.meta.num_classes,
            "channels": d.meta.in_channels,
            "image_size": list(d.meta.image_size),
            "defender_fraction": spec.defender_fraction,
            "split_seed": spec.split_seed,
            "seed": spec.seed,
            "precision": d.precision,
        },
        true_pattern=d.true_pattern,
    )


def _task_result(spec: MesaSpec, d: _Loaded, result: Any, workdir: Path) -> TaskResult:
    total_steps = spec.steps * len(spec.betas)
    return TaskResult(
        artifact=str(workdir),
        metrics=result.metrics,
        extra={
            "betas": list(spec.betas),
            "target": spec.target,
            "histograms": result.histograms,
            "seconds": round(result.seconds, 2),
            "generator_steps_per_s": round(total_steps / max(result.seconds, 1e-9), 3),
            "device": str(d.device),
            "precision": d.precision,
        },
    )
