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


def trigger_size(spec: str, read_files: bool = False) -> int | None:
    """Side of the patch; for files read from the PNG or .npy header when ``read_files``."""
    kind, _, arg = spec.partition(":")
    if kind in ("bw", "color", "square"):
        return 3
    if kind == "file" and read_files:
        path = Path(arg).expanduser()
        try:
            if path.suffix.lower() == ".npy":
                import numpy as np

                shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
                return int(
                    max(shape[-2:]) if len(shape) == 3 and shape[0] in (1, 3) else max(shape[:2])
                )
            from PIL import Image

            with Image.open(path) as img:
                return int(max(img.size))
        except Exception:
            return None  # the task reads it properly and says what is wrong
    return None
