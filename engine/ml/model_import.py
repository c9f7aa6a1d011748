"""Bring foreign weights in as a model artifact: safetensors, a weights-only torch checkpoint, or
a BackdoorBench attack result (``engine.ml.backdoorbench``), whose file says the architecture,
classes, dataset and input size itself."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from engine import paths
from engine.catalog import KNOWN, dataset_info
from engine.errors import UserError
from engine.ml import artifacts, backdoorbench
from engine.ml.models import build_model


def import_model(
    path: str | Path,
    *,
    arch: str | None = None,
    classes: int | None = None,
    normalize: str | None = None,
    channels: int | None = None,
    out: str | Path | None = None,
) -> dict:
    """Load weights safely into ``arch`` (strict), and write them as a verified artifact.

    A BackdoorBench attack result brings its own architecture, classes, dataset, normalisation
    and input size; options given beside it must agree with the file. Any other file needs
    ``arch``, ``classes`` and ``normalize``."""
    path = Path(path)
    directory = (
        Path(out)
        if out
        else paths.artifacts_dir()
        / f"model-import-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"--out {directory} exists and is not empty; choose a new directory")
    obj = artifacts.read_foreign_checkpoint(path)
    spec: dict[str, Any] = {"imported_from": str(path.resolve())}
    if path.suffix != ".safetensors" and backdoorbench.is_attack_result(obj):
        result = backdoorbench.read_attack_result(obj, path, dataset=normalize)
        _agree(path, "--arch", arch, result.arch, result.model_name)
        _agree(path, "--classes", classes, result.num_classes)
        _agree(path, "--channels", channels, result.in_channels)
        arch, classes, chans = result.arch, result.num_classes, result.in_channels
        size, mean, std, dataset = result.image_size, result.mean, result.std, result.dataset
        state = result.state
        spec["backdoorbench"] = result.provenance
    else:
        if arch is None or classes is None or normalize is None:
            missing = [
                flag
                for flag, value in (
                    ("--arch", arch),
                    ("--classes", classes),
                    ("--normalize", normalize),
                )
                if value is None
            ]
            raise UserError(
                f"{path} is a plain state dict, which does not say its network; give "
                f"{', '.join(missing)} (a BackdoorBench attack_result.pt needs none of them)"
            )
        if path.suffix == ".safetensors":
            state = {k.removeprefix("module."): v for k, v in obj.items()}
        else:
            state = artifacts._unwrap_state_dict(obj, path)
        mean, std, size, chans = _normalization(normalize)
        chans = channels or chans
        dataset = normalize
    hint = (
        "the file is damaged or its model_name is not what trained it"
        if "backdoorbench" in spec
        else "check --arch and --classes"
    )
    model = build_model(arch, classes, chans)
    missing, unexpected = _diff(model.state_dict().keys(), state.keys())
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit {arch} with {classes} classes: missing {len(missing)} keys "
            f"(e.g. {', '.join(missing[:2]) or '-'}), unexpected {len(unexpected)} "
            f"(e.g. {', '.join(unexpected[:2]) or '-'}); {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{path} has tensors of the wrong shape for {arch} with {classes} classes ({str(exc).splitlines()[1].strip()[:140]}); {hint}"
        ) from None
    meta = artifacts.ModelMeta(arch, classes, chans, tuple(size), tuple(mean), tuple(std), dataset)
    artifacts.save_model(directory, model, meta, spec=spec)
    return {
        "artifact": str(directory),
        "arch": arch,
        "classes": classes,
        "dataset": dataset,
        "image_size": list(size),
        "mean": list(mean),
        "std": list(std),
        "source": "backdoorbench" if "backdoorbench" in spec else "state-dict",
        "sha256": artifacts.sha256_file(directory / "model.safetensors"),
    }


def _normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int], int]:
    if name in KNOWN:
        known = KNOWN[name]
        return known.mean, known.std, (known.size, known.size), known.channels
    info = dataset_info(name)
    from engine.ml.data import load_dataset

    data = load_dataset(name)
    return tuple(data.mean), tuple(data.std), info.image_size, info.channels


def _agree(path: Path, flag: str, given: Any, found: Any, *aliases: Any) -> None:
    if given is not None and given != found and given not in aliases:
        raise UserError(
            f"{flag} {given} disagrees with {path}, a BackdoorBench attack result of {found}; "
            f"leave {flag} out"
        )


def _diff(expected, got) -> tuple[list[str], list[str]]:
    e, g = set(expected), set(got)
    # Checkpoints from PyTorch before 0.4.1 lack BatchNorm's counter; load_state_dict fills it in.
    missing = [k for k in sorted(e - g) if not k.endswith(".num_batches_tracked")]
    return missing, sorted(g - e)
