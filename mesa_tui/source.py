"""What the terminal app reads and writes, behind one small protocol.

The app never touches the database: a thread worker calls a ``DataSource`` and posts the result
as a message. ``StoreSource`` adapts ``store.repository``; the tests' scripted source on a frozen
clock is ``mesa_tui.demo.FakeSource``. Values handed to the UI are the store's frozen entities
(``store.entities``, never ORM rows), and, below, the few views the app makes of them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from engine.paper_figures import paper_bw_numbers

# One reading of sample arrays for the app and the report (numpy only).
from engine.report.collect import as_chw
from store.entities import (
    ArtifactInfo,
    EngineInfo,
    GpuInfo,
    JobDetail,
    JobSummary,
    LogEntry,
    MetricHistory,
    MetricPoint,
    RunInfo,
    StudyCell,
    StudySummary,
)


def utc_now() -> datetime:
    """The app's clock over a real store (tests pass ``mesa_tui.demo.FrozenClock``)."""
    return datetime.now(UTC)


class SourceError(Exception):
    """An expected refusal (unknown job, job still running, ...) shown to the user as a notice."""


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class JobRow:
    """One line of the jobs table: the store's ``JobSummary`` of the job, and what the table
    derives from it and from the job's series. A view, not a store value: its own fields are only
    those no store value holds (progress as a fraction, the ETA, the ASRs, the loss sparkline,
    the method); the job's own fields are read from ``job``."""

    job: JobSummary
    progress: float | None = None  # 0..1 of the current stage
    stage: str | None = None
    eta_s: float | None = None
    acc_clean: float | None = None
    asr: float | None = None  # the last
    asr_best: float | None = None  # the lowest of a defense, the highest of an attack (best_asr)
    loss_tail: tuple[float, ...] = ()
    method: str | None = None  # what tells a pipeline's rows apart: "point #3", "mesa-0.9", ...

    @property
    def id(self) -> int:
        return self.job.id

    @property
    def kind(self) -> str:
        return self.job.kind

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def created_at(self) -> datetime:
        return self.job.created_at

    @property
    def updated_at(self) -> datetime:
        return self.job.updated_at

    @property
    def study(self) -> str | None:
        return self.job.studies[0] if self.job.studies else None

    @property
    def trigger(self) -> str | None:
        return self.job.trigger

    @property
    def target(self) -> int | None:
        return self.job.target

    @property
    def label(self) -> str:
        return self.job.label

    @property
    def note(self) -> str | None:
        return self.job.note

    @property
    def tags(self) -> tuple[str, ...]:
        return self.job.tags

    def finds(self, text: str) -> bool:
        """Whether the jobs filter's text is in the label, the note or a tag (any case), as
        the store's ``list_jobs(text=...)`` matches."""
        needle = text.lower()
        return any(needle in (part or "").lower() for part in (self.label, self.note, *self.tags))


@dataclass(frozen=True)
class JobQuery:
    """The jobs table's filter; ``None`` means any."""

    statuses: frozenset[str] | None = None
    kind: str | None = None
    study: str | None = None
    text: str | None = None  # in the label, note or a tag

    def matches(self, row: JobRow) -> bool:
        return (
            (self.statuses is None or row.status in self.statuses)
            and (self.kind is None or row.kind == self.kind)
            and (self.study is None or row.study == self.study)
            and (not self.text or row.finds(self.text))
        )

    def describe(self) -> str:
        parts = []
        if self.statuses:
            parts.append("status " + ",".join(sorted(self.statuses)))
        if self.kind:
            parts.append(f"kind {self.kind}")
        if self.study:
            parts.append(f"study {self.study}")
        if self.text:
            parts.append(f"finding {self.text!r}")
        return "; ".join(parts) or "all jobs"


@dataclass(frozen=True)
class JobsPage:
    """Rows changed since the cursor (and every running job); ``ids`` lists every matching job
    when the read was a full one (then rows not in it are gone), else None."""

    rows: tuple[JobRow, ...]
    ids: frozenset[int] | None
    cursor: datetime | None


