"""BackdoorBench's saved attack results (SCLBD/BackdoorBench, ``utils/save_load_attack.py``).

``save_attack_result`` writes ``attack_result.pt`` with ``torch.save`` of one dict::

    model_name   BackdoorBench's architecture name ("preactresnet18", "vgg19_bn", ...)
    num_classes  int
    model        the state dict
    data_path    str, where its dataset lived
    img_size     (height, width, channels), e.g. (32, 32, 3)
    clean_data   the dataset name ("cifar10", "cifar100", "gtsrb", "mnist", "tiny", ...)
    bd_train     None or the poisoned training set's ``retrieve_state()``: ``bd_data_container``
                 ({"save_folder_path", "data_dict", "save_file_format"}), ``getitem_all``,
                 ``getitem_all_switch``, ``original_index_array`` and ``poison_indicator``
                 (numpy arrays), ``save_folder_path``
    bd_test      the same for the poisoned test set
    ...          whatever else the attack passed as keyword arguments

The file is read with ``artifacts.read_foreign_checkpoint`` (weights-only, numpy arrays of plain
dtypes allowed); this module only interprets what loaded. No BackdoorBench code is used or needed.
Its normalisation is its ``get_dataset_normalization`` (what its ``get_transform`` ends with) and
its input shapes are its ``get_input_shape``, both written out below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UserError

# The keys save_attack_result always writes; a dict with the first three is taken for one.
REQUIRED_KEYS = ("model_name", "num_classes", "model")

# BackdoorBench's ``get_dataset_normalization``: (mean, std) per dataset name.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# BackdoorBench's ``get_input_shape``: (height, width, channels), used when a file lacks img_size.
INPUT_SHAPE: dict[str, tuple[int, int, int]] = {
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
    "gtsrb": (32, 32, 3),
    "mnist": (28, 28, 1),
    "celeba": (64, 64, 3),
    "tiny": (64, 64, 3),
    "imagenet": (224, 224, 3),
}

# BackdoorBench architecture name -> ours. Only networks mesa-tui builds with the very same layers
# are mapped; BackdoorBench's "resnet18" and "vgg19_bn" are torchvision's ImageNet definitions
# (7x7 stem and max-pool; 7x7 adaptive pool and a 4096-wide head), not the CIFAR networks that
# mesa-tui's resnet18 and vgg11-bn are, so they are refused rather than loaded into something else.
ARCHITECTURES: dict[str, str] = {"preactresnet18": "preact-resnet18"}

# Per architecture, how BackdoorBench's state-dict keys become ours: (pattern, replacement) rules
# applied in order, then every key must be one of our model's. BackdoorBench's
# models/preact_resnet.py names its layers exactly as engine.ml.models.PreActResNet18 does
# (conv1; layerN.M.bn1, conv1, bn2, conv2, shortcut.0; linear; the pooling has no weights), so its
# rules are empty: the mapping is the identity, checked key by key against our model and, in the
# tests, by equal logits of a network built from BackdoorBench's definition.
KEY_RULES: dict[str, tuple[tuple[str, str], ...]] = {"preactresnet18": ()}

# Why a BackdoorBench name that looks like one of ours is still refused.
NOT_OURS: dict[str, str] = {
    "resnet18": "torchvision's ImageNet ResNet-18, not the CIFAR ResNet-18 mesa-tui builds",
    "vgg19_bn": "torchvision's VGG-19 with an ImageNet head; mesa-tui builds vgg11-bn only",
}

# Prefixes wrappers add: nn.DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class AttackResult:
    """What mesa-tui takes from a BackdoorBench attack result."""

    model_name: str
    arch: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    state: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)


def is_attack_result(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in REQUIRED_KEYS)


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def _integer(value: Any, what: str, path: Path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (np.integer, np.ndarray)) and np.size(value) == 1:
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(
            f"{path}: BackdoorBench's {what} is {value!r}, not a whole number; the file is damaged"
        )
    return value


def map_state(model_name: str, state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """BackdoorBench's state dict with our key names (``KEY_RULES``), wrapper prefixes removed."""
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: BackdoorBench's 'model' holds no state dict; the file is damaged")
    rules = KEY_RULES[model_name]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"{path}: BackdoorBench's 'model' holds {type(value).__name__} under {key!r}, "
                "not a tensor; the file is damaged"
            )
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def _poisoned(state: Any) -> int | None:
    """How many samples a ``retrieve_state()`` marks as poisoned (None where it does not say)."""
    if not isinstance(state, dict):
        return None
    indicator = state.get("poison_indicator")
    if indicator is None:
        return None
    try:
        return int(np.count_nonzero(np.asarray(indicator) == 1))
    except (TypeError, ValueError):
        return None


