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
from collections.abc import Sequence
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
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
    extra_files: Sequence[str] = (),
) -> Path:
    """The weights, then the manifest over them and ``extra_files`` (already in ``directory``):
    written last, so that a directory with a manifest is complete."""
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
        ["model.safetensors", *extra_files],
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
    """Build the architecture named in the manifest and load its verified safetensors weights."""
    from engine.ml.models import build_model

    manifest = read_manifest(directory)
    if manifest.get("kind") not in ("model", "repaired-model"):
        raise UserError(
            f"'{directory}' is a {manifest.get('kind')} artifact; give a model artifact"
        )
    meta = ModelMeta.from_dict(manifest["meta"])
    model = build_model(meta.arch, meta.num_classes, meta.in_channels)
    state = load_file(str(Path(directory) / "model.safetensors"), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device), meta, manifest


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


def _numpy_safe_globals() -> list[Any]:
    """The numpy names a weights-only load may resolve, and nothing else: arrays and scalars of
    plain dtypes (bool, integers, floats, complex). numpy 1.x pickles name ``numpy.core``, numpy 2
    ``numpy._core``; both point at the same functions. Each dtype's own class is listed because
    unpickling a dtype calls ``np.dtype(...)`` and then sets its state (BUILD), which the
    weights-only unpickler allows only on listed types: an object or structured dtype stops there."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    names: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    for code in PLAIN_NUMPY_DTYPES:
        cls = type(np.dtype(code))
        names.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return names


# bool, signed and unsigned integers, floats and complex numbers: arrays of these are bytes.
PLAIN_NUMPY_DTYPES = (
    "?",
    "i1",
    "i2",
    "i4",
    "i8",
    "u1",
    "u2",
    "u4",
    "u8",
    "f2",
    "f4",
    "f8",
    "c8",
    "c16",
)
_PLAIN_KINDS = frozenset("biufc")


def _check_plain(obj: Any, path: Path, depth: int = 0) -> None:
    """Refuse anything but tensors, numbers, strings, bytes, None, numpy arrays and scalars of
    plain dtypes, and lists, tuples, sets and dicts of those (a second fence behind the
    unpickler's allow-list: an object array could still slip through an unbuilt dtype)."""
    if depth > 64:
        raise UnsafeFile(f"{path} nests deeper than 64 levels; refusing to load it")
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor)):
        return
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in _PLAIN_KINDS:
            raise UnsafeFile(
                f"{path} holds a numpy {'array' if isinstance(obj, np.ndarray) else 'scalar'} of "
                f"dtype {obj.dtype} (only bool, integer, float and complex are read); refusing to "
                "load it"
            )
        return
    if isinstance(obj, np.dtype):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, path, depth + 1)
            _check_plain(value, path, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _check_plain(item, path, depth + 1)
        return
    raise UnsafeFile(f"{path} holds a {type(obj).__name__} object; refusing to load it")


def _unpickling_cause(exc: Exception) -> str:
    """What the weights-only unpickler refused, without torch's advice to load the file unsafely:
    the global it would not resolve, or the type it would not build or call."""
    import re

    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    if line.startswith("Unsupported global: GLOBAL "):
        return line.removeprefix("Unsupported global: GLOBAL ").split(" was not")[0]
    built = re.search(r"but got <class '([^']+)'>", line)
    if built:
        return f"an object of type {built[1]}"
    return line.split(". Please")[0][:160] or "not a plain state dict"


def read_foreign_checkpoint(path: str | Path) -> Any:
    """The whole object of a safetensors file or a torch checkpoint, loaded without running any
    code from it: ``torch.load(weights_only=True)``, whose unpickler resolves only torch's tensor
    types and, here, numpy arrays and scalars of plain dtypes (``_numpy_safe_globals``); a pickled
    class or a ``__reduce__`` to any other function is refused (``UnsafeFile``) before it runs.
    What loads is checked once more to hold only tensors, numbers, strings and plain arrays."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path} does not exist; give a .safetensors, .pt or .pth file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFile(
            f"{path} needs arbitrary unpickling ({_unpickling_cause(exc)}); refusing to load it "
            "(only tensors, numbers, strings and numpy arrays of plain dtypes are read). Save its "
            "state_dict with torch.save(model.state_dict(), ...) or as safetensors"
        ) from None
    except Exception as exc:  # garbage makes the weights-only unpickler fail in many ways
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else '-'}); give a .safetensors, .pt or .pth file"
        ) from None
    _check_plain(obj, path)
    return obj


def read_foreign_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or a torch checkpoint loaded safely (``read_foreign_checkpoint``)."""
    path = Path(path)
    obj = read_foreign_checkpoint(path)
    if path.suffix == ".safetensors":
        return {k.removeprefix("module."): v for k, v in obj.items()}
    return _unwrap_state_dict(obj, path)