@dataclass(frozen=True)
class JobView:
    """What the run screen shows of a job that is not a series or a log line: the store's
    ``JobDetail`` (spec, attempts, links, artifacts), the job's row as the jobs table shows it
    (progress, ETA, method) and the latest value of each metric over its attempts. A view, not
    a store value: the row and the latest values are read beside the detail."""

    detail: JobDetail
    job: JobRow
    latest: Mapping[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.detail.job.spec or {}

    @property
    def runs(self) -> tuple[RunInfo, ...]:
        return self.detail.runs

    @property
    def artifacts(self) -> tuple[ArtifactInfo, ...]:
        return self.detail.artifacts

    @property
    def params(self) -> Mapping[str, str]:
        return self.detail.params

    @property
    def depends_on(self) -> tuple[int, ...]:
        return tuple(d.job_id for d in self.detail.depends_on)

    @property
    def workdir(self) -> str | None:
        return self.detail.workdir

    @property
    def error(self) -> str | None:
        return self.detail.job.error

    @property
    def run_ids(self) -> tuple[int, ...]:
        return tuple(r.id for r in self.runs)


HISTORY_POINTS = 1000  # a series' history is read as at most 2x this many points (min and max)


@dataclass(frozen=True)
class EngineStatus:
    """The live engines summed up for the engine bar (one host, slots and GPUs over them all).

    Not a store value: the store hands one ``EngineInfo`` per engine; this is the app's view of
    all of them, built from those and nothing else (the system pane shows each one as it is)."""

    engines: tuple[EngineInfo, ...] = ()

    @property
    def alive(self) -> bool:
        return bool(self.engines)

    @property
    def host(self) -> str | None:
        if not self.engines:
            return None
        first, more = self.engines[0].host, len(self.engines) - 1
        return f"{first} +{more}" if more else first

    @property
    def pid(self) -> int | None:
        return self.engines[0].pid if self.engines else None

    @property
    def slots_total(self) -> int:
        return sum(e.slots for e in self.engines)

    @property
    def slots_busy(self) -> int:
        return sum(e.slots_used for e in self.engines)

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        return tuple(g for e in self.engines for g in e.gpus)

    @property
    def heartbeat_at(self) -> datetime | None:
        return max((e.heartbeat_at for e in self.engines), default=None)


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are known; None when none is."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class GridCell:
    """A cell of the study screen's grid: one trigger x method, its defenses' ASR and clean
    accuracy averaged over seeds, and the first of their jobs. Not the store's ``StudyCell`` (one
    defense of one seed); built from those (``of``)."""

    asr: float | None
    acc_clean: float | None = None
    job_id: int | None = None

    @classmethod
    def of(cls, cells: Sequence[StudyCell]) -> GridCell:
        return cls(
            _mean([c.asr for c in cells]), _mean([c.acc_clean for c in cells]), cells[0].job_id
        )


@dataclass(frozen=True)
class StudyGrid:
    """The study screen: the store's ``StudySummary`` as ASR after repair per trigger (rows) and
    method (columns), seeds averaged into a ``GridCell`` with the job behind it. A view, built
    from the summary and nothing else but ``statistics``: the study's table from
    ``engine.report.study_stats`` (the one `study show` prints), None where no repair wrote
    per-image outcomes; where it has a method, that method's mean, interval and worst come from
    it (implanted triggers only)."""

    summary: StudySummary
    statistics: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.summary.study.name

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(r.method for r in self.summary.rows)

    @property
    def triggers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.trigger for c in self.summary.cells))

    @cached_property
    def cells(self) -> Mapping[tuple[str, str], GridCell]:
        grouped: dict[tuple[str, str], list[StudyCell]] = {}
        for c in self.summary.cells:
            grouped.setdefault((c.trigger, c.method), []).append(c)
        return {key: GridCell.of(group) for key, group in grouped.items()}

    @property
    def notes(self) -> tuple[str, ...]:
        return self.summary.protocol_notes

    def paper_numbers(self, method: str) -> tuple[float | None, float | None] | None:
        """The paper's (mean, worst) for a method: the study's own record, else section 5."""
        row = next((r for r in self.summary.rows if r.method == method), None)
        own = (row.paper_asr_mean, row.paper_asr_worst) if row is not None else (None, None)
        return own if own != (None, None) else paper_bw_numbers(method)

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

    def detail(self, trigger: str, method: str) -> str | None:
        """The statistics' line on a cell (one seed per trigger; with several, the rows are
        per seed and the grid's cells their mean, so there is none)."""
        statistics = self.statistics or {}
        row = statistics.get("per_trigger", {}).get(trigger)
        return cell_detail(row, method, statistics.get("reference", "mesa"))

    def acc_clean(self, method: str) -> float | None:
        """Clean accuracy after repair, the mean over the triggers that have one."""
        return _mean([c.acc_clean for (_, m), c in self.cells.items() if m == method])

    @property
    def statistics_error(self) -> str | None:
        return (self.statistics or {}).get("error")


