"""Damaged and unusable stores for the tests: each maker writes one case at a path and returns
the words its one-line error must contain (shared by the CLI, engine and app tests)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store.entities import NewJob
from store.repository import Store

PAGE = 4096


def healthy_store(path: Path, jobs: int = 60) -> Path:
    """A real store with jobs (WAL mode, as every store), checkpointed into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{path}")
    store.submit(
        [
            NewJob("train", {"i": i, "pad": "x" * 400}, f"h{i}", label=f"job {i}")
            for i in range(jobs)
        ]
    )
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert not path.with_name(path.name + "-wal").exists()
    return path


def garbage(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def random_bytes(path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(garbage(8 * PAGE))
    return [str(path), "is not an SQLite database"]


def header_then_garbage(path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SQLite format 3\x00" + garbage(8 * PAGE - 16))
    return [str(path), "is not an SQLite database"]


def malformed_pages(path: Path) -> list[str]:
    """Every page after the first (the schema) overwritten: any table read fails."""
    healthy_store(path)
    data = bytearray(path.read_bytes())
    data[PAGE:] = garbage(len(data) - PAGE, seed=1)
    path.write_bytes(bytes(data))
    return [str(path), "is damaged", "malformed"]


def truncated(path: Path) -> list[str]:
    healthy_store(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return [str(path), "is damaged", "malformed"]


def newer_schema(path: Path) -> list[str]:
    healthy_store(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.commit()
    conn.close()
    return [str(path), "uses schema 9999", "upgrade mesa-tui"]


def a_directory(path: Path) -> list[str]:
    path.mkdir(parents=True)
    return [str(path), "is a directory"]


def unwritable_directory(path: Path) -> list[str]:
    healthy_store(path)
    make_unwritable(path.parent)
    return [str(path), f"its directory {path.parent} is not writable"]


def read_only_file(path: Path) -> list[str]:
    healthy_store(path)
    make_unwritable(path)
    return [str(path), "is read-only"]


def index_damage(path: Path) -> list[str]:
    """Sound pages, but an index that does not match its table (integrity_check finds it; the
    commands that read the rows do not)."""
    healthy_store(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX ix_jobs_updated_at ON jobs (kind)' "
        "WHERE name = 'ix_jobs_updated_at'"
    )
    conn.commit()
    conn.close()
    return [str(path), "is damaged", "missing from index ix_jobs_updated_at", "REINDEX"]


# ------------------------------------------------------------------------------------------------
# Unwritable places, also as root (root ignores permission bits; an immutable inode stops it)

_LOCKED: list[Path] = []


def make_unwritable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
        _LOCKED.append(path)
        return
    out = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed ({out.stderr.strip()})")
    _LOCKED.append(path)


def release_unwritable() -> None:
    while _LOCKED:
        path = _LOCKED.pop()
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def released() -> Iterator[None]:
    try:
        yield
    finally:
        release_unwritable()


CASES: dict[str, Callable[[Path], list[str]]] = {
    "random-bytes": random_bytes,
    "header-then-garbage": header_then_garbage,
    "malformed-pages": malformed_pages,
    "truncated": truncated,
    "newer-schema": newer_schema,
    "a-directory": a_directory,
    "unwritable-directory": unwritable_directory,
    "read-only-file": read_only_file,
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its hash (to prove a refusal wrote nothing)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


def copy_store(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
