"""The child process of one run: ``python -m engine.runner --events-fd N``.

The engine writes one JSON line on stdin (the launch: kind, spec with inputs resolved, work
directory, resume flag, run id), then may write ``stop``. The child never touches the store: it
runs the task and streams JSON lines to the events pipe, one object per line, field ``t`` =

- ``started``: first thing, before the heavy imports (queue latency is measured to this event);
- ``env``: seed, code version, torch and CUDA versions, device name, dataset hash, import time;
- ``metrics``: ``points`` = [[key, step, value, wall_time], ...] (buffered, flushed in batches;
  each batch is appended to the work directory's metric journal before it is sent, and a resumed
  attempt first re-sends the whole journal in batches marked ``replay``);
- ``checkin``: ``within`` seconds until the next sign of life;
- ``artifact``: path, kind, sha256 of its manifest, bytes; ``log``: level, msg; ``progress``;
- ``status``: succeeded | failed | cancelled, with the TaskResult JSON or the error.

Standard output and error go to the run's log file, so a stray print cannot break the stream.
Test-only task kinds come from ``MESA_TUI_TASK_MODULES`` ("kind=module,kind=module"); such a module
has ``Spec`` and ``run``. Test-only crash points come from ``MESA_TUI_TEST_CRASH`` (engine.crashpoints).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Metric points are flushed at least this often, or when this many are waiting.
FLUSH_INTERVAL_S = 0.05
FLUSH_POINTS = 5000
PROGRESS_INTERVAL_S = 0.5
# The promise made for the task before it checks in itself (dataset loading, model building).
DEFAULT_CHECKIN_S = 600.0
# After the engine vanished (stdin closed), the task gets this long to stop before the child exits.
ORPHAN_GRACE_S = 10.0
# The metric journal in the job's work directory (stable across attempts), and how many of its
# points a replayed batch carries.
JOURNAL = "metrics.journal"
REPLAY_POINTS = 5000


class EventStream:
    """Thread-safe writer of JSON lines to the events pipe; a broken pipe means the engine died."""

    def __init__(self, fd: int):
        self._file = os.fdopen(fd, "w", buffering=1 << 16)
        self._lock = threading.Lock()
        self.broken = threading.Event()
        self.sent = 0
        self.crash: Any = None  # engine.crashpoints.ChildCrash in a test that sets one

    def send(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), allow_nan=True) + "\n"
        with self._lock:
            if self.broken.is_set():
                return
            try:
                self._file.write(line)
                self._file.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.broken.set()
                return
            self.sent += 1
            if self.crash is not None:
                self.crash.sent(self.sent, event)

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._file.close()


class MetricJournal:
    """Every metric batch an engine attempt computed, one JSON line each, in the job's work
    directory (``metrics.journal``). A batch is appended, and handed to the OS, before it is sent
    to the engine, and a task checkpoints only after its metrics were flushed: so whatever a
    checkpoint passed is in the journal even when the engine died before it stored the points.
    A resumed attempt re-sends the journal before the task runs (``replay``); the store keeps
    the last write of a (key, step), so the steps computed again after the checkpoint replace
    the replayed ones. A first attempt starts it empty. No fsync: it protects against killed
    processes, not against a power cut."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        if not resume:
            path.write_bytes(b"")
        elif path.exists():
            self._cut_partial_line()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the run)

    def _cut_partial_line(self) -> None:
        """A process killed in the middle of an append leaves a partial last line: drop it (its
        points were neither sent nor passed by a checkpoint)."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            keep, pos = 0, size
            while pos > 0 and not keep:
                start = max(0, pos - (1 << 16))
                f.seek(start)
                chunk = f.read(pos - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                pos = start
            f.truncate(keep)

    def append(self, points: list[list[Any]]) -> None:
        self._file.write(json.dumps(points, separators=(",", ":"), allow_nan=True) + "\n")
        self._file.flush()

    def batches(self) -> Iterator[list[list[Any]]]:
        """The journal's batches in the order they were written (unreadable lines skipped)."""
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    points = json.loads(line)
                except ValueError:
                    continue
                if isinstance(points, list):
                    yield points

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


