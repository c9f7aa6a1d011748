"""Trigger spec syntax (``bw:170``, ``color:3``, ``square:white``, ``file:PATH``), without torch."""

from __future__ import annotations

import re
from pathlib import Path

SPEC_HELP = "use bw:ID (0..511), color:SEED, square:white or file:PATH"
KINDS = ("bw", "color", "square", "file")


def check_trigger_syntax(spec: str) -> str:
    """Raise ValueError saying what is wrong and the fix (the caller names the value); return the
    spec unchanged when valid."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"not a known kind; {SPEC_HELP}")
    if kind in ("bw", "color") and not re.fullmatch(r"\d+", arg):
        raise ValueError(f"needs a number after '{kind}:'; {SPEC_HELP}")
    if kind == "bw" and not 0 <= int(arg) <= 511:
        raise ValueError(f"bw trigger id {arg} is out of range; use an id in 0..511")
    if kind == "square" and arg not in ("white", "black"):
        raise ValueError("use square:white or square:black")
    if kind == "file" and not Path(arg).expanduser().exists():
        raise ValueError(
            f"trigger file '{arg}' does not exist; give the path of a PNG or .npy file"
        )
    return spec


def trigger_kind(spec: str | None) -> str | None:
    """The kind of a trigger spec (``bw:170`` -> ``"bw"``, ``file:/t.png`` -> ``"file"``), or None
    for no trigger or text of no known kind. The arguments are not checked
    (``check_trigger_syntax`` does that)."""
    if not isinstance(spec, str):
        return None
    kind, colon, _ = spec.partition(":")
    return kind if colon and kind in KINDS else None


AT_PATTERN = re.compile(r"at:(\d+),(\d+)")


def parse_at_placement(mode: str) -> tuple[int, int] | None:
    """(row, col) of an ``at:ROW,COL`` placement (a fixed top-left offset), else None."""
    match = AT_PATTERN.fullmatch(mode.replace(" ", "")) if isinstance(mode, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_placement_syntax(mode: str) -> str:
    """A training placement: per-image, per-batch, corner or at:ROW,COL; ValueError otherwise
    (the caller names the value)."""
    if mode in ("per-image", "per-batch", "corner"):
        return mode
    at = parse_at_placement(mode)
    if at is None:
        raise ValueError(
            "use per-image, per-batch, corner or at:ROW,COL (the patch's top-left pixel, e.g. "
            "at:8,8)"
        )
    return f"at:{at[0]},{at[1]}"


def trigger_size(spec: str, read_files: bool = False) -> int | None:
    """Side of the patch; for a file, when ``read_files``, read as training reads it (a file it
    cannot use raises ``UserError``, so submitting refuses it instead of the job failing)."""
    kind, _, _ = spec.partition(":")
    if kind in ("bw", "color", "square"):
        return 3
    if kind == "file" and read_files:
        return int(pattern_array(spec).shape[-1])
    return None


def absolute_trigger(spec: str) -> str:
    """``file:t.npy`` -> ``file:/dir/t.npy``: a job reads it later, from the engine's directory."""
    kind, _, arg = spec.partition(":")
    return f"file:{Path(arg).expanduser().absolute()}" if kind == "file" else spec


def pattern_array(spec: str, channels: int = 3):
    """The pixels of a trigger spec as a float32 numpy array ``(C, k, k)`` in [0, 1] (no torch, so
    reports draw the same pixels training stamps). ``bw:ID``: row-major bits, most significant bit
    top left; ``color:SEED``: ``randint(0, 256, (C, 3, 3)) / 256`` from
    ``numpy.random.default_rng(SEED)``; ``square:white|black``; ``file:PATH`` (.npy or an image,
    HxW, HxWxC or CxHxW, converted to ``channels``). Raises ``UserError`` naming the fix."""
    import numpy as np

    from engine.errors import UserError

    kind, _, arg = spec.partition(":")
    if kind in ("bw", "color") and not re.fullmatch(r"\d+", arg):
        what = "id" if kind == "bw" else "seed"
        raise UserError(f"trigger '{spec}' needs a numeric {what}; {SPEC_HELP}")
    if kind == "bw":
        if not 0 <= int(arg) <= 511:
            raise UserError(f"bw trigger id {arg} is out of range; use an id in 0..511")
        bits = [(int(arg) >> (8 - i)) & 1 for i in range(9)]
        grid = np.asarray(bits, dtype=np.float32).reshape(1, 3, 3)
        return np.repeat(grid, channels, axis=0)
    if kind == "color":
        rng = np.random.default_rng(int(arg))
        return (rng.integers(0, 256, size=(channels, 3, 3)) / 256.0).astype(np.float32)
    if kind == "square":
        if arg not in ("white", "black"):
            raise UserError(f"trigger '{spec}' is unknown; use square:white or square:black")
        return np.full((channels, 3, 3), 1.0 if arg == "white" else 0.0, dtype=np.float32)
    if kind == "file":
        return _file_array(Path(arg).expanduser(), channels)
    raise UserError(f"trigger '{spec}' is not a known kind; {SPEC_HELP}")


def _file_array(path: Path, channels: int):
    import numpy as np

    from engine.errors import UserError

    array = _read_file(path, channels)
    shape = array.shape
    if array.ndim == 2:
        array = np.repeat(array[None], channels, axis=0)
    elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise UserError(
            f"trigger file {path} has shape {shape}; it must be a square k x k patch "
            "(HxW, HxWxC or CxHxW)"
        )
    if array.shape[0] == 1 and channels == 3:
        array = np.repeat(array, 3, axis=0)
    if array.shape[0] == 3 and channels == 1:
        array = array.mean(axis=0, keepdims=True)
    return np.clip(array, 0.0, 1.0).astype(np.float32)


def _read_file(path: Path, channels: int):
    """The file's pixels in [0, 1] as float32, in the file's own layout."""
    import numpy as np

    from engine.errors import UserError

    if not path.exists():
        raise UserError(f"trigger file {path} does not exist; give the path of a PNG or .npy file")
    if not path.is_file():
        raise UserError(f"trigger file {path} is not a file; give the path of a PNG or .npy file")
    npy = path.suffix.lower() == ".npy"
    try:
        if npy:
            array = np.load(path, allow_pickle=False).astype(np.float32)
            return array / 255.0 if array.size and array.max() > 1.0 else array
        from PIL import Image

        with Image.open(path) as img:
            pixels = img.convert("L" if channels == 1 else "RGB")
            return np.asarray(pixels, dtype=np.float32) / 255.0
    except (OSError, ValueError, TypeError):
        what = "a numeric .npy array" if npy else "an image"
        raise UserError(
            f"trigger file {path} is not {what} that can be read; give a PNG or .npy file"
        ) from None
