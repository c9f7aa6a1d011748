"""Frozen value objects the repository hands to the CLI, the TUI and the engine (never ORM rows).

Everything here is plain data: safe to pass between threads, to post in Textual messages and to
turn into JSON with ``to_json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
FINISHED = ("succeeded", "failed", "cancelled", "lost")
# Finished without success: what `retry` accepts, and what an upstream job must not be.
RETRYABLE = ("failed", "cancelled", "lost")
ACTIVE = ("queued", "running")


MAX_TAG = 60  # job_tags.tag's width


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` cannot be stored (a tag is one word: no spaces or commas), else None."""
    clean = tag.strip()
    if clean and len(clean) <= MAX_TAG and not any(c.isspace() or c == "," for c in clean):
        return None
    return (
        f"tag {tag!r} is not one word of 1 to {MAX_TAG} characters; give tags as separate "
        "words, e.g. `mesa-tui tag 12 baseline paper`"
    )


def to_json(obj: Any) -> Any:
    """Any entity (or list/dict of them) as JSON-ready data; datetimes as ISO-8601 UTC strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, datetime):
        return obj.isoformat().replace("+00:00", "Z")
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the engine's heartbeat reports it (NVML); the faces never touch CUDA."""

    index: int
    name: str
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    utilization_pct: float | None = None


@dataclass(frozen=True)
class SlotLoad:
    """What one slot's child uses (psutil on the engine's host), with the slot's GPU."""

    slot: int
    gpu: str | None = None
    job_id: int | None = None
    cpu_pct: float | None = None  # of one core, as top shows it
    rss_mb: float | None = None


@dataclass(frozen=True)
class SystemInfo:
    """The engine host's CPU and memory at its last heartbeat, and each slot's child."""

    cpus: int
    cpu_pct: float | None = None  # of the whole host
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    slots: tuple[SlotLoad, ...] = ()


@dataclass(frozen=True)
class EngineInfo:
    """An engine process; ``alive`` is computed when read (fresh heartbeat, not stopped)."""

    id: int
    host: str
    pid: int
    version: str
    executor: str
    slots: int
    slots_used: int
    gpus: tuple[GpuInfo, ...]
    log_path: str | None
    started_at: datetime
    heartbeat_at: datetime
    stop_requested_at: datetime | None
    stopped_at: datetime | None
    alive: bool
    system: SystemInfo | None = None  # None: an engine from before 0.3 or without psutil

    def slot_gpu(self, slot: SlotLoad) -> GpuInfo | None:
        """The NVML figures of a slot's GPU; None for a CPU slot or a GPU NVML did not report."""
        return next((g for g in self.gpus if str(g.index) == slot.gpu), None)


@dataclass(frozen=True)
class Progress:
    """The latest ``reporter.progress`` of a run (drives progress bars and ETAs)."""

    stage: str
    done: int
    total: int
    info: dict[str, float]
    wall_time: float
    started: float | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


@dataclass(frozen=True)
class JobSummary:
    """One row of the jobs list. ``latest`` holds the newest metric values of the current run."""

    id: int
    kind: str
    label: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    executor: str
    spec: dict[str, Any]
    spec_hash: str
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    reused_from: int | None
    studies: tuple[str, ...]
    current_run_id: int | None
    progress: Progress | None
    latest: dict[str, float]
    cancel_requested: bool
    note: str | None = None  # the researcher's words on the job (``mesa-tui note``)
    tags: tuple[str, ...] = ()  # sorted (``mesa-tui tag``)
    trigger: str | None = None  # the backdoor it plants or works against (``backdoor_of``)
    target: int | None = None  # that backdoor's target class


@dataclass(frozen=True)
class RunInfo:
    """One attempt of a job, with where and how it ran."""

    id: int
    job_id: int
    attempt: int
    status: str
    executor: str
    engine_id: int | None
    external_id: str | None
    host: str | None
    gpu: str | None
    resumed: bool
    start_step: int | None
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime | None
    expect_next_by: datetime | None
    exit_code: int | None
    error: str | None
    seed: int | None
    code_version: str | None
    spec_hash: str | None
    dataset_hash: str | None
    env: dict[str, Any]
    progress: Progress | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class Dependency:
    """An upstream job; ``input_field`` is the spec field that receives its artifact."""

    job_id: int
    kind: str
    status: str
    input_field: str | None


@dataclass(frozen=True)
class ArtifactInfo:
    id: int
    run_id: int
    job_id: int
    kind: str
    path: str
    sha256: str | None
    bytes: int | None
    created_at: datetime


@dataclass(frozen=True)
class JobDetail:
    """Everything about one job: the summary, the spec, every attempt, links and artifacts."""

    job: JobSummary
    workdir: str | None
    code_version: str | None
    dataset_hash: str | None
    result: dict[str, Any] | None
    runs: tuple[RunInfo, ...]
    depends_on: tuple[Dependency, ...]
    dependents: tuple[int, ...]
    artifacts: tuple[ArtifactInfo, ...]
    params: dict[str, str]


@dataclass(frozen=True, slots=True)  # slots: a long run's history is many of these
class MetricPoint:
    """A stored metric value; ``id`` is the cursor for incremental reads."""

    id: int
    run_id: int
    key: str
    step: int
    value: float
    wall_time: float


@dataclass(frozen=True)
class SeriesPoint:
    """A point of a job's series with the attempt it came from (attempts joined at resume)."""

    step: int
    value: float
    wall_time: float
    run_id: int
    attempt: int