def cell_detail(row: Mapping[str, Any] | None, method: str, reference: str) -> str | None:
    """One line on a trigger x method cell from ``stats.summarize``'s per-trigger row: the ASR
    with its interval (point: its restarts' range), clean accuracy, the paired difference of
    ``reference`` (MESA) minus it with its interval and McNemar's p, and the ASR before repair
    (alone for a method the row lacks, such as the grid's trigger column); None without a row."""
    if not row:
        return None

    def pts(v: float) -> str:
        return f"{100 * v:.1f}"

    before = f"before repair {pts(row['attack_asr'])} %" if row.get("attack_asr") else None
    found = row.get("methods", {}).get(method)
    if not found:
        return before
    if "spread" in found:
        lo, hi = found["spread"]
        spread = f"{found['restarts']} restarts {pts(lo)}–{pts(hi)}"
    else:
        spread = f"95 % {pts(found['lo'])}–{pts(found['hi'])}, {found['n']} images"
    parts = [f"{method} {pts(found['asr'])} % ({spread})"]
    if found.get("acc_clean") is not None:
        parts.append(f"clean acc {pts(found['acc_clean'])} %")
    versus = row.get("versus_reference", {}).get(method)
    if versus:
        test = f", McNemar p {versus['p_mcnemar']:.2g}" if "p_mcnemar" in versus else ""
        parts.append(
            f"{reference} minus {method} {pts(versus['diff'])} points "
            f"[{pts(versus['lo'])}, {pts(versus['hi'])}]{test}"
        )
    return " · ".join(parts + ([before] if before else []))


@dataclass(frozen=True)
class ResultsGrid:
    """The study screen over one stamping rate of a result folder that
    ``benchmarks/paper_study.py`` writes (``engine.report.paper.summary``, the numbers of
    ``study show FOLDER``): the same questions as ``StudyGrid`` answers, no job behind a cell
    (``record`` names the file a cell comes from)."""

    folder: Path
    rate: str
    data: Mapping[str, Any]

    @classmethod
    def load(cls, folder: Path, rate: str) -> ResultsGrid:
        from engine.report import paper

        return cls(folder, rate, paper.summary(folder))

    @property
    def entry(self) -> Mapping[str, Any]:
        return self.data["rates"][self.rate]

    @property
    def name(self) -> str:
        return results_name(self.folder, self.rate, self.data["main_rate"])

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.entry.get("methods", {}))

    @property
    def triggers(self) -> tuple[str, ...]:
        def by_id(name: str) -> tuple[str, int]:  # bw:2 before bw:10
            family, _, number = name.partition(":")
            return (family, int(number)) if number.isdigit() else (name, -1)

        return tuple(sorted(self.entry["triggers"], key=by_id))

    @cached_property
    def cells(self) -> Mapping[tuple[str, str], GridCell]:
        rows = self.entry.get("per_trigger", {})
        return {
            (t, m): GridCell(v.get("asr"), v.get("acc_clean"))
            for t, row in rows.items()
            for m, v in row["methods"].items()
        }

    @property
    def notes(self) -> tuple[str, ...]:
        dropped = self.entry.get("not_implanted", {}).get("triggers", [])
        return (f"not implanted, left out of the means: {', '.join(dropped)}",) if dropped else ()

    def detail(self, trigger: str, method: str) -> str | None:
        row = self.entry.get("per_trigger", {}).get(trigger)
        return cell_detail(row, method, self.entry.get("reference", "mesa"))

    def record(self, trigger: str) -> Path:
        return self.folder / f"rate-{self.rate}" / f"{trigger.replace(':', '-')}.json"

    def paper_numbers(self, method: str) -> tuple[float | None, float | None] | None:
        row = self.data["paper"].get(method)
        return (row["mean"], row["worst"]) if row else None

    def _method(self, method: str) -> Mapping[str, Any]:
        return self.entry.get("methods", {}).get(method) or {}

    def interval(self, method: str) -> tuple[float, float] | None:
        mean = self._method(method).get("asr_mean")
        return (mean["lo"], mean["hi"]) if mean else None

    def mean(self, method: str) -> float | None:
        return (self._method(method).get("asr_mean") or {}).get("mean")

    def worst(self, method: str) -> float | None:
        return (self._method(method).get("worst") or {}).get("asr")

    def acc_clean(self, method: str) -> float | None:
        return self._method(method).get("acc_clean_mean")

    @property
    def statistics_error(self) -> str | None:
        return None if self.entry.get("methods") else "no MESA repair at this rate yet"


