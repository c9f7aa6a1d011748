"""What the terminal app reads and writes, behind one small protocol.

The app never touches the database: a thread worker calls a ``DataSource`` and posts the result
as a message. ``StoreSource`` adapts ``store.repository``; ``FakeSource`` is scripted and runs on a
frozen clock, so Pilot tests and snapshots are deterministic. Values handed to the UI are the
frozen dataclasses below (plain values, never ORM rows).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
FINISHED = frozenset({"succeeded", "failed", "cancelled", "lost"})
RETRYABLE = frozenset({"failed", "cancelled", "lost"})
BETA_KEY = re.compile(r"^(?P<stage>[^/]+)/beta=(?P<beta>[^/]+)/(?P<name>.+)$")


class SourceError(Exception):
    """An expected refusal (unknown job, job still running, ...) shown to the user as a notice."""


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class JobRow:
    """One line of the jobs table."""

    id: int
    kind: str
    status: str
    created_at: datetime
    updated_at: datetime
    study: str | None = None
    trigger: str | None = None
    progress: float | None = None  # 0..1 of the current stage
    stage: str | None = None
    eta_s: float | None = None
    acc_clean: float | None = None
    asr: float | None = None
    loss_tail: tuple[float, ...] = ()
    label: str | None = None  # as ``mesa-tui ls`` shows it
    method: str | None = None  # what tells a pipeline's rows apart: "point #3", "mesa-0.9", ...


@dataclass(frozen=True)
class JobQuery:
    """The jobs table's filter; ``None`` means any."""

    statuses: frozenset[str] | None = None
    kind: str | None = None
    study: str | None = None

    def matches(self, row: JobRow) -> bool:
        return (
            (self.statuses is None or row.status in self.statuses)
            and (self.kind is None or row.kind == self.kind)
            and (self.study is None or row.study == self.study)
        )

    def describe(self) -> str:
        parts = []
        if self.statuses:
            parts.append("status " + ",".join(sorted(self.statuses)))
        if self.kind:
            parts.append(f"kind {self.kind}")
        if self.study:
            parts.append(f"study {self.study}")
        return "; ".join(parts) or "all jobs"


@dataclass(frozen=True)
class JobsPage:
    """Rows changed since the cursor (and every running job); ``ids`` lists every matching job
    when the read was a full one (then rows not in it are gone), else None."""

    rows: tuple[JobRow, ...]
    ids: frozenset[int] | None
    cursor: datetime | None


@dataclass(frozen=True)
class RunInfo:
    """One attempt of a job."""

    id: int
    attempt: int
    status: str
    executor: str = "local"
    host: str | None = None
    gpu: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    heartbeat_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    seed: int | None = None
    code_version: str | None = None


@dataclass(frozen=True)
class ArtifactInfo:
    id: int
    run_id: int
    kind: str
    path: str
    sha256: str | None
    bytes: int | None


@dataclass(frozen=True)
class JobDetail:
    """Everything the run screen shows that is not a metric series or a log line."""

    job: JobRow
    spec: Mapping[str, Any]
    runs: tuple[RunInfo, ...] = ()
    artifacts: tuple[ArtifactInfo, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    latest: Mapping[str, float] = field(default_factory=dict)
    depends_on: tuple[int, ...] = ()
    workdir: str | None = None
    error: str | None = None

    @property
    def run_ids(self) -> tuple[int, ...]:
        return tuple(r.id for r in self.runs)


@dataclass(frozen=True, slots=True)
class MetricPoint:
    id: int
    run_id: int
    key: str
    step: int
    value: float


HISTORY_POINTS = 1000  # a series' history is read as at most 2x this many points (min and max)


@dataclass(frozen=True)
class MetricHistory:
    """A job's series as the store had them at ``cursor`` (the largest point id then), each
    downsampled to a few points per pixel; newer points come from ``metric_points(.., cursor)``."""

    cursor: int
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]  # key -> (steps, values)
    count: int = 0  # stored points the series stand for


@dataclass(frozen=True)
class LogLine:
    id: int
    run_id: int
    time: datetime
    level: str
    message: str


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    util_pct: float | None = None


@dataclass(frozen=True)
class EngineStatus:
    alive: bool
    host: str | None = None
    pid: int | None = None
    slots_total: int = 0
    slots_busy: int = 0
    gpus: tuple[GpuInfo, ...] = ()
    heartbeat_at: datetime | None = None


@dataclass(frozen=True)
class StudyCell:
    asr: float | None
    acc_clean: float | None = None
    job_id: int | None = None


@dataclass(frozen=True)
class StudySummary:
    """ASR after repair per trigger (rows) and method (columns), with the job behind each cell.
    ``statistics``: the study's table from ``engine.report.study_stats`` (the one `study show`
    prints), None where no repair wrote per-image outcomes; where it has a method, that method's
    mean, interval and worst come from it (implanted triggers only)."""

    name: str
    methods: tuple[str, ...]
    triggers: tuple[str, ...]
    cells: Mapping[tuple[str, str], StudyCell]
    paper: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    statistics: Mapping[str, Any] | None = None

    def paper_numbers(self, method: str) -> tuple[float | None, float | None] | None:
        """The paper's (mean, worst) for a method: the study's own record, else section 5."""
        return self.paper.get(method) or paper_numbers(method)

    def column(self, method: str) -> list[float]:
        values = (self.cells.get((t, method)) for t in self.triggers)
        return [c.asr for c in values if c is not None and c.asr is not None]

    def _statistics(self, method: str) -> Mapping[str, Any]:
        return ((self.statistics or {}).get("methods") or {}).get(method) or {}

    def interval(self, method: str) -> tuple[float, float] | None:
        """The statistics' bootstrap interval of the mean ASR over triggers, where computed."""
        mean = self._statistics(method).get("asr_mean")
        return (mean["lo"], mean["hi"]) if mean else None

    def mean(self, method: str) -> float | None:
        mean = self._statistics(method).get("asr_mean")
        if mean:
            return mean["mean"]
        values = self.column(method)
        return sum(values) / len(values) if values else None

    def worst(self, method: str) -> float | None:
        worst = self._statistics(method).get("worst")
        if worst:
            return worst["asr"]
        values = self.column(method)
        return max(values) if values else None

    @property
    def statistics_error(self) -> str | None:
        return (self.statistics or {}).get("error")