@dataclass(frozen=True)
class SeriesColumns:
    """One metric of a job as plain columns (attempts joined at resume), perhaps downsampled:
    ``count`` is how many stored points ``steps``/``values`` stand for."""

    steps: list[int]
    values: list[float]
    count: int


@dataclass(frozen=True)
class MetricHistory:
    """A job's series read in one snapshot; ``cursor`` is the largest point id of its runs then
    (read newer points with ``metrics_since(run_ids, cursor)``)."""

    cursor: int
    run_ids: tuple[int, ...]
    series: dict[str, SeriesColumns]

    @property
    def count(self) -> int:
        """How many stored points the series stand for."""
        return sum(c.count for c in self.series.values())


@dataclass(frozen=True)
class LogEntry:
    id: int
    run_id: int
    level: str
    message: str
    wall_time: float

    @property
    def time(self) -> datetime:
        """``wall_time`` as an aware UTC datetime (the app's log view shows its clock time)."""
        return datetime.fromtimestamp(self.wall_time, UTC)


@dataclass(frozen=True)
class StudyInfo:
    """A study and how many of its jobs are in each status."""

    id: int
    name: str
    template: str
    params: dict[str, Any]
    created_at: datetime
    job_count: int
    status_counts: dict[str, int]


@dataclass(frozen=True)
class StudyMember:
    study_id: int
    job_id: int
    role: str
    trigger: str | None
    method: str | None
    seed: int | None
    kind: str
    status: str


@dataclass(frozen=True)
class StudyRepair:
    """A succeeded defense of a study with what its statistics read: the method as the study
    labels it, the spec (point index, stamping rate, target) and the result (metrics, artifact)."""

    job_id: int
    trigger: str | None
    method: str | None
    seed: int | None
    spec: dict[str, Any]
    result: dict[str, Any] | None


@dataclass(frozen=True)
class StudyCell:
    """One finished (or pending) defense of a study: trigger x method x seed."""

    trigger: str
    method: str
    seed: int | None
    job_id: int
    status: str
    asr: float | None
    acc_clean: float | None
    ra: float | None


@dataclass(frozen=True)
class MethodSummary:
    """A row of the study table: ours (mean, worst, spread over seeds) and the paper's."""

    method: str
    cells: int
    done: int
    asr_mean: float | None
    asr_worst: float | None
    asr_seed_std: float | None
    acc_clean_mean: float | None
    ra_mean: float | None
    paper_asr_mean: float | None
    paper_asr_worst: float | None


@dataclass(frozen=True)
class StudySummary:
    """What ``study show`` prints and the TUI's study screen draws (the same function)."""

    study: StudyInfo
    rows: tuple[MethodSummary, ...]
    cells: tuple[StudyCell, ...]
    protocol_notes: tuple[str, ...]


# Spec fields that name the job whose model a job reads (``"model": "job:12"``), in the order
# a job inherits its trigger and target from them.
UPSTREAM_FIELDS = ("model", "search", "init_from")
_NO_TRIGGER = ("", "none", "clean")


def spec_target(spec: dict[str, Any]) -> int | None:
    """The spec's target class when it gives one (not a reference like ``job:13:flagged``)."""
    value = spec.get("target")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def backdoor_of(
    spec: dict[str, Any],
    upstream: tuple[str | None, int | None] | None = None,
    fallback_trigger: str | None = None,
) -> tuple[str | None, int | None]:
    """A job's ``(trigger, target)``: the backdoor it plants (an attack) or searches, detects or
    repairs (a job reading an upstream model), stored with the job so no face reads them from
    its label.

    A spec with a ``trigger`` field (train) decides: its trigger and target, or neither when it
    trains clean. Any other job takes the trigger of ``upstream`` (the ``(trigger, target)`` of
    the job its first ``UPSTREAM_FIELDS`` field names), else ``fallback_trigger`` (the study's);
    its target is the spec's, else the upstream one (a search told to use the class a detection
    flags attacks the upstream model's target)."""
    target = spec_target(spec)
    if "trigger" in spec:
        value = spec["trigger"]
        trigger = value if isinstance(value, str) and value.lower() not in _NO_TRIGGER else None
        return trigger, (target if trigger is not None else None)
    up_trigger, up_target = upstream or (None, None)
    return up_trigger or fallback_trigger, (target if target is not None else up_target)


@dataclass(frozen=True)
class NewJob:
    """A job to submit. ``depends_on`` items are ``(upstream, input_field)`` where upstream is an
    existing job id (int) or ``"#i"``, the i-th job of the same submission. ``role``,
    ``trigger``, ``method`` and ``seed`` place the job in its study. The job's own trigger and
    target come from its spec or its upstream job (``backdoor_of``, at insert); ``trigger``
    stands in only where neither names one."""

    kind: str
    spec: dict[str, Any]
    spec_hash: str
    label: str = ""
    depends_on: tuple[tuple[int | str, str | None], ...] = ()
    priority: int = 0
    max_attempts: int = 3
    role: str = ""
    trigger: str | None = None
    method: str | None = None
    seed: int | None = None
    reuse_of: int | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """What the engine needs to launch one attempt (from ``claim_jobs``)."""

    job_id: int
    run_id: int
    attempt: int
    kind: str
    spec: dict[str, Any]
    spec_hash: str
    workdir: str | None
    resume: bool
    inputs: dict[str, int] = field(default_factory=dict)
