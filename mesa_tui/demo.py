"""A scripted, deterministic data source for the app: the fixture of the Pilot tests, the
snapshots and ``benchmarks/tui_responsiveness.py``; no face of the product uses it.

``FakeSource`` keeps an in-memory store and a frozen clock, so what the app shows is the same on
every run; ``demo_source`` builds the fixed scene the snapshots show.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mesa_tui.source import (
    HISTORY_POINTS,
    EngineStatus,
    Grid,
    GridCell,
    JobQuery,
    JobRow,
    JobsPage,
    JobView,
    SourceError,
    StudyGrid,
    best_asr,
    label_method,
)
from store.entities import (
    FINISHED,
    RETRYABLE,
    ArtifactInfo,
    EngineInfo,
    GpuInfo,
    JobDetail,
    JobSummary,
    LogEntry,
    MethodSummary,
    MetricHistory,
    MetricPoint,
    RunInfo,
    SeriesColumns,
    SlotLoad,
    StudyCell,
    StudyInfo,
    StudySummary,
    SystemInfo,
    backdoor_of,
    tag_problem,
)


class FrozenClock:
    """A clock that moves only when told; the app and the fake read the same one."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime(2026, 1, 5, 9, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


def job_summary(job_id: int, kind: str, status: str, when: datetime, **given: Any) -> JobSummary:
    """A job as the store lists it, made ``when``; what ``given`` does not set is unset."""
    unset: dict[str, Any] = dict(
        label="", priority=0, attempts=0, max_attempts=3, executor="local", spec={"kind": kind},
        spec_hash="", error=None, started_at=None, ended_at=None, reused_from=None, studies=(),
        current_run_id=None, progress=None, latest={}, cancel_requested=False,
    )  # fmt: skip
    return JobSummary(job_id, kind, status=status, created_at=when, updated_at=when,
                      **{**unset, **given})  # fmt: skip


# The row's own fields; every other change is the store summary's (``progress`` is in both:
# the row's fraction is what a scene sets).
_ROW_FIELDS = frozenset(f.name for f in fields(JobRow)) - {"job"}


def changed(row: JobRow, **changes: Any) -> JobRow:
    """``row`` with ``changes``, each made where its field lives: the row or the store's summary."""
    own = {k: v for k, v in changes.items() if k in _ROW_FIELDS}
    summary = {k: v for k, v in changes.items() if k not in _ROW_FIELDS}
    return replace(row, job=replace(row.job, **summary), **own)