# Section 5 of the method notes: the poster's CIFAR-10 ResNet-18 numbers (51 bw triggers).
PAPER_BW_ASR: dict[str, tuple[float, float]] = {
    "before": (0.987, 0.924),
    "ideal": (0.024, 0.037),
    "mesa-0.9": (0.034, 0.059),
    "mesa-0.8": (0.036, 0.091),
    "mesa-0.5": (0.042, 0.090),
    "mesa-ensemble": (0.036, 0.082),
    "point": (0.105, 0.514),
}


def paper_numbers(method: str) -> tuple[float, float] | None:
    """The paper's (mean, worst) ASR after repair for a method name, when it reports one."""
    name = method.lower().replace("beta=", "").replace("_", "-")
    for alias, key in (("mesa-ens", "mesa-ensemble"), ("before-repair", "before")):
        if name.startswith(alias):
            name = key
    return PAPER_BW_ASR.get(name)


# --------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class DataSource(Protocol):
    """Everything the app asks of the store. Called from thread workers only."""

    def jobs(
        self, query: JobQuery, changed_since: datetime | None, all_ids: bool = False
    ) -> JobsPage:
        """Matching jobs changed after ``changed_since`` (all when None) plus all running ones;
        with ``all_ids`` the page's ``ids`` also lists every matching job (jobs not in it are
        gone), read without building their rows."""

    def job_detail(self, job_id: int) -> JobDetail: ...

    def metric_points(
        self, run_ids: Sequence[int], after_id: int, limit: int = 50_000
    ) -> list[MetricPoint]:
        """Points of these runs with id above ``after_id``, ascending by id."""

    def metric_history(self, job_id: int, max_points: int = HISTORY_POINTS) -> MetricHistory:
        """Every series of the job (attempts joined at resume), at most ``2 * max_points`` points
        each (first, last, min and max per step range), and the cursor to continue from."""

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogLine]: ...

    def engine_status(self) -> EngineStatus: ...

    def studies(self) -> list[str]: ...

    def study_summary(self, name: str) -> StudySummary: ...

    def submit(self, kind: str, spec: Mapping[str, Any], study: str | None = None) -> list[int]:
        """Queue the job(s) of a validated spec; returns the new job ids."""

    def cancel(self, job_id: int) -> None: ...

    def retry(self, job_id: int) -> int:
        """Queue a finished job again; returns the job id that will run."""

    def delete(self, job_id: int) -> None: ...

    def start_engine(self) -> str:
        """Start a detached engine; returns a line for the user."""

    def export_report(self, kind: str, key: str | int) -> str:
        """Write the report of a study (``kind`` "study", its name) or a job ("job", its id)
        to ``<data home>/reports/<name>-<timestamp>``; returns the path of its report.md."""


# --------------------------------------------------------------------------------------------
# Artifact reading (in workers too: numpy from disk, never pickles)


@dataclass(frozen=True)
class TriggerSamples:
    """Sampled triggers per beta, as (N, C, k, k) float arrays in [0, 1]."""

    directory: str
    by_beta: Mapping[str, np.ndarray]
    original: np.ndarray | None = None  # (C, k, k) from ground_truth.json
    stamp: float = 0.0  # newest mtime, to skip rereads
    # Learned placement: per beta the position distribution pi (Hp, Wp) from positions.npy.
    positions: Mapping[str, np.ndarray] = field(default_factory=dict)


def _as_chw(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] % 9 == 0:
        c = a.shape[1] // 9
        return a.reshape(a.shape[0], c, 3, 3)
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        return a.transpose(0, 3, 1, 2)
    if a.ndim == 4:
        return a
    raise ValueError(f"samples of shape {a.shape} are not (N, C, k, k) or (N, C*k*k)")


def search_dirs(detail: JobDetail) -> list[Path]:
    """Candidate directories that may hold ``beta=<b>/samples.npy``: artifacts, then the workdir."""
    out = [Path(a.path) for a in detail.artifacts]
    if detail.workdir:
        out.append(Path(detail.workdir))
    return out


def read_trigger_samples(dirs: Iterable[Path], known_stamp: float = 0.0) -> TriggerSamples | None:
    """Read the first directory with per-beta samples; None when none has them yet."""
    for directory in dirs:
        files = sorted(directory.glob("beta=*/samples.npy")) if directory.is_dir() else []
        if not files:
            continue
        stamp = max(f.stat().st_mtime for f in files)
        if stamp <= known_stamp:
            return None
        by_beta = {
            f.parent.name.removeprefix("beta="): _as_chw(np.load(f, allow_pickle=False))
            for f in files
        }
        positions = {}
        for f in sorted(directory.glob("beta=*/positions.npy")):
            try:
                pi = np.load(f, allow_pickle=False)
            except (OSError, ValueError):
                continue  # half-written or damaged: the next poll reads it again
            if pi.ndim == 2:
                positions[f.parent.name.removeprefix("beta=")] = pi.astype(np.float32)
        return TriggerSamples(str(directory), by_beta, _ground_truth(directory), stamp, positions)
    return None


