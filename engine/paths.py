"""The engine's directories (datasets, artifacts, caches), inside the homes ``store.paths`` owns.

``data_home``, ``cache_home`` and ``default_db_url`` are the store's, re-exported so the engine
and the faces ask one module for every location.
"""

from __future__ import annotations

from pathlib import Path

from store.environment import setting
from store.paths import cache_home, data_home, default_db_url

__all__ = [
    "artifacts_dir",
    "cache_home",
    "data_home",
    "dataset_cache_dir",
    "datasets_dir",
    "default_db_url",
    "torchvision_root",
]


def datasets_dir() -> Path:
    return data_home() / "datasets"


def artifacts_dir() -> Path:
    return data_home() / "artifacts"


def dataset_cache_dir() -> Path:
    return cache_home() / "datasets"


def torchvision_root() -> Path:
    """Where torchvision datasets are downloaded or expected (``MESA_TUI_DATA_ROOT`` overrides)."""
    if root := setting("MESA_TUI_DATA_ROOT"):
        return Path(root)
    return data_home() / "torchvision"