class FakeSource:
    """An in-memory store with a scripted history; thread-safe (workers read while tests write).

    ``calls`` records every write request, so tests assert on what the UI asked for.
    """

    def __init__(self, clock: Callable[[], datetime] | None = None, engine_alive: bool = True):
        self.clock = clock or FrozenClock()
        self._lock = threading.RLock()
        self._jobs: dict[int, JobRow] = {}
        self._runs: dict[int, list[RunInfo]] = {}
        self._artifacts: dict[int, list[ArtifactInfo]] = {}
        self._workdirs: dict[int, str] = {}
        self._metric_ids: dict[int, list[int]] = {}
        self._metrics: dict[int, list[MetricPoint]] = {}
        self._latest: dict[int, dict[str, float]] = {}
        self._logs: dict[int, list[LogEntry]] = {}
        self._studies: dict[str, Grid] = {}
        self._next_job = 1
        self._next_run = 1
        self._next_metric = 1
        self._next_log = 1
        self._gpus: tuple[GpuInfo, ...] | None = None  # None: no engine
        self._beat = self.clock()
        self.calls: list[tuple[str, Any]] = []
        self.fail_next: Exception | None = None
        if engine_alive:
            self.set_engine(alive=True)

    # -- scripting -------------------------------------------------------------------------

    def set_engine(self, alive: bool, gpus: tuple[GpuInfo, ...] | None = None) -> None:
        """An engine on host gpu-box with four slots (one H100 unless ``gpus`` says otherwise),
        its heartbeat now; or none."""
        with self._lock:
            self._gpus = None
            if alive:
                self._gpus = (
                    gpus if gpus is not None else (GpuInfo(0, "NVIDIA H100", 21_504, 81_559, 87.0),)
                )
                self._beat = self.clock()

    def _engine(self, gpus: tuple[GpuInfo, ...]) -> EngineInfo:
        """The scripted engine as the store reads it: slot 0 on the first GPU runs the first
        running job; the other three are CPU slots, idle."""
        running = [j.id for j in self._jobs.values() if j.status == "running"]
        first = SlotLoad(
            0,
            str(gpus[0].index) if gpus else None,
            running[0] if running else None,
            97.0 if running else None,
            3_100.0 if running else None,
        )
        system = SystemInfo(16, 41.0, 37_000.0, 128_000.0, (first, *map(SlotLoad, range(1, 4))))
        beat = self._beat
        return EngineInfo(1, "gpu-box", 4242, "0.1.0", "local", 4, len(running), gpus, None,
                          beat, beat, None, None, alive=True, system=system)  # fmt: skip

    def add_job(
        self,
        kind: str,
        status: str = "queued",
        *,
        spec: Mapping[str, Any] | None = None,
        study: str | None = None,
        trigger: str | None = None,
        target: int | None = None,
        workdir: str | None = None,
        label: str | None = None,
        **row: Any,
    ) -> int:
        """A job whose trigger and target are given, as the store's upstream job would give
        them, or taken from its spec by the store's rule (``backdoor_of``)."""
        with self._lock:
            job_id = self._next_job
            self._next_job += 1
            now = self.clock()
            spec = dict(spec or {"kind": kind})
            own_trigger, own_target = backdoor_of(spec)
            trigger = trigger or own_trigger
            method = row.pop("method", None) or label_method(label, spec, trigger)
            summary = job_summary(
                job_id,
                kind,
                status,
                now,
                spec=spec,
                label=label or "",
                studies=(study,) if study else (),
                trigger=trigger,
                target=target if target is not None else own_target,
            )
            self._jobs[job_id] = changed(JobRow(summary, method=method), **row)
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
            runs.append(self._run(job_id, run_id, len(runs) + 1, status))
            self._metric_ids[run_id] = []
            self._metrics[run_id] = []
            self._logs[run_id] = []
            return run_id

    def _run(self, job_id: int, run_id: int, attempt: int, status: str) -> RunInfo:
        """An attempt as the store reads it, on gpu 0 of gpu-box, begun now."""
        now = self.clock()
        return RunInfo(id=run_id, job_id=job_id, attempt=attempt, status=status, executor="local",
                       engine_id=None, external_id=None, host="gpu-box", gpu="0", resumed=False,
                       start_step=None, started_at=now, ended_at=None, heartbeat_at=now,
                       expect_next_by=None, exit_code=None, error=None, seed=0,
                       code_version="0.1.0+gdeadbeef00", spec_hash=None, dataset_hash=None,
                       env={}, progress=None, result=None)  # fmt: skip

    def run_ids(self, job_id: int) -> list[int]:
        with self._lock:
            return [r.id for r in self._runs[job_id]]

    def log_metrics(self, run_id: int, step: int, values: Mapping[str, float]) -> None:
        with self._lock:
            ids, points = self._metric_ids[run_id], self._metrics[run_id]
            wall = self.clock().timestamp()
            for key, value in values.items():
                mid = self._next_metric
                self._next_metric += 1
                ids.append(mid)
                points.append(MetricPoint(mid, run_id, key, step, float(value), wall))
                self._latest.setdefault(run_id, {})[key] = float(value)
            job_id = self._job_of_run(run_id)
            job = self._jobs[job_id]
            latest = self._latest[run_id]
            loss = values.get("train/loss")
            asr = values.get("eval/asr")
            best = job.asr_best
            if asr is not None:
                best = float(asr) if best is None else best_asr(job.kind, *sorted((best, asr)))
            self._jobs[job_id] = changed(
                job,
                acc_clean=latest.get("eval/acc_clean", job.acc_clean),
                asr=latest.get("eval/asr", job.asr),
                asr_best=best,
                loss_tail=(job.loss_tail + (float(loss),))[-24:]
                if loss is not None
                else job.loss_tail,
                updated_at=self.clock(),
            )

    def bulk_metrics(self, run_id: int, key: str, steps: np.ndarray, values: np.ndarray) -> None:
        """Load a long history fast (benchmarks): ids stay ascending and unique."""
        with self._lock:
            ids, points = self._metric_ids[run_id], self._metrics[run_id]
            wall = self.clock().timestamp()
            for s, v in zip(steps.tolist(), values.tolist(), strict=True):
                ids.append(self._next_metric)
                points.append(MetricPoint(self._next_metric, run_id, key, s, v, wall))
                self._next_metric += 1
            self._latest.setdefault(run_id, {})[key] = float(values[-1])

    def log_text(self, run_id: int, message: str, level: str = "info") -> None:
        with self._lock:
            wall = self.clock().timestamp()
            self._logs[run_id].append(LogEntry(self._next_log, run_id, level, message, wall))
            self._next_log += 1

    def add_artifact(self, job_id: int, kind: str, path: str, sha256: str, size: int) -> None:
        with self._lock:
            run_id = self._runs[job_id][-1].id
            arts = self._artifacts[job_id]
            when = self.clock()
            arts.append(ArtifactInfo(len(arts) + 1, run_id, job_id, kind, path, sha256, size, when))

    def update_job(self, job_id: int, **changes: Any) -> None:
        with self._lock:
            changes.setdefault("updated_at", self.clock())
            self._jobs[job_id] = changed(self._jobs[job_id], **changes)
            if "status" in changes and self._runs[job_id]:
                runs = self._runs[job_id]
                runs[-1] = replace(runs[-1], status=changes["status"])

    def add_study(self, grid: Grid) -> None:
        with self._lock:
            self._studies[grid.name] = grid

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

    def job_detail(self, job_id: int) -> JobView:
        with self._lock:
            self._maybe_fail()
            row = self._get(job_id)
            runs = tuple(self._runs[job_id])
            latest: dict[str, float] = {}
            for r in runs:
                latest.update(self._latest.get(r.id, {}))
            params = {k: json.dumps(v) for k, v in row.job.spec.items()}
            detail = JobDetail(row.job, self._workdirs.get(job_id), None, None, None, runs, (), (),
                               tuple(self._artifacts[job_id]), params)  # fmt: skip
            return JobView(detail, row, latest)

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
        series: dict[str, SeriesColumns] = {}
        for key, per_run in by_key.items():
            firsts = {r: min(p.step for p in ps) for r, ps in per_run.items()}
            joined: list[MetricPoint] = []
            for i, r in enumerate(runs):
                later = [firsts[x] for x in runs[i + 1 :] if x in firsts]
                cut = min(later) if later else None
                joined += [p for p in per_run.get(r, ()) if cut is None or p.step < cut]
            joined.sort(key=lambda p: p.step)
            steps, values = minmax([p.step for p in joined], [p.value for p in joined], max_points)
            series[key] = SeriesColumns(steps, values, len(joined))
        return MetricHistory(cursor, tuple(runs), series)

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogEntry]:
        with self._lock:
            out = [line for r in run_ids for line in self._logs.get(r, []) if line.id > after_id]
            out.sort(key=lambda line: line.id)
            return out[:limit]

    def engine_status(self) -> EngineStatus:
        with self._lock:
            return EngineStatus(() if self._gpus is None else (self._engine(self._gpus),))

    def studies(self) -> list[str]:
        with self._lock:
            return sorted(self._studies)

    def study_summary(self, name: str) -> Grid:
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
            target = int(spec["target"]) if str(spec["target"]).isdigit() else None  # or auto
            stages = ["train"] + (["detect"] if spec["target"] == "auto" else [])
            stages += ["mesa"] * any(m.startswith("mesa") for m in methods) + ["defend"] * len(
                methods
            )
            return [
                self.add_job(
                    stage,
                    "queued",
                    spec={"kind": stage},
                    study=study,
                    trigger=spec["trigger"],
                    target=target,
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

    def annotate(self, job_id: int, note: str | None, tags: Sequence[str]) -> JobRow:
        with self._lock:
            self._maybe_fail()
            self.calls.append(("annotate", (job_id, note, tuple(tags))))
            self._get(job_id)
            problems = [p for p in map(tag_problem, tags) if p]
            if problems:
                raise SourceError(problems[0])
            clean = tuple(sorted(dict.fromkeys(t.strip() for t in tags)))
            self.update_job(job_id, note=(note or "").strip() or None, tags=clean)
            return self._jobs[job_id]

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


# The search's betas: the samples on disk and the mesa job's metrics must name the same ones.
_DEMO_BETAS = ("0.9", "0.8", "0.5")


def demo_source(root: Path, clock: FrozenClock | None = None) -> FakeSource:
    """A fixed scene for tests and snapshots: a pipeline in every state, a study, a search on disk."""
    clock = clock or FrozenClock()
    src = FakeSource(clock)
    # One generator, drawn from in this order (search samples, then the study's outcomes): the
    # snapshots depend on the exact draws. Jobs are added in id order, so keep that order too.
    rng = np.random.default_rng(0)
    _demo_train(src)
    search_dir = _demo_search_dir(root, rng)
    mesa = _demo_mesa(src, search_dir)
    _demo_other_jobs(src)
    _demo_study(src, mesa, rng)
    return src


def _demo_train(src: FakeSource) -> int:
    """The finished attack training every repair starts from: its curves, logs and model."""
    train = src.add_job(
        "train",
        "succeeded",
        spec={"kind": "train", "arch": "small", "epochs": 8, "trigger": "bw:170", "target": 0},
        study="mini",
        label="attack bw:170 -> 0",
        progress=1.0,
        stage="done",
        tags=("baseline",),
        note="the model every repair starts from",
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
    return train


def _demo_search_dir(root: Path, rng: np.random.Generator) -> Path:
    """A search's folder on disk (samples per beta and the ground truth) for the trigger views."""
    search_dir = root / "search"
    for i, beta in enumerate(_DEMO_BETAS):
        d = search_dir / f"beta={beta}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=np.float32).reshape(1, 1, 3, 3)
        noise = rng.normal(0, 0.15 + 0.1 * i, size=(64, 3, 3, 3)).astype(np.float32)
        np.save(d / "samples.npy", np.clip(base + noise, 0, 1), allow_pickle=False)
    pattern = [[[0, 1, 0], [1, 0, 1], [0, 1, 0]]] * 3
    (search_dir / "ground_truth.json").write_text(
        json.dumps({"trigger": "bw:170", "pattern": pattern, "target": 0, "placement": "per-image"})
    )
    return search_dir


def _demo_mesa(src: FakeSource, search_dir: Path) -> int:
    """The running MESA search over ``search_dir``: per-beta curves, final metrics and logs."""
    mesa = src.add_job(
        "mesa",
        "running",
        spec={"kind": "mesa", "betas": [0.9, 0.8, 0.5], "alpha": 0.1, "steps": 620},
        study="mini",
        trigger="bw:170",
        target=0,
        label="mesa bw:170 -> 0",
        workdir=str(search_dir),
        progress=0.42,
        stage="search",
        eta_s=312.0,
    )
    mrun = src.run_ids(mesa)[0]
    for step in range(0, 260, 10):
        values: dict[str, float] = {}
        for i, beta in enumerate(_DEMO_BETAS):
            values[f"mesa/beta={beta}/hinge"] = float(beta) * (1 - math.exp(-step / 60)) - 0.01 * i
            values[f"mesa/beta={beta}/mine"] = 0.5 + 1.5 * (1 - math.exp(-step / 90)) + 0.1 * i
        values["train/loss"] = 1.5 * math.exp(-step / 80) + 0.2
        src.log_metrics(mrun, step, values)
    for i, beta in enumerate(_DEMO_BETAS):
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
    return mesa


def _demo_other_jobs(src: FakeSource) -> None:
    """The remaining states: a queued repair, a failed and a cancelled training."""
    src.add_job(
        "defend",
        "queued",
        spec={"kind": "defend", "method": "mesa-ensemble"},
        study="mini",
        trigger="bw:170",
        target=0,
        label="mesa-ensemble bw:170 -> 0",
    )
    failed = src.add_job(
        "train",
        "failed",
        spec={"kind": "train", "trigger": "bw:7", "epochs": 8},
        target=0,
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
        target=0,
        label="attack square:white -> 0",
        progress=0.1,
        stage="train",
    )


def _demo_study(src: FakeSource, mesa: int, rng: np.random.Generator) -> None:
    """The study "mini": a grid of methods by triggers, its cells pointing at the mesa job."""
    methods = ("ideal", "mesa-0.9", "mesa-ensemble", "point", "finetune")
    triggers = ("bw:170", "bw:7", "bw:42", "bw:86")
    cells = []
    for ti, trig in enumerate(triggers):
        for mi, method in enumerate(methods):
            asr = min(0.999, [0.02, 0.035, 0.03, 0.12, 0.9][mi] + 0.01 * ti * (mi + 1))
            cells.append(
                StudyCell(trig, method, 0, mesa, "succeeded", round(asr, 4), 0.81 - 0.01 * mi, None)
            )
    rows = tuple(_method_row(m, len(triggers)) for m in methods)
    info = StudyInfo(1, "mini", "paper", {}, src.clock(), len(cells), {"succeeded": len(cells)})
    summary = StudySummary(info, rows, tuple(cells), ())
    statistics = demo_statistics(methods, triggers, StudyGrid(summary).cells, rng)
    src.add_study(StudyGrid(summary, statistics))


def _method_row(method: str, cells: int) -> MethodSummary:
    """A method's row with no figures of its own: the grid and the statistics give them."""
    return MethodSummary(method, cells, cells, *(None,) * 7)


def demo_statistics(
    methods: tuple[str, ...],
    triggers: tuple[str, ...],
    cells: Mapping[tuple[str, str], GridCell],
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
