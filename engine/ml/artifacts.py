"""Artifacts: a directory with ``manifest.json`` and its files, hashes checked on every load.

Weights are safetensors (never pickles). What the attacker knows (the true trigger and target) is
written apart in ``ground_truth.json``: evaluation may read it, no defender code path does, and
stripping it leaves the artifact valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import UnsafeFile, UserError
from engine.version import code_version

MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(
    directory: str | Path,
    kind: str,
    files: list[str],
    *,
    spec: dict[str, Any] | None = None,
    spec_hash: str | None = None,
    upstream: list[str | Path] | None = None,
    meta: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``manifest.json`` last, so a directory with a manifest is a complete artifact."""
    directory = Path(directory)
    manifest = {
        "kind": kind,
        "format": 1,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec_hash": spec_hash,
        "spec": spec,
        "files": {
            f: {"sha256": sha256_file(directory / f), "bytes": (directory / f).stat().st_size}
            for f in files
        },
        "upstream": [
            {"path": str(Path(u).resolve()), "manifest_sha256": manifest_sha256(u)}
            for u in upstream or []
        ],
        "meta": meta or {},
        "metrics": metrics or {},
    }
    gt = directory / GROUND_TRUTH
    if gt.exists():
        manifest["ground_truth"] = {"file": GROUND_TRUTH, "sha256": sha256_file(gt)}
    _atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return directory / MANIFEST


def manifest_sha256(directory: str | Path) -> str:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise UserError(
            f"'{directory}' is not an artifact (no {MANIFEST}); give an artifact directory"
        )
    return sha256_file(path)


