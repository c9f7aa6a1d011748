"""Shared fixtures. Every test runs with its own data home (``MESA_TUI_HOME``), so nothing touches the
user's files. Real-data tests read the CIFAR-10 JPEG copy in ``../shared/data`` (decoded once per
session) or Debian's Fashion-MNIST; they skip with a clear reason where neither exists."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from store.environment import RENAMED

ROOT = Path(__file__).resolve().parent.parent

# `make test` runs one worker per core (pytest-xdist). Each worker and every process it starts
# then gets one torch thread: a second thread per worker only oversubscribes the cores, and torch's
# spinning threads slow a run several times over when they outnumber them. Set before any test
# module imports torch; a test that needs another count sets it itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("MESA_TUI_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """A fresh MESA_TUI_HOME per test; downloads off (no network here)."""
    home = tmp_path_factory.mktemp("mesa-home")
    monkeypatch.setenv("MESA_TUI_HOME", str(home))
    monkeypatch.setenv("MESA_TUI_OFFLINE", "1")
    monkeypatch.delenv("MESA_TUI_DB", raising=False)
    monkeypatch.delenv("MESA_TUI_DATA_ROOT", raising=False)
    for old in RENAMED.values():  # a profile's old names must not reach the user's files
        monkeypatch.delenv(old, raising=False)
    return home


@pytest.fixture(scope="session")
def cifar_store(tmp_path_factory) -> Path:
    """The CIFAR-10 JPEG copy decoded once per session; returns the stored safetensors file."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} is not present (CIFAR-10 JPEG copy for real-data tests)")
    home = tmp_path_factory.mktemp("cifar-home")
    old = os.environ.get("MESA_TUI_HOME")
    os.environ["MESA_TUI_HOME"] = str(home)
    try:
        from engine.ml.data import import_dataset

        info = import_dataset(SHARED_CIFAR, "cifar10")
    finally:
        if old is None:
            os.environ.pop("MESA_TUI_HOME", None)
        else:
            os.environ["MESA_TUI_HOME"] = old
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


# ------------------------------------------------------------------------------------------------
# The store under test: SQLite, and PostgreSQL where its server binaries are installed.

_POSTGRES: dict = {"server": None, "reason": None, "tests": 0}


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL cluster on loopback for the session (see tests/postgres.py)."""
    from tests.postgres import PostgresServer, find_bindir

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _POSTGRES["reason"] = "psycopg is not installed (pip install -e '.[postgres]')"
        pytest.skip(_POSTGRES["reason"])
    bindir = find_bindir()
    if bindir is None:
        _POSTGRES["reason"] = (
            "no PostgreSQL server binaries (initdb, pg_ctl); `make test-services` installs them"
        )
        pytest.skip(_POSTGRES["reason"])
    server = PostgresServer(bindir)
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    _POSTGRES["server"] = server
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request, isolated_home, monkeypatch) -> str:
    """The URL of a fresh store, also set as ``MESA_TUI_DB`` (engines started by the test inherit
    it): a SQLite file in the test's home, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{isolated_home / 'data' / 'mesa.db'}"
        monkeypatch.setenv("MESA_TUI_DB", url)
        yield url
        return
    server = request.getfixturevalue("postgres_server")
    name = server.create_database()
    _POSTGRES["tests"] += 1
    url = server.url(name)
    monkeypatch.setenv("MESA_TUI_DB", url)
    yield url
    server.drop_database(name)


def pytest_terminal_summary(terminalreporter):
    server = _POSTGRES["server"]
    if server is not None:
        terminalreporter.write_line(
            f"postgresql: {_POSTGRES['tests']} test(s) ran against PostgreSQL {server.version} "
            f"({server.bindir}, port {server.port})"
        )
    elif _POSTGRES["reason"]:
        terminalreporter.write_line(f"postgresql: not run ({_POSTGRES['reason']})")
    sweep = sys.modules.get("tests.engine.test_crash_sweep")
    for line in getattr(sweep, "SUMMARY", ()):  # the kill instants the crash sweep covered
        terminalreporter.write_line(line)