class RunnerReporter:
    """The engine's reporter: every call becomes an event; metrics are buffered and journaled."""

    def __init__(
        self,
        stream: EventStream,
        workdir: Path,
        resume: bool,
        stop: threading.Event,
        orphaned: threading.Event,
        crash: Any = None,
    ):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self._stream = stream
        self._stop = stop
        self._orphaned = orphaned
        self._crash = crash
        self._journal = MetricJournal(workdir / JOURNAL, resume)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # journal order = send order
        self._points: list[list[Any]] = []
        self._last_flush = time.monotonic()
        self._last_progress = 0.0
        self._stage: tuple[str, float, int] | None = None  # (stage, first seen, done then)
        self._stage_started: float | None = None

    def _check_engine(self) -> None:
        """Without an engine nothing more is recorded: stop the task (a retry resumes from its
        checkpoint and replays the journal, so no work done after this would count)."""
        if self._orphaned.is_set() or self._stream.broken.is_set():
            from engine.errors import Cancelled

            raise Cancelled("the engine went away")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._check_engine()
        now = time.time()
        with self._lock:
            for key, value in metrics.items():
                self._points.append([key, int(step), float(value), now])
            due = (
                len(self._points) >= FLUSH_POINTS
                or time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S
            )
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            points, self._points = self._points, []
            self._last_flush = time.monotonic()
        if points:
            with self._send_lock:
                self._journal.append(points)
                if self._crash is not None:
                    self._crash.journaled(points)
                self._stream.send({"t": "metrics", "points": points})

    def replay(self) -> int:
        """Re-send the journal of the earlier attempts (before the task logs anything); returns
        how many points were sent."""
        sent = 0
        chunk: list[list[Any]] = []
        for points in self._journal.batches():
            chunk.extend(points)
            if len(chunk) >= REPLAY_POINTS:
                self._stream.send({"t": "metrics", "points": chunk, "replay": True})
                sent += len(chunk)
                chunk = []
        if chunk:
            self._stream.send({"t": "metrics", "points": chunk, "replay": True})
            sent += len(chunk)
        return sent

    def close(self) -> None:
        self._journal.close()

    def check_in(self, next_within_s: float) -> None:
        self._check_engine()
        self.flush()
        self._stream.send({"t": "checkin", "within": float(next_within_s)})

    def artifact(self, path: str | Path, kind: str) -> None:
        self._check_engine()
        self.flush()
        path = Path(path).resolve()
        sha, size = artifact_identity(path)
        self._stream.send(
            {"t": "artifact", "path": str(path), "kind": kind, "sha256": sha, "bytes": size}
        )

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def text(self, message: str, level: str = "info") -> None:
        self._stream.send({"t": "log", "level": level, "msg": str(message), "time": time.time()})

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        now = time.monotonic()
        if done < total and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        wall = time.time()
        self._stream.send(
            {
                "t": "progress",
                "stage": stage,
                "done": int(done),
                "total": int(total),
                "info": {k: float(v) for k, v in (info or {}).items()},
                "time": wall,
                "started": self._stage_start(stage, int(done), wall),
            }
        )

    def _stage_start(self, stage: str, done: int, wall: float) -> float | None:
        """When the stage would have started at its present pace (for the ETA): the time it was
        first seen when that was at step 0; for a stage first seen part-way (a resumed attempt),
        extrapolated back from the pace between its first two reports."""
        if self._stage is None or self._stage[0] != stage or done < self._stage[2]:
            self._stage = (stage, wall, done)
            self._stage_started = wall if done == 0 else None
        elif self._stage_started is None and done > self._stage[2] and wall > self._stage[1]:
            pace = (done - self._stage[2]) / (wall - self._stage[1])
            self._stage_started = wall - done / pace
        return self._stage_started


def artifact_identity(path: Path) -> tuple[str | None, int]:
    """(sha256 of the manifest, total bytes): the manifest lists every file's hash, so its own
    hash identifies the artifact's content."""
    import hashlib

    manifest = path / "manifest.json" if path.is_dir() else path
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    if path.is_dir():  # a task's work directory may be its artifact: the journal is not part of it
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p != path / JOURNAL)
    else:
        size = path.stat().st_size if path.exists() else 0
    return sha, size


def extra_task_modules() -> dict[str, str]:
    """Kinds registered through ``MESA_TUI_TASK_MODULES`` (used by tests and benchmarks)."""
    out = {}
    for item in os.environ.get("MESA_TUI_TASK_MODULES", "").split(","):
        kind, _, module = item.partition("=")
        if kind.strip() and module.strip():
            out[kind.strip()] = module.strip()
    return out


def load_task(kind: str) -> tuple[Any, type]:
    """The task module and its spec class for a job kind."""
    extra = extra_task_modules()
    if kind in extra:
        module = importlib.import_module(extra[kind])
        return module, module.Spec
    from engine.specs import SPEC_CLASSES

    module = importlib.import_module(f"engine.tasks.{kind}")
    return module, SPEC_CLASSES[kind]


