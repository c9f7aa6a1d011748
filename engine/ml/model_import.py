"""Bring foreign weights in as a model artifact: safetensors, a weights-only torch checkpoint, or
a BackdoorBench attack result (``engine.ml.backdoorbench``), whose file says the architecture,
classes, dataset and input size itself."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import paths
from engine.catalog import KNOWN, dataset_info
from engine.errors import UserError
from engine.ml import artifacts, backdoorbench
from engine.ml.models import build_model


@dataclass
class _Weights:
    """What a foreign file brings: the weights and what they need to be a model artifact."""

    arch: str
    classes: int
    channels: int
    size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    state: dict[str, Any]
    hint: str  # what to check when the weights do not fit


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
    directory = _out_directory(out)
    obj = artifacts.read_foreign_checkpoint(path)
    spec: dict[str, Any] = {"imported_from": str(path.resolve())}
    if path.suffix != ".safetensors" and backdoorbench.is_attack_result(obj):
        weights = _from_backdoorbench(path, obj, arch, classes, channels, normalize, spec)
    else:
        weights = _from_state_dict(path, obj, arch, classes, channels, normalize)
    model = _load_strict(path, weights)
    w = weights
    meta = artifacts.ModelMeta(
        w.arch, w.classes, w.channels, tuple(w.size), tuple(w.mean), tuple(w.std), w.dataset
    )
    artifacts.save_model(directory, model, meta, spec=spec)
    return {
        "artifact": str(directory),
        "arch": w.arch,
        "classes": w.classes,
        "dataset": w.dataset,
        "image_size": list(w.size),
        "mean": list(w.mean),
        "std": list(w.std),
        "source": "backdoorbench" if "backdoorbench" in spec else "state-dict",
        "sha256": artifacts.sha256_file(directory / "model.safetensors"),
    }


def _out_directory(out: str | Path | None) -> Path:
    """``--out``, or a new directory under the artifacts home; never one with files in it."""
    directory = (
        Path(out)
        if out
        else paths.artifacts_dir()
        / f"model-import-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"--out {directory} exists and is not empty; choose a new directory")
    return directory


def _from_backdoorbench(path, obj, arch, classes, channels, normalize, spec) -> _Weights:
    """A BackdoorBench attack result: it names its network; options given must agree."""
    result = backdoorbench.read_attack_result(obj, path, dataset=normalize)
    _agree(path, "--arch", arch, result.arch, result.model_name)
    _agree(path, "--classes", classes, result.num_classes)
    _agree(path, "--channels", channels, result.in_channels)
    spec["backdoorbench"] = result.provenance
    return _Weights(
        arch=result.arch,
        classes=result.num_classes,
        channels=result.in_channels,
        size=result.image_size,
        mean=result.mean,
        std=result.std,
        dataset=result.dataset,
        state=result.state,
        hint="the file is damaged or its model_name is not what trained it",
    )


def _from_state_dict(path, obj, arch, classes, channels, normalize) -> _Weights:
    """A plain state dict (or safetensors): the options say the network."""
    if arch is None or classes is None or normalize is None:
        given = (("--arch", arch), ("--classes", classes), ("--normalize", normalize))
        missing = [flag for flag, value in given if value is None]
        raise UserError(
            f"{path} is a plain state dict, which does not say its network; give "
            f"{', '.join(missing)} (a BackdoorBench attack_result.pt needs none of them)"
        )
    if path.suffix == ".safetensors":
        state = {k.removeprefix("module."): v for k, v in obj.items()}
    else:
        state = artifacts._unwrap_state_dict(obj, path)
    mean, std, size, chans = _normalization(normalize)
    return _Weights(
        arch=arch,
        classes=classes,
        channels=channels or chans,
        size=size,
        mean=mean,
        std=std,
        dataset=normalize,
        state=state,
        hint="check --arch and --classes",
    )


def _load_strict(path: Path, w: _Weights):
    """The network with the weights loaded strictly; a misfit is one line naming it."""
    model = build_model(w.arch, w.classes, w.channels)
    missing, unexpected = _diff(model.state_dict().keys(), w.state.keys())
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit {w.arch} with {w.classes} classes: missing {len(missing)} keys "
            f"(e.g. {', '.join(missing[:2]) or '-'}), unexpected {len(unexpected)} "
            f"(e.g. {', '.join(unexpected[:2]) or '-'}); {w.hint}"
        )
    try:
        model.load_state_dict(w.state, strict=True)
    except RuntimeError as exc:
        shape = str(exc).splitlines()[1].strip()[:140]
        raise UserError(
            f"{path} has tensors of the wrong shape for {w.arch} with {w.classes} classes "
            f"({shape}); {w.hint}"
        ) from None
    return model


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