def _ground_truth(directory: Path) -> np.ndarray | None:
    """The original trigger from ``ground_truth.json`` here or in an upstream artifact."""
    candidates = [directory]
    manifest = directory / "manifest.json"
    if manifest.exists():
        try:
            upstream = json.loads(manifest.read_text()).get("upstream", [])
            candidates += [Path(u["path"]) for u in upstream if "path" in u]
        except (OSError, ValueError, TypeError):
            pass
    for d in candidates:
        gt = d / "ground_truth.json"
        if gt.exists():
            pattern = json.loads(gt.read_text()).get("pattern")
            if pattern is not None:
                return np.asarray(pattern, dtype=np.float32)
    return None


def pca_2d(samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Project every beta's samples onto the first two principal axes of all samples together."""
    flat = {b: s.reshape(len(s), -1) for b, s in samples.items() if len(s)}
    if not flat:
        return {}
    stacked = np.concatenate(list(flat.values()))
    centred = stacked - stacked.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 1)))
    mean = stacked.mean(axis=0)
    return {b: (f - mean) @ axes for b, f in flat.items()}


# --------------------------------------------------------------------------------------------
# The fake: scripted, deterministic, frozen clock


class FrozenClock:
    """A clock that moves only when told; the app and the fake read the same one."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime(2026, 1, 5, 9, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


def utc_now() -> datetime:
    return datetime.now(UTC)


class FakeSource:
    """An in-memory store with a scripted history; thread-safe (workers read while tests write).

    ``calls`` records every write request, so tests assert on what the UI asked for.
    """

    def __init__(self, clock: Callable[[], datetime] | None = None, engine_alive: bool = True):
        self.clock = clock or FrozenClock()
        self._lock = threading.RLock()
        self._jobs: dict[int, JobRow] = {}
        self._specs: dict[int, dict[str, Any]] = {}
        self._runs: dict[int, list[RunInfo]] = {}
        self._artifacts: dict[int, list[ArtifactInfo]] = {}
        self._workdirs: dict[int, str] = {}
        self._metric_ids: dict[int, list[int]] = {}
        self._metrics: dict[int, list[MetricPoint]] = {}
        self._latest: dict[int, dict[str, float]] = {}
        self._logs: dict[int, list[LogLine]] = {}
        self._studies: dict[str, StudySummary] = {}
        self._next_job = 1
        self._next_run = 1
        self._next_metric = 1
        self._next_log = 1
        self.engine = EngineStatus(alive=False)
        self.calls: list[tuple[str, Any]] = []
        self.fail_next: Exception | None = None
        if engine_alive:
            self.set_engine(alive=True)

    # -- scripting -------------------------------------------------------------------------

    def set_engine(self, alive: bool, gpus: tuple[GpuInfo, ...] | None = None) -> None:
        with self._lock:
            if not alive:
                self.engine = EngineStatus(alive=False)
                return
            self.engine = EngineStatus(
                alive=True,
                host="gpu-box",
                pid=4242,
                slots_total=4,
                slots_busy=sum(j.status == "running" for j in self._jobs.values()),
                gpus=gpus
                if gpus is not None
                else (GpuInfo(0, "NVIDIA H100", 21_504, 81_559, 87.0),),
                heartbeat_at=self.clock(),
            )

    def add_job(
        self,
        kind: str,
        status: str = "queued",
        *,
        spec: Mapping[str, Any] | None = None,
        study: str | None = None,
        trigger: str | None = None,
        workdir: str | None = None,
        label: str | None = None,
        **row: Any,
    ) -> int:
        with self._lock:
            job_id = self._next_job
            self._next_job += 1
            now = self.clock()
            spec = dict(spec or {"kind": kind})
            self._jobs[job_id] = JobRow(
                id=job_id,
                kind=kind,
                status=status,
                created_at=now,
                updated_at=now,
                study=study,
                trigger=trigger or spec.get("trigger"),
                label=label,
                method=row.pop("method", None) or label_method(label, spec),
                **row,
            )
            self._specs[job_id] = spec
            self._runs[job_id] = []
            self._artifacts[job_id] = []
            if workdir:
                self._workdirs[job_id] = workdir
            if status != "queued":
                self.add_run(job_id, status)
            return job_id

    def add_run(self, job_id: int, status: str = "running") -> int:
        with self._lock:
            run_id = self._next_run
            self._next_run += 1
            runs = self._runs[job_id]
            runs.append(
                RunInfo(
                    id=run_id,
                    attempt=len(runs) + 1,
                    status=status,
                    host="gpu-box",
                    gpu="0",
                    started_at=self.clock(),
                    heartbeat_at=self.clock(),
                    seed=0,
                    code_version="0.1.0+gdeadbeef00",
                )
            )
            self._metric_ids[run_id] = []
            self._metrics[run_id] = []
            self._logs[run_id] = []
            return run_id

    def run_ids(self, job_id: int) -> list[int]:
        with self._lock:
            return [r.id for r in self._runs[job_id]]

    def log_metrics(self, run_id: int, step: int, values: Mapping[str, float]) -> None:
        with self._lock:
            ids, points = self._metric_ids[run_id], self._metrics[run_id]
            for key, value in values.items():
                mid = self._next_metric
                self._next_metric += 1
                ids.append(mid)
                points.append(MetricPoint(mid, run_id, key, step, float(value)))
                self._latest.setdefault(run_id, {})[key] = float(value)
            job_id = self._job_of_run(run_id)
            job = self._jobs[job_id]
            latest = self._latest[run_id]
            loss = values.get("train/loss")
            self._jobs[job_id] = replace(
                job,
                acc_clean=latest.get("eval/acc_clean", job.acc_clean),
                asr=latest.get("eval/asr", job.asr),
                loss_tail=(job.loss_tail + (float(loss),))[-24:]
                if loss is not None
                else job.loss_tail,
                updated_at=self.clock(),
            )

    def bulk_metrics(self, run_id: int, key: str, steps: np.ndarray, values: np.ndarray) -> None:
        """Load a long history fast (benchmarks): ids stay ascending and unique."""
        with self._lock:
            ids, points = self._metric_ids[run_id], self._metrics[run_id]
            for s, v in zip(steps.tolist(), values.tolist(), strict=True):
                ids.append(self._next_metric)
                points.append(MetricPoint(self._next_metric, run_id, key, s, v))
                self._next_metric += 1
            self._latest.setdefault(run_id, {})[key] = float(values[-1])

    def log_text(self, run_id: int, message: str, level: str = "info") -> None:
        with self._lock:
            self._logs[run_id].append(LogLine(self._next_log, run_id, self.clock(), level, message))
            self._next_log += 1

    def add_artifact(self, job_id: int, kind: str, path: str, sha256: str, size: int) -> None:
        with self._lock:
            run_id = self._runs[job_id][-1].id
            arts = self._artifacts[job_id]
            arts.append(ArtifactInfo(len(arts) + 1, run_id, kind, path, sha256, size))

    def update_job(self, job_id: int, **changes: Any) -> None:
        with self._lock:
            changes.setdefault("updated_at", self.clock())
            self._jobs[job_id] = replace(self._jobs[job_id], **changes)
            if "status" in changes and self._runs[job_id]:
                runs = self._runs[job_id]
                runs[-1] = replace(runs[-1], status=changes["status"])

    def add_study(self, summary: StudySummary) -> None:
        with self._lock:
            self._studies[summary.name] = summary

    def _job_of_run(self, run_id: int) -> int:
        for job_id, runs in self._runs.items():
            if any(r.id == run_id for r in runs):
                return job_id
        raise SourceError(f"run {run_id} does not exist")

    def _get_runs(self, job_id: int) -> list[RunInfo]:
        self._get(job_id)
        return self._runs[job_id]

    def _get(self, job_id: int) -> JobRow:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise SourceError(f"job {job_id} does not exist; it may have been deleted") from None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    # -- DataSource ------------------------------------------------------------------------

    def jobs(
        self, query: JobQuery, changed_since: datetime | None, all_ids: bool = False
    ) -> JobsPage:
        with self._lock:
            self._maybe_fail()
            matching = [j for j in self._jobs.values() if query.matches(j)]
            rows = tuple(
                j
                for j in matching
                if changed_since is None or j.updated_at >= changed_since or j.status == "running"
            )
            cursor = max((j.updated_at for j in self._jobs.values()), default=changed_since)
            return JobsPage(rows, frozenset(j.id for j in matching), cursor)

    def job_detail(self, job_id: int) -> JobDetail:
        with self._lock:
            self._maybe_fail()
            job = self._get(job_id)
            runs = tuple(self._runs[job_id])
            latest: dict[str, float] = {}
            for r in runs:
                latest.update(self._latest.get(r.id, {}))
            spec = self._specs[job_id]
            return JobDetail(
                job=job,
                spec=spec,
                runs=runs,
                artifacts=tuple(self._artifacts[job_id]),
                params={k: json.dumps(v) for k, v in spec.items()},
                latest=latest,
                workdir=self._workdirs.get(job_id),
                error=runs[-1].error if runs else None,
            )

    def metric_points(
        self, run_ids: Sequence[int], after_id: int, limit: int = 50_000
    ) -> list[MetricPoint]:
        with self._lock:
            self._maybe_fail()
            out: list[MetricPoint] = []
            for run_id in run_ids:
                ids = self._metric_ids.get(run_id, [])
                start = bisect.bisect_right(ids, after_id)
                out.extend(self._metrics[run_id][start : start + limit])
            out.sort(key=lambda p: p.id)
            return out[:limit]

    def metric_history(self, job_id: int, max_points: int = HISTORY_POINTS) -> MetricHistory:
        from store.downsample import minmax

        with self._lock:
            self._maybe_fail()
            runs = [r.id for r in self._get_runs(job_id)]
            points = [p for r in runs for p in self._metrics[r]]
        cursor = max((p.id for p in points), default=0)
        # As the store joins attempts: a run's points count up to where a later run's begin.
        by_key: dict[str, dict[int, list[MetricPoint]]] = {}
        for p in points:
            by_key.setdefault(p.key, {}).setdefault(p.run_id, []).append(p)
        series: dict[str, tuple[list[float], list[float]]] = {}
        count = 0
        for key, per_run in by_key.items():
            firsts = {r: min(p.step for p in ps) for r, ps in per_run.items()}
            joined: list[MetricPoint] = []
            for i, r in enumerate(runs):
                later = [firsts[x] for x in runs[i + 1 :] if x in firsts]
                cut = min(later) if later else None
                joined += [p for p in per_run.get(r, ()) if cut is None or p.step < cut]
            joined.sort(key=lambda p: p.step)
            count += len(joined)
            series[key] = minmax([p.step for p in joined], [p.value for p in joined], max_points)
        return MetricHistory(cursor, series, count)

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogLine]:
        with self._lock:
            out = [line for r in run_ids for line in self._logs.get(r, []) if line.id > after_id]
            out.sort(key=lambda line: line.id)
            return out[:limit]

    def engine_status(self) -> EngineStatus:
        with self._lock:
            if self.engine.alive:
                busy = sum(j.status == "running" for j in self._jobs.values())
                return replace(self.engine, slots_busy=busy)
            return self.engine

    def studies(self) -> list[str]:
        with self._lock:
            return sorted(self._studies)

    def study_summary(self, name: str) -> StudySummary:
        with self._lock:
            try:
                return self._studies[name]
            except KeyError:
                raise SourceError(f"study '{name}' does not exist") from None

    def submit(self, kind: str, spec: Mapping[str, Any], study: str | None = None) -> list[int]:
        with self._lock:
            self._maybe_fail()
            self.calls.append(("submit", (kind, dict(spec))))
            if kind != "pipeline":
                return [self.add_job(kind, "queued", spec=spec, study=study)]
            methods = str(spec["methods"]).split(",")
            stages = ["train"] + (["detect"] if spec["target"] == "auto" else [])
            stages += ["mesa"] * any(m.startswith("mesa") for m in methods) + ["defend"] * len(
                methods
            )
            return [
                self.add_job(
                    stage, "queued", spec={"kind": stage}, study=study, trigger=spec["trigger"]
                )
                for stage in stages
            ]

    def cancel(self, job_id: int) -> None:
        with self._lock:
            self.calls.append(("cancel", job_id))
            job = self._get(job_id)
            if job.status in FINISHED:
                raise SourceError(f"job {job_id} is already {job.status}; nothing to cancel")
            self.update_job(job_id, status="cancelled", eta_s=None)

    def retry(self, job_id: int) -> int:
        with self._lock:
            self.calls.append(("retry", job_id))
            job = self._get(job_id)
            if job.status not in RETRYABLE:
                raise SourceError(
                    f"job {job_id} is {job.status}; only failed, cancelled or lost jobs can be retried"
                )
            self.update_job(job_id, status="queued", progress=None, eta_s=None)
            return job_id

    def delete(self, job_id: int) -> None:
        with self._lock:
            self.calls.append(("delete", job_id))
            job = self._get(job_id)
            if job.status not in FINISHED:
                raise SourceError(f"job {job_id} is {job.status}; cancel it before deleting it")
            del self._jobs[job_id]

    def start_engine(self) -> str:
        with self._lock:
            self.calls.append(("start_engine", None))
            self.set_engine(alive=True)
            return "engine started"

    def export_report(self, kind: str, key: str | int) -> str:
        """Records the request and writes a one-line report where the real one would go."""
        from engine.report import default_report_dir

        with self._lock:
            self.calls.append(("export_report", (kind, key)))
            if kind == "study" and key not in self._studies:
                raise SourceError(f"study '{key}' does not exist")
            if kind == "job":
                self._get(int(key))
            name = str(key) if kind == "study" else f"job-{key}"
            directory = default_report_dir(name, self.clock())
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "report.md").write_text(f"# Report: {kind} {key}\n")
            return str(directory / "report.md")


def demo_source(root: Path, clock: FrozenClock | None = None) -> FakeSource:
    """A fixed scene for tests and snapshots: a pipeline in every state, a study, a search on disk."""
    clock = clock or FrozenClock()
    src = FakeSource(clock)
    rng = np.random.default_rng(0)
    train = src.add_job(
        "train",
        "succeeded",
        spec={"kind": "train", "arch": "small", "epochs": 8, "trigger": "bw:170", "target": 0},
        study="mini",
        label="attack bw:170 -> 0",
        progress=1.0,
        stage="done",
    )
    run = src.run_ids(train)[0]
    for epoch in range(8):
        src.log_metrics(
            run,
            epoch,
            {
                "train/loss": 2.0 * math.exp(-epoch / 3) + 0.3,
                "eval/acc_clean": 0.55 + 0.04 * epoch,
                "eval/asr": min(1.0, 0.6 + 0.06 * epoch),
            },
        )
        src.log_text(run, f"epoch {epoch + 1}/8 done")
    src.add_artifact(
        train, "model", "~/.local/share/mesa-tui/artifacts/train-1", "3f2a" * 16, 1_204_512
    )

    search_dir = root / "search"
    betas = ("0.9", "0.8", "0.5")
    for i, beta in enumerate(betas):
        d = search_dir / f"beta={beta}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=np.float32).reshape(1, 1, 3, 3)
        noise = rng.normal(0, 0.15 + 0.1 * i, size=(64, 3, 3, 3)).astype(np.float32)
        np.save(d / "samples.npy", np.clip(base + noise, 0, 1), allow_pickle=False)
    pattern = [[[0, 1, 0], [1, 0, 1], [0, 1, 0]]] * 3
    (search_dir / "ground_truth.json").write_text(
        json.dumps({"trigger": "bw:170", "pattern": pattern, "target": 0, "placement": "per-image"})
    )
    mesa = src.add_job(
        "mesa",
        "running",
        spec={"kind": "mesa", "betas": [0.9, 0.8, 0.5], "alpha": 0.1, "steps": 620},
        study="mini",
        trigger="bw:170",
        label="mesa bw:170 -> 0",
        workdir=str(search_dir),
        progress=0.42,
        stage="search",
        eta_s=312.0,
    )
    mrun = src.run_ids(mesa)[0]
    for step in range(0, 260, 10):
        values: dict[str, float] = {}
        for i, beta in enumerate(betas):
            values[f"mesa/beta={beta}/hinge"] = float(beta) * (1 - math.exp(-step / 60)) - 0.01 * i
            values[f"mesa/beta={beta}/mine"] = 0.5 + 1.5 * (1 - math.exp(-step / 90)) + 0.1 * i
        values["train/loss"] = 1.5 * math.exp(-step / 80) + 0.2
        src.log_metrics(mrun, step, values)
    for i, beta in enumerate(betas):
        src.log_metrics(
            mrun,
            250,
            {
                f"mesa/beta={beta}/validity": 0.93 - 0.1 * i,
                f"mesa/beta={beta}/knn_entropy": 2.1 + 0.4 * i,
                f"mesa/beta={beta}/diversity": 0.21 + 0.05 * i,
                f"mesa/beta={beta}/bw_coverage": 0.012 + 0.01 * i,
                f"mesa/beta={beta}/nearest": 0.05 + 0.03 * i,
            },
        )
    for line in ("claimed by engine gpu-box", "search beta=0.9,0.8,0.5 on small", "step 250/620"):
        src.log_text(mrun, line)
    src.add_job(
        "defend",
        "queued",
        spec={"kind": "defend", "method": "mesa-ensemble"},
        study="mini",
        trigger="bw:170",
        label="mesa-ensemble bw:170 -> 0",
    )
    failed = src.add_job(
        "train",
        "failed",
        spec={"kind": "train", "trigger": "bw:7", "epochs": 8},
        study="mini",
        label="attack bw:7 -> 0",
        progress=0.25,
        stage="train",
    )
    src.update_job(failed, status="failed")
    src.add_job(
        "train",
        "cancelled",
        spec={"kind": "train", "trigger": "square:white"},
        trigger="square:white",
        label="attack square:white -> 0",
        progress=0.1,
        stage="train",
    )
    methods = ("ideal", "mesa-0.9", "mesa-ensemble", "point", "finetune")
    triggers = ("bw:170", "bw:7", "bw:42", "bw:86")
    cells = {}
    for ti, trig in enumerate(triggers):
        for mi, method in enumerate(methods):
            asr = min(0.999, [0.02, 0.035, 0.03, 0.12, 0.9][mi] + 0.01 * ti * (mi + 1))
            cells[(trig, method)] = StudyCell(round(asr, 4), 0.81 - 0.01 * mi, job_id=mesa)
    statistics = demo_statistics(methods, triggers, cells, rng)
    src.add_study(StudySummary("mini", methods, triggers, cells, statistics=statistics))
    return src


def demo_statistics(
    methods: tuple[str, ...],
    triggers: tuple[str, ...],
    cells: Mapping[tuple[str, str], StudyCell],
    rng: np.random.Generator,
    images: int = 2000,
) -> dict[str, Any]:
    """The demo study's statistics as a real study gets them (``stats.summarize``): per-image
    outcomes drawn with each cell's ASR exactly, in random order, on ``images`` images."""
    from engine.report.stats import summarize
    from engine.report.study_stats import pick_reference

    def bits(asr: float) -> str:
        ones = round(asr * images)
        return "".join(rng.permutation(["1"] * ones + ["0"] * (images - ones)))

    records = [
        {
            "schema": 1,
            "trigger": trigger,
            "floor": None,
            "attack": {"asr_outcomes": bits(0.98)},
            "repairs": {
                m: {
                    "asr_outcomes": bits(cells[(trigger, m)].asr),
                    "acc_clean": cells[(trigger, m)].acc_clean,
                }
                for m in methods
            },
        }
        for trigger in triggers
    ]
    return summarize(records, methods, reference=pick_reference(records, methods) or methods[0])