Grid = StudyGrid | ResultsGrid  # what the study screen shows


def results_name(folder: Path, rate: str, main_rate: float) -> str:
    """A result folder's rate as the study screen lists it (spaces: no store study is named so)."""
    return f"{folder.name} · rate {rate}{' (main)' if float(rate) == main_rate else ''}"


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

    def job_detail(self, job_id: int) -> JobView: ...

    def metric_points(
        self, run_ids: Sequence[int], after_id: int, limit: int = 50_000
    ) -> list[MetricPoint]:
        """Points of these runs with id above ``after_id``, ascending by id."""

    def metric_history(self, job_id: int, max_points: int = HISTORY_POINTS) -> MetricHistory:
        """Every series of the job (attempts joined at resume), at most ``2 * max_points`` points
        each (first, last, min and max per step range), and the cursor to continue from."""

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogEntry]: ...

    def engine_status(self) -> EngineStatus: ...

    def studies(self) -> list[str]: ...

    def study_summary(self, name: str) -> Grid: ...

    def submit(self, kind: str, spec: Mapping[str, Any], study: str | None = None) -> list[int]:
        """Queue the job(s) of a validated spec; returns the new job ids."""

    def cancel(self, job_id: int) -> None: ...

    def retry(self, job_id: int) -> int:
        """Queue a finished job again; returns the job id that will run."""

    def delete(self, job_id: int) -> None: ...

    def annotate(self, job_id: int, note: str | None, tags: Sequence[str]) -> JobRow:
        """Replace a job's note and tags; returns its row as the table shows it."""

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
    # Learned placement: per beta the position distribution pi (Hp, Wp) from positions.npy, and
    # per offset how many evaluated stamps there sent their image to the target (landing.npy).
    positions: Mapping[str, np.ndarray] = field(default_factory=dict)
    landing: Mapping[str, np.ndarray] = field(default_factory=dict)


def search_dirs(detail: JobView) -> list[Path]:
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
            f.parent.name.removeprefix("beta="): as_chw(np.load(f, allow_pickle=False))
            for f in files
        }
        return TriggerSamples(
            str(directory),
            by_beta,
            _ground_truth(directory),
            stamp,
            _position_maps(directory, "positions.npy"),
            _position_maps(directory, "landing.npy"),
        )
    return None


def _position_maps(directory: Path, name: str) -> dict[str, np.ndarray]:
    """Per beta the (Hp, Wp) map ``beta=<b>/<name>`` of a learned search; none for the others."""
    maps = {}
    for f in sorted(directory.glob(f"beta=*/{name}")):
        try:
            values = np.load(f, allow_pickle=False)
        except (OSError, ValueError):
            continue  # half-written or damaged: the next poll reads it again
        if values.ndim == 2:
            maps[f.parent.name.removeprefix("beta=")] = values.astype(np.float32)
    return maps


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
# The store adapter


LOSS_KEYS = ("train/loss", "repair/loss", "mesa/loss")
LOSS_TAIL = 24  # values of the jobs table's loss sparkline
ASR_KEYS = ("eval/asr",)  # a repair logs its ASR as eval/asr after each epoch


def best_asr(kind: str, low: float, high: float) -> float:
    """A job's best ASR: a defense aims low, an attack (any other kind that logs one) high."""
    return low if kind == "defend" else high


REFERENCE_FIELDS = ("model", "search", "init_from")  # spec fields that may name an upstream job


def _eta(progress: Any) -> float | None:
    """Seconds left in the current stage, from its start and how far it got."""
    if progress is None or not progress.total or progress.started is None or progress.done <= 0:
        return None
    elapsed = progress.wall_time - float(progress.started)
    fraction = progress.done / progress.total
    return max(0.0, elapsed * (1 - fraction) / fraction) if elapsed > 0 else None


def label_method(label: str | None, spec: Mapping[str, Any], trigger: str | None) -> str | None:
    """What a job does: its label's words before the job's own ``trigger`` ("point #3 bw:85 -> 0"
    with trigger bw:85 -> "point #3", "mesa-0.9 square:white -> 0" -> "mesa-0.9"), else the spec's
    method, else the whole label: the pipeline's defend rows share kind and trigger and differ
    only here. The trigger is the job's field; nothing is looked for in the label but that text."""
    head = label or ""
    found = _trigger_at(head, trigger) if trigger else None
    head = head[:found].strip() if found is not None else ""
    method = spec.get("method")
    return head or (str(method) if method else None) or label or None