def read_attack_result(
    obj: dict[str, Any], path: Path, *, dataset: str | None = None
) -> AttackResult:
    """Interpret a loaded ``attack_result.pt``. ``dataset`` (``--normalize``) stands in for a
    missing ``clean_data``, and must agree with a present one."""
    model_name = obj["model_name"]
    if not isinstance(model_name, str):
        raise UserError(f"{path}: BackdoorBench's model_name is {model_name!r}, not a name")
    if model_name not in ARCHITECTURES:
        why = f" ({NOT_OURS[model_name]})" if model_name in NOT_OURS else ""
        raise UserError(
            f"{path} holds a BackdoorBench '{model_name}'{why}, which mesa-tui cannot build; "
            f"supported BackdoorBench architectures: {supported()}"
        )
    num_classes = _integer(obj["num_classes"], "num_classes", path)
    clean = obj.get("clean_data")
    if clean is not None and not isinstance(clean, str):
        raise UserError(f"{path}: BackdoorBench's clean_data is {clean!r}, not a dataset name")
    if clean and dataset and clean != dataset:
        raise UserError(
            f"--normalize {dataset} disagrees with {path}, whose model was trained on '{clean}'; "
            "leave --normalize out"
        )
    name = clean or dataset
    if not name:
        raise UserError(
            f"{path} does not name its dataset (no clean_data); give --normalize with the "
            f"dataset it was trained on ({', '.join(NORMALIZATION)})"
        )
    state = map_state(model_name, obj["model"], path)
    first = state.get("conv1.weight")
    channels = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() == 4 else 3
    size = _image_size(obj.get("img_size"), name, path)
    if name in NORMALIZATION:
        mean, std = NORMALIZATION[name]
    else:
        mean, std = _our_normalization(name, path)
    if len(mean) == 1 and channels > 1:  # one value for every channel, as Normalize broadcasts
        mean, std = mean * channels, std * channels
    provenance = {
        "format": "backdoorbench",
        "model_name": model_name,
        "clean_data": clean,
        "data_path": obj.get("data_path") if isinstance(obj.get("data_path"), str) else None,
        "img_size": list(size) + [channels],
        "poisoned_train": _poisoned(obj.get("bd_train")),
        "poisoned_test": _poisoned(obj.get("bd_test")),
    }
    return AttackResult(
        model_name=model_name,
        arch=ARCHITECTURES[model_name],
        num_classes=num_classes,
        in_channels=channels,
        image_size=size,
        dataset=name,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        state=state,
        provenance=provenance,
    )


def _image_size(value: Any, dataset: str, path: Path) -> tuple[int, int]:
    if value is None:
        if dataset in INPUT_SHAPE:
            return INPUT_SHAPE[dataset][:2]
        from engine.catalog import KNOWN

        if dataset in KNOWN:
            return (KNOWN[dataset].size, KNOWN[dataset].size)
        raise UserError(
            f"{path} has no img_size and '{dataset}' is not a dataset BackdoorBench knows; "
            "the file is damaged"
        )
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise UserError(f"{path}: BackdoorBench's img_size is {value!r}, not (height, width, ...)")
    return (
        _integer(value[0], "img_size height", path),
        _integer(value[1], "img_size width", path),
    )


def _our_normalization(name: str, path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A dataset BackdoorBench does not list (a fork's, or --normalize): mesa-tui's figures."""
    from engine.catalog import KNOWN, dataset_info

    if name in KNOWN:
        return KNOWN[name].mean, KNOWN[name].std
    dataset_info(name)  # one line naming the dataset when mesa-tui has no such dataset
    from engine.ml.data import load_dataset

    data = load_dataset(name)
    return tuple(data.mean), tuple(data.std)
