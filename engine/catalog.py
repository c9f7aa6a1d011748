"""The dataset catalogue without torch: known datasets, where stored copies live, their shapes.

The CLI validates specs and lists datasets with this module alone, so it stays fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from engine import paths
from engine.errors import UserError


@dataclass(frozen=True)
class KnownDataset:
    classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str


KNOWN: dict[str, KnownDataset] = {
    "cifar10": KnownDataset(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "CIFAR10"
    ),
    "cifar100": KnownDataset(
        100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), "CIFAR100"
    ),
    "mnist": KnownDataset(10, 1, 28, (0.1307,), (0.3081,), "MNIST"),
    "fashion-mnist": KnownDataset(10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST"),
}

DEBIAN_IDX_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """What spec validation needs, without decoding anything."""

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def imported_path(name: str) -> Path:
    return paths.datasets_dir() / f"{_safe_name(name)}.safetensors"


def cache_path(name: str) -> Path:
    return paths.dataset_cache_dir() / f"{_safe_name(name)}.safetensors"


def _safe_name(name: str) -> str:
    if name.startswith("imagefolder:"):
        digest = hashlib.sha256(str(Path(name[12:]).expanduser().resolve()).encode()).hexdigest()[
            :16
        ]
        return f"imagefolder-{digest}"
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise UserError(f"dataset name '{name}' is not allowed; use letters, digits, '-' and '_'")
    return name


def dataset_info(name: str) -> DatasetInfo:
    """Class count and shape for validation; reads only metadata when the set is stored."""
    for p in (
        imported_path(name) if not name.startswith("imagefolder:") else None,
        cache_path(name),
    ):
        if p is not None and p.exists():
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as f:
                shape = f.get_slice("train_x").get_shape()
                classes = json.loads((f.metadata() or {})["classes"])
            return DatasetInfo(name, len(classes), int(shape[1]), (int(shape[2]), int(shape[3])))
    if name in KNOWN:
        k = KNOWN[name]
        return DatasetInfo(name, k.classes, k.channels, (k.size, k.size))
    if name.startswith("imagefolder:"):
        folder = Path(name[12:]).expanduser()
        train = folder / "train"
        if not train.is_dir():
            raise UserError(
                f"image folder '{folder}' has no train/ directory; lay it out as train/<class>/*"
            )
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        return DatasetInfo(name, len(classes), 3, (32, 32))
    raise UserError(
        f"dataset '{name}' is unknown; use one of {', '.join(KNOWN)}, imagefolder:PATH, "
        f"or import it first with: mesa-tui data import PATH --name {name}"
    )


def list_datasets() -> list[dict]:
    """Everything available locally: imported copies, decoded caches, and the registry."""
    rows = []
    seen = set()
    for kind, directory in (
        ("imported", paths.datasets_dir()),
        ("cached", paths.dataset_cache_dir()),
    ):
        if not directory.is_dir():
            continue
        for p in sorted(directory.glob("*.safetensors")):
            name = p.stem
            if name in seen:
                continue
            seen.add(name)
            try:
                meta = _read_meta(p)
                from safetensors import safe_open

                with safe_open(str(p), framework="numpy") as f:
                    n_train = f.get_slice("train_x").get_shape()[0]
                    n_test = f.get_slice("test_x").get_shape()[0]
                    shape = f.get_slice("train_x").get_shape()[1:]
                rows.append(
                    {
                        "name": name,
                        "status": kind,
                        "classes": len(json.loads(meta["classes"])),
                        "train": int(n_train),
                        "test": int(n_test),
                        "shape": "x".join(str(int(s)) for s in shape),
                        "sha256": meta.get("sha256", "")[:12],
                        "path": str(p),
                    }
                )
            except Exception as exc:  # a damaged file is listed, not fatal
                rows.append(
                    {
                        "name": name,
                        "status": f"unreadable ({exc.__class__.__name__})",
                        "path": str(p),
                    }
                )
    for name, k in KNOWN.items():
        if name not in seen:
            rows.append(
                {
                    "name": name,
                    "status": "not local (torchvision download or mesa-tui data import)",
                    "classes": k.classes,
                    "shape": f"{k.channels}x{k.size}x{k.size}",
                }
            )
    return rows
