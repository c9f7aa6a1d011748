"""Bring foreign weights in as a model artifact (safetensors or a weights-only torch checkpoint)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from engine import paths
from engine.catalog import KNOWN, dataset_info
from engine.errors import UserError
from engine.ml import artifacts
from engine.ml.models import build_model


def import_model(
    path: str | Path,
    *,
    arch: str,
    classes: int,
    normalize: str,
    channels: int | None = None,
    out: str | Path | None = None,
) -> dict:
    """Load weights safely into ``arch`` (strict), and write them as a verified artifact."""
    if normalize in KNOWN:
        known = KNOWN[normalize]
        mean, std, size, chans = known.mean, known.std, (known.size, known.size), known.channels
    else:
        info = dataset_info(normalize)
        from engine.ml.data import load_dataset

        data = load_dataset(normalize)
        mean, std, size, chans = data.mean, data.std, info.image_size, info.channels
    chans = channels or chans
    model = build_model(arch, classes, chans)
    state = artifacts.read_foreign_weights(path)
    missing, unexpected = _diff(model.state_dict().keys(), state.keys())
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit {arch} with {classes} classes: missing {len(missing)} keys "
            f"(e.g. {', '.join(missing[:2]) or '-'}), unexpected {len(unexpected)} "
            f"(e.g. {', '.join(unexpected[:2]) or '-'}); check --arch and --classes"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{path} has tensors of the wrong shape for {arch} with {classes} classes ({str(exc).splitlines()[1].strip()[:140]}); check --arch and --classes"
        ) from None
    meta = artifacts.ModelMeta(arch, classes, chans, size, tuple(mean), tuple(std), normalize)
    directory = (
        Path(out)
        if out
        else paths.artifacts_dir()
        / f"model-import-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    )
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"--out {directory} exists and is not empty; choose a new directory")
    artifacts.save_model(directory, model, meta, spec={"imported_from": str(Path(path).resolve())})
    return {
        "artifact": str(directory),
        "arch": arch,
        "classes": classes,
        "sha256": artifacts.sha256_file(directory / "model.safetensors"),
    }


def _diff(expected, got) -> tuple[list[str], list[str]]:
    e, g = set(expected), set(got)
    # Checkpoints from PyTorch before 0.4.1 lack BatchNorm's counter; load_state_dict fills it in.
    missing = [k for k in sorted(e - g) if not k.endswith(".num_batches_tracked")]
    return missing, sorted(g - e)