def read_manifest(
    directory: str | Path, verify: bool = True, kind: str | None = None
) -> dict[str, Any]:
    """Read and (by default) verify every file's hash; a mismatch is refused."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise UserError(
            f"'{directory}' is not an artifact (no {MANIFEST}); give an artifact directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsafeFile(f"{path} is not valid JSON ({exc.msg}); the artifact is damaged") from None
    if kind is not None and manifest.get("kind") != kind:
        raise UserError(
            f"'{directory}' is a {manifest.get('kind')} artifact; give a {kind} artifact"
        )
    if verify:
        for name, info in manifest.get("files", {}).items():
            f = directory / name
            if not f.exists():
                raise UnsafeFile(f"artifact file {f} is missing; the artifact is incomplete")
            if sha256_file(f) != info["sha256"]:
                raise UnsafeFile(
                    f"{f} does not match the sha256 in its manifest; refusing to load it"
                )
    return manifest


@dataclass(frozen=True)
class ModelMeta:
    arch: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    dataset_sha256: str = ""
    seed: int | None = None
    # The definition version of ``arch`` the weights belong to (``engine.ml.models.ARCH_VERSIONS``);
    # left out, the code's current one. A manifest written before the field existed stands for
    # ``engine.ml.models.UNVERSIONED_ARCH``.
    arch_version: int | None = None

    def __post_init__(self) -> None:
        if self.arch_version is None:
            from engine.ml.models import arch_version

            object.__setattr__(self, "arch_version", arch_version(self.arch))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        from engine.ml.models import unversioned_arch_version

        return cls(
            arch=d["arch"],
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            image_size=tuple(d["image_size"]),  # type: ignore[arg-type]
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            dataset=d["dataset"],
            dataset_sha256=d.get("dataset_sha256", ""),
            seed=d.get("seed"),
            arch_version=int(d["arch_version"])
            if d.get("arch_version") is not None
            else unversioned_arch_version(d["arch"]),
        )


@dataclass(frozen=True)
class GroundTruth:
    """Evaluation-only knowledge of the attack."""

    trigger: str
    pattern: torch.Tensor  # (C, k, k)
    target: int
    placement: str

    def to_json(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "pattern": self.pattern.tolist(),
            "target": self.target,
            "placement": self.placement,
        }


def save_ground_truth(directory: str | Path, truth: GroundTruth) -> None:
    _atomic_write_text(Path(directory) / GROUND_TRUTH, json.dumps(truth.to_json()))


def load_ground_truth(directory: str | Path) -> GroundTruth | None:
    """The true trigger and target, or None when stripped or never known. Evaluation only."""
    path = Path(directory) / GROUND_TRUTH
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return GroundTruth(
        d["trigger"],
        torch.tensor(d["pattern"], dtype=torch.float32),
        int(d["target"]),
        d["placement"],
    )


def save_model(
    directory: str | Path,
    model: nn.Module,
    meta: ModelMeta,
    *,
    kind: str = "model",
    spec: dict[str, Any] | None = None,
    spec_hash: str | None = None,
    upstream: list[str | Path] | None = None,
    metrics: dict[str, float] | None = None,
    ground_truth: GroundTruth | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta_json = json.dumps(asdict(meta))
    tmp = directory / "model.safetensors.part"
    save_file(state, str(tmp), metadata={"mesa_tui_meta": meta_json})
    os.replace(tmp, directory / "model.safetensors")
    if ground_truth is not None:
        save_ground_truth(directory, ground_truth)
    write_manifest(
        directory,
        kind,
        ["model.safetensors"],
        spec=spec,
        spec_hash=spec_hash,
        upstream=upstream,
        meta=asdict(meta),
        metrics=metrics,
    )
    return directory


def load_model(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, ModelMeta, dict[str, Any]]:
    """Build the architecture named in the manifest and load its verified safetensors weights.
    Weights of another definition version of the architecture are refused (they would load into
    a network that computes something else)."""
    from engine.ml.models import build_model

    manifest = read_manifest(directory)
    if manifest.get("kind") not in ("model", "repaired-model"):
        raise UserError(
            f"'{directory}' is a {manifest.get('kind')} artifact; give a model artifact"
        )
    meta = ModelMeta.from_dict(manifest["meta"])
    check_arch_version(directory, meta)
    model = build_model(meta.arch, meta.num_classes, meta.in_channels)
    state = load_file(str(Path(directory) / "model.safetensors"), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device), meta, manifest


def check_arch_version(directory: str | Path, meta: ModelMeta) -> None:
    """One-line ``UserError`` when the artifact's architecture version is not the code's."""
    from engine.ml.models import ARCH_CHANGES, arch_version

    saved, current = meta.arch_version or 1, arch_version(meta.arch)
    if saved == current:
        return
    change = ARCH_CHANGES.get((meta.arch, current))
    raise UserError(
        f"model artifact '{directory}' holds '{meta.arch}' weights of definition version {saved}, "
        f"but this code builds version {current}"
        + (f" ({change})" if change and saved < current else "")
        + "; retrain the model (mesa-tui run train) with this version"
    )


def save_array(path: str | Path, array: np.ndarray | torch.Tensor) -> None:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    path = Path(path)
    tmp = path.with_suffix(".part.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def load_array(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Foreign checkpoints


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict", "model_state"):
            inner = obj.get(key)
            if (
                isinstance(inner, dict)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                state = inner
                break
        else:
            raise UserError(
                f"{path} holds no state dict (looked for a plain one and keys state_dict, model, net); "
                "export the model's state_dict"
            )
    else:
        raise UserError(
            f"{path} holds a {type(obj).__name__}, not a state dict; export the model's state_dict"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_foreign_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch checkpoint loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist; give a .safetensors, .pt or .pth file")
    if path.suffix == ".safetensors":
        return {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message starts by telling how to load the file unsafely; keep only the cause.
        cause = next(
            (
                line.strip().removeprefix("WeightsUnpickler error: ")
                for line in str(exc).splitlines()
                if "WeightsUnpickler error:" in line
            ),
            "",
        ).split(" was not an allowed global")[0]
        raise UnsafeFile(
            f"{path} needs arbitrary unpickling ({cause[:160] or 'not a plain state dict'}); "
            "refusing to load it. Save its state_dict with torch.save(model.state_dict(), ...) "
            "or as safetensors"
        ) from None
    except Exception as exc:  # garbage makes the weights-only unpickler fail in many ways
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else '-'}); give a .safetensors, .pt or .pth file"
        ) from None
    return _unwrap_state_dict(obj, path)
