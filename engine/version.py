"""The code version recorded with every run and artifact (no torch here)."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    """``<package version>+g<commit>[.dirty]`` inside a git checkout, else the package version."""
    try:
        version = metadata.version("mesa-tui")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                [
                    "git",
                    "-C",
                    str(root),
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    "engine",
                    "store",
                ],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return f"{version}+g{commit}{'.dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version
