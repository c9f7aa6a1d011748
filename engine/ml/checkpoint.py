"""Resumable task state: one safetensors file per checkpoint, never a pickle.

A checkpoint holds nested state (state dicts of models and optimisers, random-generator states,
counters, histories) as one safetensors file: every tensor is a safetensors entry, and the
structure around them is JSON in the file's metadata, with each tensor replaced by a reference.
Random-generator states are uint8 tensors, so they fit. The file is written to a temporary name
and renamed, so a checkpoint on disk is always whole.

``load_checkpoint`` refuses anything that is not such a file of the expected kind and
fingerprint (the settings the state is only valid for) with ``CheckpointError``; the tasks then
start again from the beginning and say so. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.reporter import or_null

FORMAT = "mesa-tui-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: damaged, foreign, or made for other settings."""


# ---------------------------------------------------------------------------------------------
# Nested state <-> (JSON skeleton, flat tensors)

_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _DICT)


def pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-safe skeleton of ``obj``; its tensors and arrays go into ``tensors`` (CPU,
    contiguous) under numbered names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        dtype = str(obj.dtype)
        # torch and safetensors lack most unsigned types: keep their values in int64.
        stored = obj.astype(np.int64) if obj.dtype.kind == "u" and obj.itemsize > 1 else obj
        tensors[name] = torch.from_numpy(np.ascontiguousarray(stored)).clone()
        return {_ARRAY: name, "dtype": dtype}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: pack(v, tensors) for k, v in obj.items()}
        return {_DICT: [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``pack``."""
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _ARRAY in skeleton:
            return tensors[skeleton[_ARRAY]].numpy().astype(np.dtype(skeleton["dtype"]))
        if _TUPLE in skeleton:
            return tuple(unpack(v, tensors) for v in skeleton[_TUPLE])
        if _DICT in skeleton:
            return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in skeleton[_DICT]}
        return {k: unpack(v, tensors) for k, v in skeleton.items()}
    return skeleton


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ---------------------------------------------------------------------------------------------
# Files


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def save_checkpoint(
    path: str | Path, kind: str, state: dict[str, Any], fingerprint: Any = None
) -> float:
    """Write ``state`` atomically (temporary file, then rename); returns the seconds it took."""
    started = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind,
        "fingerprint": _canonical(fingerprint),
        "state": json.dumps(skeleton, separators=(",", ":"), allow_nan=True),
    }
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return time.perf_counter() - started


def run_fingerprint(settings: Any, precision: str) -> dict[str, Any]:
    """A task's fingerprint: its settings and the resolved precision, so that a job moved
    between a bf16 and an fp32 machine starts over rather than mixing the two."""
    return {"spec": settings, "precision": precision}


def load_checkpoint(path: str | Path, kind: str, fingerprint: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; ``CheckpointError`` (one line, naming
    the file) when it is damaged, not ours, of another kind or made for other settings."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint {path} is not a mesa-tui checkpoint")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors reports damage in several exception types
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is damaged or not safetensors ({first})"
        ) from None
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(
            f"checkpoint {path} has format version {metadata.get('version')}, this code reads "
            f"{VERSION}"
        )
    if metadata.get("kind") != kind:
        raise CheckpointError(
            f"checkpoint {path} holds a {metadata.get('kind')} state, not a {kind} state"
        )
    if metadata.get("fingerprint") != _canonical(fingerprint):
        raise CheckpointError(
            f"checkpoint {path} was made with other settings"
            + _which_differ(metadata.get("fingerprint"), fingerprint)
        )
    try:
        state = unpack(json.loads(metadata["state"]), tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is damaged (no state)")
    return state


def _which_differ(stored: str | None, fingerprint: Any) -> str:
    """The top-level fingerprint keys that differ, as ' (precision)', when both are mappings."""
    try:
        before = json.loads(stored or "null")
    except ValueError:
        return ""
    if not (isinstance(before, dict) and isinstance(fingerprint, dict)):
        return ""
    now = json.loads(_canonical(fingerprint))
    keys = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
    return f" ({', '.join(keys)})" if keys else ""


def load_or_none(path: str | Path, kind: str, fingerprint: Any, reporter: Any = None):
    """The checkpoint's state, or None when there is none or it cannot be used (then a warning
    says so, and the caller starts from the beginning)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, kind, fingerprint)
    except CheckpointError as exc:
        or_null(reporter).text(f"{exc}; starting from the beginning", "warning")
        return None


# ---------------------------------------------------------------------------------------------
# Random state


def global_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (when present) every CUDA generator's state."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {
            "name": np_state[0],
            "keys": np_state[1],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class Cadence:
    """When to write the next checkpoint: every ``every_steps`` steps when given (tests and
    reproducible layouts), otherwise at most every ``every_s`` seconds and never so often that
    writing costs more than ``max_share`` of the time (the last write's duration decides)."""

    def __init__(
        self, every_steps: int | None = None, every_s: float = 60.0, max_share: float = 0.02
    ):
        self.every_steps = every_steps
        self.every_s = every_s
        self.max_share = max_share
        self._last = time.monotonic()
        self.cost = 0.0  # seconds the last write took

    def due(self, step: int) -> bool:
        if self.every_steps is not None:
            return step % self.every_steps == 0
        wait = max(self.every_s, self.cost / self.max_share)
        return time.monotonic() - self._last >= wait

    def wrote(self, seconds: float) -> None:
        self._last = time.monotonic()
        self.cost = seconds