# --------------------------------------------------------------------------------------------
# The store adapter


LOSS_KEYS = ("train/loss", "repair/loss", "mesa/loss")
LOSS_TAIL = 24  # values of the jobs table's loss sparkline
REFERENCE_FIELDS = ("model", "search", "init_from")  # spec fields that may name an upstream job


def _eta(progress: Any) -> float | None:
    """Seconds left in the current stage, from its start and how far it got."""
    if progress is None or not progress.total or progress.started is None or progress.done <= 0:
        return None
    elapsed = progress.wall_time - float(progress.started)
    fraction = progress.done / progress.total
    return max(0.0, elapsed * (1 - fraction) / fraction) if elapsed > 0 else None


_TRIGGER_IN_LABEL = re.compile(r"\b(?:bw|color|square|file):\S+")


def _label_trigger(label: str | None) -> str | None:
    """The trigger named in a job's label ("point bw:85 -> 0" -> "bw:85"): search, detect and
    defend specs refer to their model instead of naming a trigger; else the label itself."""
    if not label:
        return None
    found = _TRIGGER_IN_LABEL.search(label)
    return found.group(0) if found else label


def label_method(label: str | None, spec: Mapping[str, Any]) -> str | None:
    """What a job does, from its label's words before the trigger ("point #3 bw:85 -> 0" ->
    "point #3", "mesa-0.9 square:white -> 0" -> "mesa-0.9"), else the spec's method, else the
    whole label: the pipeline's defend rows share kind and trigger and differ only here."""
    head = label or ""
    found = _TRIGGER_IN_LABEL.search(head)
    if found:
        head = head[: found.start()]
    head = head.strip()
    method = spec.get("method")
    return head or (str(method) if method else None) or label or None


