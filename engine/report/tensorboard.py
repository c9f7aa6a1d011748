"""TensorBoard export: ``study export NAME --format tensorboard -o DIR`` and
``show JOB --format tensorboard -o DIR``.

One run directory per job, named ``<job id>-<kind>-<label>``, holding one event file with

- every metric series as scalars (tag = the metric key, e.g. ``mesa/beta=0.9/hinge``), each point
  at its step and wall time, all attempts joined as ``Store.metric_series`` joins them (an
  attempt's points up to where the next attempt's begin), so each step appears once;
- each search's trigger grid as an image (tag ``trigger_grid/beta=0.9``, the search artifact's
  ``beta=0.9/grid.png`` as it is; a grid deeper in an artifact keeps its folders,
  ``trigger_grid/residual/beta=0.9``), at the job's last step;
- the job's spec as text (tag ``spec``, JSON in a Markdown code block) and a short summary
  (tag ``job``: kind, status, label, studies, attempts, error).

Events are written with the ``tensorboard`` package's own record writer and protocol buffers (the
optional extra ``mesa-tui[tensorboard]``; imported only here, inside the functions), never with
TensorFlow or torch, so this stays as light as the rest of ``engine.report``. The directory is
written beside DIR and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.errors import UserError
from engine.report.build import writing_beside

INSTALL = "pip install 'mesa-tui[tensorboard]'"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels, as TensorBoard's Summary.Image.colorspace counts them.
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _tb() -> SimpleNamespace:
    """The parts of the ``tensorboard`` package the export uses; one line naming the extra when
    it is not installed."""
    try:
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        raise UserError(
            f"--format tensorboard needs the tensorboard package, which is not installed; "
            f"install it with {INSTALL}"
        ) from None
    return SimpleNamespace(
        Event=event_pb2.Event,
        Summary=summary_pb2.Summary,
        TensorProto=tensor_pb2.TensorProto,
        TensorShapeProto=tensor_shape_pb2.TensorShapeProto,
        DT_STRING=types_pb2.DT_STRING,
        text_metadata=text_metadata,
        RecordWriter=RecordWriter,
    )


def check_available() -> None:
    """Fail early (before any store read) where the extra is missing."""
    _tb()


@dataclass
class RunExport:
    job_id: int
    run: str
    scalars: dict[str, int] = field(default_factory=dict)  # tag -> points
    images: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "run": self.run,
            "scalars": len(self.scalars),
            "points": sum(self.scalars.values()),
            "images": self.images,
            "texts": self.texts,
        }


def run_name(job: Any) -> str:
    """``<id>-<kind>-<label>`` with the label reduced to characters safe in a directory name."""
    label = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", job.label or "").strip("-.")[:80]
    return f"{job.id}-{job.kind}" + (f"-{label}" if label else "")


def export_jobs(store: Any, job_ids: list[int], out: str | Path) -> dict[str, Any]:
    """Write one TensorBoard run per job into ``out`` (a new or empty directory)."""
    tb = _tb()
    final = Path(out).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise UserError(f"-o {final} is a file; give a directory for the TensorBoard runs")
    if final.is_dir() and any(final.iterdir()):
        raise UserError(f"-o {final} is not empty; give a new directory for the TensorBoard runs")
    runs: list[RunExport] = []
    with writing_beside(final, "-o") as tmp:
        for job_id in dict.fromkeys(job_ids):
            runs.append(_export_job(tb, store, job_id, tmp))
        if final.exists():
            final.rmdir()  # empty, checked above
        tmp.rename(final)
    return {"directory": str(final), "runs": [r.to_json() for r in runs]}


class _EventFile:
    """One ``events.out.tfevents.*`` file, written synchronously."""

    def __init__(self, tb: SimpleNamespace, directory: Path):
        directory.mkdir(parents=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self.tb = tb
        self.writer = tb.RecordWriter(open(directory / name, "wb"))
        self.write(tb.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: Any) -> None:
        self.writer.write(event.SerializeToString())

    def summary(self, wall_time: float, step: int, value: Any) -> None:
        self.write(
            self.tb.Event(wall_time=wall_time, step=step, summary=self.tb.Summary(value=[value]))
        )

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _export_job(tb: SimpleNamespace, store: Any, job_id: int, root: Path) -> RunExport:
    detail = store.job_detail(job_id)
    job = detail.job
    run = RunExport(job_id, run_name(job))
    events = _EventFile(tb, root / run.run)
    try:
        last_step, last_time = 0, _timestamp(job.updated_at)
        for key in store.metric_keys(job_id):
            series = store.metric_series(job_id, key)
            for p in series:
                events.summary(
                    p.wall_time, p.step, tb.Summary.Value(tag=key, simple_value=float(p.value))
                )
                last_step = max(last_step, p.step)
            run.scalars[key] = len(series)
        for tag, png in _grids(detail):
            image = _png_image(tb, png)
            if image is not None:
                events.summary(last_time, last_step, tb.Summary.Value(tag=tag, image=image))
                run.images.append(tag)
        spec = json.dumps(job.spec, indent=2, sort_keys=True, default=str)
        texts = {
            "spec": f"```json\n{spec}\n```",
            "job": "\n".join(
                f"- {name}: {value}"
                for name, value in (
                    ("job", job.id),
                    ("kind", job.kind),
                    ("label", job.label),
                    ("status", job.status),
                    ("studies", ", ".join(job.studies) or "-"),
                    ("attempts", f"{job.attempts}/{job.max_attempts}"),
                    ("spec hash", job.spec_hash),
                    ("error", job.error or "-"),
                )
            ),
        }
        for tag, text in texts.items():
            events.summary(last_time, 0, _text(tb, tag, text))
            run.texts.append(tag)
    finally:
        events.close()
    return run


def _timestamp(when: Any) -> float:
    return when.timestamp() if when is not None else time.time()


def _text(tb: SimpleNamespace, tag: str, text: str) -> Any:
    return tb.Summary.Value(
        tag=tag,
        metadata=tb.text_metadata.create_summary_metadata(display_name=tag, description=""),
        tensor=tb.TensorProto(
            dtype=tb.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tb.TensorShapeProto(),
        ),
    )


def _grids(detail: Any) -> list[tuple[str, Path]]:
    """(tag, path) of every ``beta=*/grid.png`` under the job's artifact directories."""
    directories = [Path(a.path) for a in detail.artifacts]
    chosen = (detail.result or {}).get("artifact")
    if chosen:
        directories.append(Path(chosen))
    found: dict[str, Path] = {}
    for directory in dict.fromkeys(directories):
        if not directory.is_dir():
            continue
        for png in sorted(directory.glob("**/beta=*/grid.png")):
            found.setdefault(f"trigger_grid/{png.parent.relative_to(directory).as_posix()}", png)
    return list(found.items())


def _png_image(tb: SimpleNamespace, path: Path) -> Any | None:
    """A Summary.Image of the PNG as it is (its size from the IHDR chunk); None if not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return tb.Summary.Image(
        height=height,
        width=width,
        colorspace=PNG_CHANNELS.get(data[25], 3),
        encoded_image_string=data,
    )
