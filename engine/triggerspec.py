"""Trigger spec syntax (``bw:170``, ``color:3``, ``square:white``, ``file:PATH``), without torch."""

from __future__ import annotations

import re
from pathlib import Path

SPEC_HELP = "use bw:ID (0..511), color:SEED, square:white or file:PATH"
KINDS = ("bw", "color", "square", "file")


def check_trigger_syntax(spec: str) -> str:
    """Raise ValueError naming the bad spec and the fix; return the spec unchanged when valid."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"trigger '{spec}' is not a known kind; {SPEC_HELP}")
    if kind in ("bw", "color") and not re.fullmatch(r"\d+", arg):
        raise ValueError(f"trigger '{spec}' needs a number after '{kind}:'; {SPEC_HELP}")
    if kind == "bw" and not 0 <= int(arg) <= 511:
        raise ValueError(f"bw trigger id {arg} is out of range; use an id in 0..511")
    if kind == "square" and arg not in ("white", "black"):
        raise ValueError(f"trigger '{spec}' is unknown; use square:white or square:black")
    if kind == "file" and not Path(arg).expanduser().exists():
        raise ValueError(
            f"trigger file '{arg}' does not exist; give the path of a PNG or .npy file"
        )
    return spec


def trigger_size(spec: str) -> int | None:
    """Side of the square patch, when known without reading pixels (None for files)."""
    kind = spec.partition(":")[0]
    return 3 if kind in ("bw", "color", "square") else None