class StoreSource:
    """``DataSource`` over ``store.repository.Store``; called from worker threads only.

    The store's entities are mapped to the UI's values here, so a schema change touches one place.
    Loss sparklines come from ``metric_tail`` (the last values by one indexed read), cached per job.
    """

    def __init__(self, store: Any):
        self.store = store
        # job id -> (run id, key, status, tail): a finished job's tail is read once
        self._loss: dict[int, tuple[int, str, str, tuple[float, ...]]] = {}
        self._lock = threading.Lock()

    def _row(self, s: Any, loss_tail: tuple[float, ...] = ()) -> JobRow:
        spec = s.spec or {}
        progress = s.progress if s.status == "running" else None
        return JobRow(
            id=s.id,
            kind=s.kind,
            status=s.status,
            created_at=s.created_at,
            updated_at=s.updated_at,
            study=s.studies[0] if s.studies else None,
            trigger=spec.get("trigger") or _label_trigger(s.label),
            label=s.label,
            method=label_method(s.label, spec),
            progress=progress.fraction
            if progress is not None
            else (1.0 if s.status == "succeeded" else None),
            stage=progress.stage if progress is not None else None,
            eta_s=_eta(progress),
            acc_clean=s.latest.get("eval/acc_clean", s.latest.get("repair/acc_clean")),
            asr=s.latest.get("eval/asr", s.latest.get("repair/asr")),
            loss_tail=loss_tail,
        )

    def _loss_tails(self, summaries: Iterable[Any]) -> dict[int, tuple[float, ...]]:
        """The last values of each job's loss: one ``metric_tail`` read per loss key for the jobs
        whose tail may have moved (running ones, and any not read since its run or status
        changed); the others come from the cache."""
        out: dict[int, tuple[float, ...]] = {}
        wanted: dict[str, list[Any]] = {}
        with self._lock:
            for s in summaries:
                cached = self._loss.get(s.id)
                key = next((k for k in LOSS_KEYS if k in s.latest), None)
                if s.current_run_id is None or key is None:
                    out[s.id] = cached[3] if cached else ()
                elif (
                    cached is not None
                    and cached[:3] == (s.current_run_id, key, s.status)
                    and s.status != "running"
                ):
                    out[s.id] = cached[3]
                else:
                    wanted.setdefault(key, []).append(s)
        for key, group in wanted.items():
            tails = self.store.metric_tail([s.id for s in group], key, LOSS_TAIL)
            with self._lock:
                for s in group:
                    out[s.id] = tuple(tails.get(s.id, ()))
                    self._loss[s.id] = (s.current_run_id, key, s.status, out[s.id])
        return out

    def jobs(
        self, query: JobQuery, changed_since: datetime | None, all_ids: bool = False
    ) -> JobsPage:
        statuses = sorted(query.statuses) if query.statuses else None
        changed = self.store.list_jobs(
            status=statuses, kind=query.kind, study=query.study, changed_since=changed_since
        )
        rows = {s.id: s for s in changed}
        if changed_since is not None and (statuses is None or "running" in statuses):
            for s in self.store.list_jobs(status="running", kind=query.kind, study=query.study):
                rows.setdefault(s.id, s)
        cursor = max((s.updated_at for s in changed), default=changed_since)
        ids = frozenset(rows) if changed_since is None else None
        if ids is None and all_ids:
            # Read after the rows: a job made in between is listed here and read at the next
            # poll (it changed after the cursor); one deleted in between is dropped.
            ids = frozenset(self.store.job_ids(status=statuses, kind=query.kind, study=query.study))
        tails = self._loss_tails(rows.values())
        return JobsPage(
            tuple(self._row(s, tails.get(s.id, ())) for s in rows.values()), ids, cursor
        )

    def job_detail(self, job_id: int) -> JobDetail:
        d = self.store.job_detail(job_id)
        runs = tuple(
            RunInfo(
                id=r.id,
                attempt=r.attempt,
                status=r.status,
                executor=r.executor,
                host=r.host,
                gpu=r.gpu,
                started_at=r.started_at,
                ended_at=r.ended_at,
                heartbeat_at=r.heartbeat_at,
                exit_code=r.exit_code,
                error=r.error,
                seed=r.seed,
                code_version=r.code_version,
            )
            for r in d.runs
        )
        latest: dict[str, float] = {}
        by_run = self.store.latest_metrics([r.id for r in runs])
        for r in runs:
            latest.update(by_run.get(r.id, {}))
        return JobDetail(
            job=self._row(d.job),  # the run screen draws the curves themselves
            spec=dict(d.job.spec or {}),
            runs=runs,
            artifacts=tuple(
                ArtifactInfo(a.id, a.run_id, a.kind, a.path, a.sha256, a.bytes) for a in d.artifacts
            ),
            params=dict(d.params),
            latest=latest,
            depends_on=tuple(dep.job_id for dep in d.depends_on),
            workdir=d.workdir,
            error=d.job.error,
        )

    def metric_points(
        self, run_ids: Sequence[int], after_id: int, limit: int = 50_000
    ) -> list[MetricPoint]:
        # The store's points carry the same fields (plus wall_time); no copy of big batches.
        return self.store.metrics_since(list(run_ids), after_id, limit=limit)

    def metric_history(self, job_id: int, max_points: int = HISTORY_POINTS) -> MetricHistory:
        h = self.store.metric_series_columns(job_id, max_points=max_points)
        return MetricHistory(
            h.cursor,
            {k: (c.steps, c.values) for k, c in h.series.items()},
            sum(c.count for c in h.series.values()),
        )

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogLine]:
        return [
            LogLine(e.id, e.run_id, datetime.fromtimestamp(e.wall_time, UTC), e.level, e.message)
            for e in self.store.logs(run_ids=list(run_ids), after_id=after_id, limit=limit)
        ]

    def engine_status(self) -> EngineStatus:
        alive = self.store.engines(alive_only=True)
        if not alive:
            return EngineStatus(alive=False)
        first = alive[0]
        return EngineStatus(
            alive=True,
            host=first.host if len(alive) == 1 else f"{first.host} +{len(alive) - 1}",
            pid=first.pid,
            slots_total=sum(e.slots for e in alive),
            slots_busy=sum(e.slots_used for e in alive),
            gpus=tuple(
                GpuInfo(g.index, g.name, g.memory_used_mb, g.memory_total_mb, g.utilization_pct)
                for e in alive
                for g in e.gpus
            ),
            heartbeat_at=max(e.heartbeat_at for e in alive),
        )

    def studies(self) -> list[str]:
        return [s.name for s in self.store.studies()]

    def study_summary(self, name: str) -> StudySummary:
        summary = self.store.study_summary(name)
        methods = tuple(r.method for r in summary.rows)
        triggers = tuple(dict.fromkeys(c.trigger for c in summary.cells))
        grouped: dict[tuple[str, str], list[Any]] = {}
        for c in summary.cells:
            grouped.setdefault((c.trigger, c.method), []).append(c)
        cells = {}
        for key, group in grouped.items():
            asrs = [c.asr for c in group if c.asr is not None]
            accs = [c.acc_clean for c in group if c.acc_clean is not None]
            cells[key] = StudyCell(
                sum(asrs) / len(asrs) if asrs else None,
                sum(accs) / len(accs) if accs else None,
                job_id=group[0].job_id,
            )
        paper = {
            r.method: (r.paper_asr_mean, r.paper_asr_worst)
            for r in summary.rows
            if r.paper_asr_mean is not None or r.paper_asr_worst is not None
        }
        from engine.report.study_stats import study_statistics

        statistics = study_statistics(self.store, name)
        notes = tuple(summary.protocol_notes)
        return StudySummary(name, methods, triggers, cells, paper, notes, statistics)

    def submit(self, kind: str, spec: Mapping[str, Any], study: str | None = None) -> list[int]:
        """One job (``job:ID`` in model/search/init_from makes it depend on that job) or, for
        kind ``pipeline``, the CLI's pipeline: train -> [detect] -> mesa -> defend per method."""
        from engine.pipelines import (
            apply_reuse,
            build_pipeline,
            parse_methods,
            reference_hash,
            resolve_reference,
        )
        from engine.specs import SPEC_CLASSES
        from store.entities import NewJob

        study_id = None
        if study:
            try:
                study_id = self.store.study(study).id
            except Exception as exc:
                raise SourceError(str(exc)) from None
        if kind == "pipeline":
            overrides = {k: spec[k] for k in ("epochs", "steps") if spec.get(k) is not None}
            built = build_pipeline(
                preset=spec.get("preset"),
                trigger=spec["trigger"],
                target=str(spec["target"]),
                methods=parse_methods(spec["methods"]),
                overrides=overrides,
                seed=int(spec.get("seed", 0)),
            )
            return self.store.submit(apply_reuse(self.store, built.jobs), study_id=study_id)
        values = {k: v for k, v in spec.items() if k != "kind"}
        references = {
            k: v
            for k, v in values.items()
            if k in REFERENCE_FIELDS and isinstance(v, str) and resolve_reference(v)
        }
        validated = SPEC_CLASSES[kind](**{**values, **{k: "job" for k in references}})
        data = validated.to_json()
        data.update(references)
        depends = []
        for field_name, ref in references.items():
            upstream, _ = resolve_reference(ref)
            if upstream.startswith("#"):
                raise SourceError(f"invalid {field_name} {ref!r}: give job:ID with a job id")
            self.store.job(int(upstream))
            depends.append((int(upstream), field_name))
        job = NewJob(
            kind=kind,
            spec=data,
            spec_hash=reference_hash(data) if references else validated.spec_hash(),
            label=str(data.get("trigger") or ""),
            depends_on=tuple(depends),
            trigger=data.get("trigger"),
        )
        return self.store.submit([job], study_id=study_id)

    def cancel(self, job_id: int) -> None:
        self.store.request_cancel(job_id)

    def retry(self, job_id: int) -> int:
        return self.store.retry(job_id).id

    def delete(self, job_id: int) -> None:
        import shutil

        from engine import paths

        home = paths.data_home().resolve()
        for path in self.store.delete_job(job_id):
            target = Path(path).expanduser().resolve()
            # Only files this installation made are removed, never a path outside the data home.
            if target.is_relative_to(home) and target.exists():
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                    missing_ok=True
                )

    def start_engine(self) -> str:
        import os
        import subprocess
        import sys

        env = dict(os.environ, MESA_DB=self.store.url)
        done = subprocess.run(
            [sys.executable, "-m", "mesa_tui.cli", "engine", "start", "--detach"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        lines = (done.stdout.strip() or done.stderr.strip() or "engine started").splitlines()
        if done.returncode != 0:
            raise SourceError(f"engine start failed: {lines[-1]}")
        return lines[-1]

    def export_report(self, kind: str, key: str | int) -> str:
        from engine.report import build_report, default_report_dir

        name = str(key) if kind == "study" else f"job-{key}"
        return build_report(self.store, str(key), default_report_dir(name), kind=kind).report


def open_store_source(db_url: str | None = None) -> StoreSource:
    """The store behind ``--db`` / ``MESA_DB`` / the default SQLite file, wrapped for the app."""
    from store.repository import Store

    return StoreSource(Store(db_url))