def dataset_hash(name: str | None) -> str | None:
    """The content hash stored with a decoded dataset (None before it was ever decoded)."""
    if not name:
        return None
    from engine import catalog

    try:
        candidates = [catalog.cache_path(name)]
        if not name.startswith("imagefolder:"):
            candidates.insert(0, catalog.imported_path(name))
    except Exception:
        return None
    for path in candidates:
        if path.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="numpy") as f:
                    return (f.metadata() or {}).get("sha256")
            except Exception:
                return None
    return None


def model_dataset_hash(model_dir: str | None) -> str | None:
    """The dataset hash a model artifact was trained on (searches and repairs inherit it)."""
    if not model_dir:
        return None
    try:
        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return (manifest.get("meta") or {}).get("dataset_sha256")


def environment(spec: Any) -> dict[str, Any]:
    """Where and with what the run ran (torch is imported here, in the child only)."""
    from engine.version import code_version

    env: dict[str, Any] = {
        "seed": getattr(spec, "seed", None),
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "host": os.uname().nodename,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "dataset_hash": dataset_hash(getattr(spec, "dataset", None))
        or model_dataset_hash(getattr(spec, "model", None)),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda or ""
        device = getattr(spec, "device", "auto")
        if torch.cuda.is_available() and device != "cpu":
            index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
            env["device_name"] = torch.cuda.get_device_name(index)
        else:
            env["device_name"] = "cpu"
    return env


def peak_memory() -> dict[str, float]:
    """Peak memory of this run's process, as metrics: resident set (``resource/peak_rss_mb``)
    and, when the task used CUDA, torch's peak allocation (``resource/peak_cuda_mb``)."""
    import resource

    out = {"resource/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["resource/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def watch_stdin(stop: threading.Event, orphaned: threading.Event) -> None:
    """``stop`` lines ask the task to stop; end of input means the engine is gone."""
    for line in sys.stdin:
        if line.strip() == "stop":
            stop.set()
    orphaned.set()
    stop.set()


def exit_when_orphaned(orphaned: threading.Event) -> None:
    """A task that ignores the stop request after its engine died must not keep running: a new
    engine retries the job in the same work directory."""
    orphaned.wait()
    time.sleep(ORPHAN_GRACE_S)
    os._exit(4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.runner")
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    stream = EventStream(args.events_fd)
    stream.send({"t": "started", "pid": os.getpid(), "time": time.time(), "t0": PROCESS_START})
    launch = json.loads(sys.stdin.readline())
    from engine import crashpoints

    crash = crashpoints.child_side(launch)
    if crash is not None:
        stream.crash = crash
        crash.sent(stream.sent, {"t": "started"})  # the events sent before it was known
    stop, orphaned = threading.Event(), threading.Event()
    threading.Thread(target=watch_stdin, args=(stop, orphaned), daemon=True).start()
    threading.Thread(target=exit_when_orphaned, args=(orphaned,), daemon=True).start()

    status, result, error = "failed", None, None
    reporter = None
    try:
        import_start = time.time()
        module, spec_class = load_task(launch["kind"])
        if launch["kind"] not in extra_task_modules():
            import torch  # noqa: F401  (the task needs it anyway; its versions are recorded)

        spec = spec_class(**launch["spec"])
        imports_s = time.time() - import_start
        env = environment(spec)
        env["imports_s"] = round(imports_s, 3)
        env["startup_s"] = round(time.time() - PROCESS_START, 3)
        stream.send({"t": "env", "env": env})
        stream.send({"t": "checkin", "within": DEFAULT_CHECKIN_S})
        reporter = RunnerReporter(
            stream, Path(launch["workdir"]), bool(launch["resume"]), stop, orphaned, crash
        )
        if launch.get("resume"):
            replayed = reporter.replay()
            reporter.text(
                f"attempt {launch.get('attempt')}: resuming in {reporter.workdir} "
                f"({replayed} metric points replayed from {JOURNAL})"
            )
        task_result = module.run(spec, reporter)
        reporter.flush()
        result = task_result.to_json()
        status = "succeeded"
    except BaseException as exc:  # the child reports every ending, then exits
        from engine.errors import Cancelled, UserError

        if reporter is not None:
            reporter.flush()
        if isinstance(exc, Cancelled | KeyboardInterrupt):
            status, error = "cancelled", "cancelled by request"
            if orphaned.is_set():
                error = "engine went away"
        elif isinstance(exc, UserError):
            error = str(exc)
        else:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
    if reporter is not None:
        with contextlib.suppress(BaseException):  # the engine may be gone; the status still goes
            reporter.log(peak_memory(), 0)
            reporter.flush()
        reporter.close()
    stream.send({"t": "status", "status": status, "result": result, "error": error})
    stream.close()
    sys.stdout.flush()
    sys.stderr.flush()
    return {"succeeded": 0, "cancelled": 3}.get(status, 1)


if __name__ == "__main__":
    raise SystemExit(main())
