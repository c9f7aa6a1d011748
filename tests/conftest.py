"""Shared fixtures. Every test runs with its own data home (``MESA_HOME``), so nothing touches the
user's files. Real-data tests read the CIFAR-10 JPEG copy in ``../shared/data`` (decoded once per
session) or Debian's Fashion-MNIST; they skip with a clear reason where neither exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """A fresh MESA_HOME per test; downloads off (no network here)."""
    home = tmp_path_factory.mktemp("mesa-home")
    monkeypatch.setenv("MESA_HOME", str(home))
    monkeypatch.setenv("MESA_OFFLINE", "1")
    monkeypatch.delenv("MESA_DB", raising=False)
    monkeypatch.delenv("MESA_DATA_ROOT", raising=False)
    return home


@pytest.fixture(scope="session")
def cifar_store(tmp_path_factory) -> Path:
    """The CIFAR-10 JPEG copy decoded once per session; returns the stored safetensors file."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} is not present (CIFAR-10 JPEG copy for real-data tests)")
    home = tmp_path_factory.mktemp("cifar-home")
    old = os.environ.get("MESA_HOME")
    os.environ["MESA_HOME"] = str(home)
    try:
        from engine.ml.data import import_dataset

        info = import_dataset(SHARED_CIFAR, "cifar10")
    finally:
        if old is None:
            os.environ.pop("MESA_HOME", None)
        else:
            os.environ["MESA_HOME"] = old
    return Path(info["path"])


@pytest.fixture
def cifar10(cifar_store, isolated_home) -> str:
    """Make the decoded CIFAR-10 copy available as dataset 'cifar10' in this test's home."""
    from engine import paths

    dest = paths.datasets_dir() / "cifar10.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cifar_store, dest)
    except OSError:
        shutil.copyfile(cifar_store, dest)
    return "cifar10"