def _trigger_at(label: str, trigger: str) -> int | None:
    """Where ``trigger`` stands in ``label`` as a word of its own (not inside a longer trigger:
    bw:1 is not in "bw:170"), else None."""
    found = re.search(rf"(?<!\w){re.escape(trigger)}(?!\S)", label)
    return found.start() if found else None


class StoreSource:
    """``DataSource`` over ``store.repository.Store``; called from worker threads only.

    The store's entities are mapped to the UI's values here, so a schema change touches one place.
    Loss sparklines come from ``metric_tail`` (the last values by one indexed read), cached per job.
    """

    def __init__(self, store: Any, results: Sequence[Path] = ()):
        self.store = store
        self.results = tuple(results)  # result folders of benchmarks/paper_study.py, read-only
        # job id -> (run id, key, status, value): a finished job's tail or range is read once
        self._loss: dict[int, tuple[int, str, str, Any]] = {}
        self._asr: dict[int, tuple[int, str, str, Any]] = {}
        self._lock = threading.Lock()

    def _row(
        self,
        s: Any,
        loss_tail: tuple[float, ...] = (),
        asr_range: tuple[float, float] | None = None,
    ) -> JobRow:
        progress = s.progress if s.status == "running" else None
        return JobRow(
            s,
            progress=progress.fraction
            if progress is not None
            else (1.0 if s.status == "succeeded" else None),
            stage=progress.stage if progress is not None else None,
            eta_s=_eta(progress),
            acc_clean=s.latest.get("eval/acc_clean", s.latest.get("repair/acc_clean")),
            asr=next((s.latest[k] for k in ASR_KEYS if k in s.latest), None),
            asr_best=best_asr(s.kind, *asr_range) if asr_range else None,
            loss_tail=loss_tail,
            method=label_method(s.label, s.spec or {}, s.trigger),
        )

    def _loss_tails(self, summaries: Iterable[Any]) -> dict[int, tuple[float, ...]]:
        """The last values of each job's loss (``metric_tail``, one read per loss key)."""

        def read(ids: list[int], key: str) -> Mapping[int, Any]:
            return self.store.metric_tail(ids, key, LOSS_TAIL)

        return {
            job_id: tuple(tail)
            for job_id, tail in self._per_job(self._loss, LOSS_KEYS, summaries, read).items()
        }

    def _asr_ranges(self, summaries: Iterable[Any]) -> dict[int, tuple[float, float]]:
        """The least and greatest ASR of each job's newest run (``metric_range``)."""
        ranges = self._per_job(self._asr, ASR_KEYS, summaries, self.store.metric_range)
        return {job_id: r for job_id, r in ranges.items() if r}

    def _per_job(
        self,
        cache: dict[int, tuple[int, str, str, Any]],
        keys: Sequence[str],
        summaries: Iterable[Any],
        read: Callable[[list[int], str], Mapping[int, Any]],
    ) -> dict[int, Any]:
        """A value read from a job's series: one ``read`` per key for the jobs whose series may
        have moved (running ones, and any not read since its run or status changed); the others
        come from ``cache``. The key is the first of ``keys`` the job has a latest value of."""
        out: dict[int, Any] = {}
        wanted: dict[str, list[Any]] = {}
        with self._lock:
            for s in summaries:
                cached = cache.get(s.id)
                key = next((k for k in keys if k in s.latest), None)
                if s.current_run_id is None or key is None:
                    # Nothing to read: the value read from this run before, if any (never one
                    # from an earlier run: a retried job's series starts again).
                    same_run = cached is not None and cached[0] == s.current_run_id
                    out[s.id] = cached[3] if same_run else ()
                elif (
                    cached is not None
                    and cached[:3] == (s.current_run_id, key, s.status)
                    and s.status != "running"
                ):
                    out[s.id] = cached[3]
                else:
                    wanted.setdefault(key, []).append(s)
        for key, group in wanted.items():
            found = read([s.id for s in group], key)
            with self._lock:
                for s in group:
                    out[s.id] = found.get(s.id, ())
                    cache[s.id] = (s.current_run_id, key, s.status, out[s.id])
        return out

    def jobs(
        self, query: JobQuery, changed_since: datetime | None, all_ids: bool = False
    ) -> JobsPage:
        statuses = sorted(query.statuses) if query.statuses else None
        where = {"kind": query.kind, "study": query.study, "text": query.text}
        changed = self.store.list_jobs(status=statuses, changed_since=changed_since, **where)
        rows = {s.id: s for s in changed}
        if changed_since is not None and (statuses is None or "running" in statuses):
            for s in self.store.list_jobs(status="running", **where):
                rows.setdefault(s.id, s)
        cursor = max((s.updated_at for s in changed), default=changed_since)
        ids = frozenset(rows) if changed_since is None else None
        if ids is None and all_ids:
            # Read after the rows: a job made in between is listed here and read at the next
            # poll (it changed after the cursor); one deleted in between is dropped.
            ids = frozenset(self.store.job_ids(status=statuses, **where))
        tails = self._loss_tails(rows.values())
        asrs = self._asr_ranges(rows.values())
        return JobsPage(
            tuple(self._row(s, tails.get(s.id, ()), asrs.get(s.id)) for s in rows.values()),
            ids,
            cursor,
        )

    def job_detail(self, job_id: int) -> JobView:
        d = self.store.job_detail(job_id)
        latest: dict[str, float] = {}
        by_run = self.store.latest_metrics([r.id for r in d.runs])
        for r in d.runs:
            latest.update(by_run.get(r.id, {}))
        # The run screen draws the curves themselves: the row needs no loss tail.
        return JobView(d, self._row(d.job), latest)

    def metric_points(
        self, run_ids: Sequence[int], after_id: int, limit: int = 50_000
    ) -> list[MetricPoint]:
        return self.store.metrics_since(list(run_ids), after_id, limit=limit)

    def metric_history(self, job_id: int, max_points: int = HISTORY_POINTS) -> MetricHistory:
        return self.store.metric_series_columns(job_id, max_points=max_points)

    def logs(self, run_ids: Sequence[int], after_id: int, limit: int = 2_000) -> list[LogEntry]:
        return self.store.logs(run_ids=list(run_ids), after_id=after_id, limit=limit)

    def engine_status(self) -> EngineStatus:
        return EngineStatus(tuple(self.store.engines(alive_only=True)))

    def studies(self) -> list[str]:
        return [s.name for s in self.store.studies()] + list(self._results_rates())

    def _results_rates(self) -> dict[str, tuple[Path, str]]:
        """Each rate of each result folder by its listed name (read again: a run adds rates)."""
        from engine.errors import UserError
        from engine.report import paper

        named = {}
        for folder in self.results:
            try:
                by_rate, main = paper.read_folder(folder)
            except UserError:  # listed all the same: choosing it says what is wrong
                named[f"{folder.name} · rate ? (unreadable)"] = (folder, "?")
                continue
            for rate in sorted(by_rate):
                named[results_name(folder, f"{rate:g}", main)] = (folder, f"{rate:g}")
        return named

    def study_summary(self, name: str) -> Grid:
        from engine.errors import UserError
        from engine.report.study_stats import study_statistics

        if " · rate " in name:
            folder, rate = self._results_rates().get(name, (None, ""))
            try:
                grid = ResultsGrid.load(folder, rate) if folder else None
            except UserError as exc:  # a damaged record: its one line
                raise SourceError(str(exc)) from None
            if grid is None or rate not in grid.data["rates"]:
                raise SourceError(f"'{name}' is no longer in its result folder; press f5")
            return grid
        summary = self.store.study_summary(name)
        return StudyGrid(summary, study_statistics(self.store, name))

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

    def annotate(self, job_id: int, note: str | None, tags: Sequence[str]) -> JobRow:
        have = set(self.store.job(job_id).tags)
        want = {t.strip() for t in tags}
        self.store.tag(job_id, add=sorted(want - have), remove=sorted(have - want))
        summary = self.store.set_note(job_id, note)
        tail = self._loss_tails([summary]).get(job_id, ())
        return self._row(summary, tail, self._asr_ranges([summary]).get(job_id))

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

        env = dict(os.environ, MESA_TUI_DB=self.store.url)
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

        if kind == "study" and str(key) in (rates := self._results_rates()):
            folder = rates[str(key)][0]
            out = default_report_dir(folder.name)
            return build_report(None, str(folder), out, kind="results").report
        name = str(key) if kind == "study" else f"job-{key}"
        return build_report(self.store, str(key), default_report_dir(name), kind=kind).report


def open_store_source(db_url: str | None = None, results: Sequence[Path] = ()) -> StoreSource:
    """The store behind ``--db`` / ``MESA_TUI_DB`` / the default SQLite file, wrapped for the app,
    with the result folders of ``--results`` beside its studies."""
    from store.repository import Store

    return StoreSource(Store(db_url), results)
