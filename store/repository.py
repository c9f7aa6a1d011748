"""Every query the CLI, the TUI and the engine use; callers get frozen dataclasses, never rows.

Writers: the faces write requests only (new jobs, cancels, retries, deletions, studies, engine stop
requests); runs, metrics, logs, artifacts and heartbeats are written by the engine (or by the
foreground recorder for its own run). Every write is one short ``BEGIN IMMEDIATE`` transaction.

Open a store with ``Store()`` (the URL of ``--db``/``MESA_TUI_DB``, else SQLite in the data home). A new
database is created at the newest schema; one behind it is refused with the upgrade command.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from store import db as dbmod
from store import downsample, health
from store.entities import (
    ACTIVE,
    RETRYABLE,
    STATUSES,
    UPSTREAM_FIELDS,
    ArtifactInfo,
    ClaimedJob,
    Dependency,
    EngineInfo,
    GpuInfo,
    JobDetail,
    JobSummary,
    LogEntry,
    MethodSummary,
    MetricHistory,
    MetricPoint,
    NewJob,
    Progress,
    RunInfo,
    SeriesColumns,
    SeriesPoint,
    SlotLoad,
    StudyCell,
    StudyInfo,
    StudyMember,
    StudyRepair,
    StudySummary,
    SystemInfo,
    backdoor_of,
    tag_problem,
)
from store.errors import UserError
from store.models import (
    Artifact,
    Base,
    EngineRow,
    Job,
    JobDependency,
    JobTag,
    LatestMetric,
    LogLine,
    Metric,
    Param,
    Run,
    Study,
    StudyJob,
)
from store.paths import default_db_url


def _table(model: type[Base]) -> Table:
    # Declarative typing promises a FromClause; every model here maps one plain table.
    table = model.__table__
    assert isinstance(table, Table), model
    return table


jobs_t = _table(Job)
runs_t = _table(Run)
deps_t = _table(JobDependency)
studies_t = _table(Study)
study_jobs_t = _table(StudyJob)
engines_t = _table(EngineRow)
metrics_t = _table(Metric)
latest_t = _table(LatestMetric)
artifacts_t = _table(Artifact)
logs_t = _table(LogLine)
params_t = _table(Param)
tags_t = _table(JobTag)

# An engine whose heartbeat is older than this is dead (it beats every few seconds).
ENGINE_DEAD_AFTER_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


class UnknownJob(UserError):
    """A job id that is not in the store."""


class UnknownStudy(UserError):
    """A study name that is not in the store (the faces then ask whether it meant a path)."""


SchemaBehind = health.SchemaBehind  # the schema is not this code's (older, newer, foreign)


# ------------------------------------------------------------------------------------------------
# Opening and upgrading


def _stamp_head(conn: Connection, head: str) -> None:
    conn.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    )
    conn.exec_driver_sql("DELETE FROM alembic_version")
    conn.exec_driver_sql(f"INSERT INTO alembic_version (version_num) VALUES ('{head}')")


def ensure_schema(engine: Any, url: str) -> None:
    """Create a new database at the newest schema, or refuse one that is behind it."""
    from store.migrations import HEAD

    revision = dbmod.current_revision(engine)
    if revision == HEAD:
        return
    if revision is None:
        with dbmod.creation_lock(url):
            revision = dbmod.current_revision(engine)
            if revision is None:
                if dbmod.has_tables(engine):
                    raise health.schema_problem(url, None, "foreign")
                with dbmod.write_transaction(engine) as conn:
                    Base.metadata.create_all(conn)
                    _stamp_head(conn, HEAD)
                return
    if revision == HEAD:
        return
    from store.migrations import known_revisions

    state: health.SchemaState = "behind" if revision in known_revisions() else "unknown"
    raise health.schema_problem(url, revision, state)


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> None:
    """Switch SQLite's foreign keys on the driver's connection: SQLite ignores the pragma inside
    the transaction SQLAlchemy would open first."""
    if conn.dialect.name != "sqlite":
        return
    driver = conn.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver connection"
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def upgrade(url: str | None = None) -> tuple[str | None, str]:
    """Bring a database to the newest schema with alembic; returns (before, after) revisions."""
    from alembic import command

    from store.migrations import HEAD, alembic_config

    url = dbmod.check_url(url or default_db_url())
    with health.translated(url, opening=True):
        health.check_file(url)
        engine = dbmod.make_engine(url)
    try:
        with health.translated(url, opening=True), dbmod.creation_lock(url):
            before = dbmod.current_revision(engine)
            if before is None and not dbmod.has_tables(engine):
                with dbmod.write_transaction(engine) as conn:
                    Base.metadata.create_all(conn)
                    _stamp_head(conn, HEAD)
                return None, HEAD
            with engine.connect() as conn:
                # Batch mode copies tables; cascades must not fire while it drops the old ones.
                _sqlite_foreign_keys(conn, on=False)
                config = alembic_config(url)
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
                _sqlite_foreign_keys(conn, on=True)
        return before, dbmod.current_revision(engine) or HEAD
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------------
# Row -> entity


def _progress(value: dict[str, Any] | None) -> Progress | None:
    if not value:
        return None
    return Progress(
        stage=str(value.get("stage", "")),
        done=int(value.get("done", 0)),
        total=int(value.get("total", 0)),
        info=dict(value.get("info") or {}),
        wall_time=float(value.get("wall_time", 0.0)),
        started=value.get("started"),
    )


def _run_info(r: Any) -> RunInfo:
    return RunInfo(
        id=r.id,
        job_id=r.job_id,
        attempt=r.attempt,
        status=r.status,
        executor=r.executor,
        engine_id=r.engine_id,
        external_id=r.external_id,
        host=r.host,
        gpu=r.gpu,
        resumed=bool(r.resumed),
        start_step=r.start_step,
        started_at=r.started_at,
        ended_at=r.ended_at,
        heartbeat_at=r.heartbeat_at,
        expect_next_by=r.expect_next_by,
        exit_code=r.exit_code,
        error=r.error,
        seed=r.seed,
        code_version=r.code_version,
        spec_hash=r.spec_hash,
        dataset_hash=r.dataset_hash,
        env=dict(r.env or {}),
        progress=_progress(r.progress),
        result=r.result,
    )


def _engine_info(e: Any, now: datetime) -> EngineInfo:
    gpus = tuple(
        GpuInfo(
            index=int(g.get("index", i)),
            name=str(g.get("name", "")),
            memory_used_mb=g.get("memory_used_mb"),
            memory_total_mb=g.get("memory_total_mb"),
            utilization_pct=g.get("utilization_pct"),
        )
        for i, g in enumerate(e.gpus or [])
    )
    alive = e.stopped_at is None and (now - e.heartbeat_at).total_seconds() < ENGINE_DEAD_AFTER_S
    return EngineInfo(
        system=_system_info(e.system),
        id=e.id,
        host=e.host,
        pid=e.pid,
        version=e.version,
        executor=e.executor,
        slots=e.slots,
        slots_used=e.slots_used,
        gpus=gpus,
        log_path=e.log_path,
        started_at=e.started_at,
        heartbeat_at=e.heartbeat_at,
        stop_requested_at=e.stop_requested_at,
        stopped_at=e.stopped_at,
        alive=alive,
    )


def _system_info(value: dict[str, Any] | None) -> SystemInfo | None:
    """The heartbeat's ``system`` object (engine.system.snapshot) as an entity."""
    if not value:
        return None
    return SystemInfo(
        cpus=int(value.get("cpus") or 0),
        cpu_pct=value.get("cpu_pct"),
        mem_used_mb=value.get("mem_used_mb"),
        mem_total_mb=value.get("mem_total_mb"),
        slots=tuple(
            SlotLoad(
                slot=int(s.get("slot", i)),
                gpu=s.get("gpu"),
                job_id=s.get("job_id"),
                cpu_pct=s.get("cpu_pct"),
                rss_mb=s.get("rss_mb"),
            )
            for i, s in enumerate(value.get("slots") or [])
        ),
    )


def _artifact_info(a: Any) -> ArtifactInfo:
    return ArtifactInfo(
        id=a.id,
        run_id=a.run_id,
        job_id=a.job_id,
        kind=a.kind,
        path=a.path,
        sha256=a.sha256,
        bytes=a.bytes,
        created_at=a.created_at,
    )


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value if isinstance(value, str) else json.dumps(value)


def _insert_run(
    conn: Connection,
    job_id: int,
    spec: dict[str, Any],
    now: datetime,
    *,
    attempt: int,
    executor: str,
    host: str,
    code_version: str,
    spec_hash: str,
    engine_id: int | None = None,
    external_id: str | None = None,
    resumed: bool = False,
    expect_next_by: datetime | None = None,
) -> int:
    """A running attempt's row and its flattened spec as params (claims and foreground runs)."""
    run_id = conn.execute(
        insert(runs_t)
        .values(
            job_id=job_id,
            attempt=attempt,
            status="running",
            executor=executor,
            engine_id=engine_id,
            external_id=external_id,
            host=host,
            resumed=resumed,
            started_at=now,
            heartbeat_at=now,
            expect_next_by=expect_next_by,
            seed=spec.get("seed") if isinstance(spec.get("seed"), int) else None,
            code_version=code_version,
            spec_hash=spec_hash,
            env={},
        )
        .returning(runs_t.c.id)
    ).scalar_one()
    flat: dict[str, str] = {}
    _flatten("", spec, flat)
    if flat:
        conn.execute(
            insert(params_t),
            [{"run_id": run_id, "key": k[:200], "value": v} for k, v in flat.items()],
        )
    return run_id


# ------------------------------------------------------------------------------------------------
# Submissions


def _upstream(item: NewJob, ids: list[int]) -> list[tuple[int, str | None]]:
    """(upstream job id, input field) of a new job; ``#n`` names the n-th job submitted with it."""
    upstream: list[tuple[int, str | None]] = []
    for ref, input_field in item.depends_on:
        if isinstance(ref, str):
            index = int(ref.lstrip("#"))
            if not 0 <= index < len(ids):
                raise ValueError(f"dependency {ref} must name an earlier job")
            upstream.append((ids[index], input_field))
        else:
            upstream.append((int(ref), input_field))
    return upstream


def _upstream_backdoor(
    conn: Connection, upstream: list[tuple[int, str | None]]
) -> tuple[str | None, int | None] | None:
    """The trigger and target of the job a new job's model comes from: the upstream job its
    first ``UPSTREAM_FIELDS`` field names (``model`` before ``search`` before ``init_from``)."""
    by_field: dict[str | None, int] = {}
    for up, input_field in upstream:
        by_field.setdefault(input_field, up)
    source = next((by_field[f] for f in UPSTREAM_FIELDS if f in by_field), None)
    if source is None:
        return None
    query = select(jobs_t.c.trigger, jobs_t.c.target).where(jobs_t.c.id == source)
    row = conn.execute(query).first()
    return (row.trigger, row.target) if row is not None else None


def _insert_job(
    conn: Connection,
    item: NewJob,
    upstream: list[tuple[int, str | None]],
    ids: list[int],
    now: datetime,
) -> int:
    """A queued job and its dependencies; cancelled at once when an upstream job already failed."""
    spec = {k: _number_reference(v, ids) if isinstance(v, str) else v for k, v in item.spec.items()}
    trigger, target = backdoor_of(spec, _upstream_backdoor(conn, upstream), item.trigger)
    job_id = conn.execute(
        insert(jobs_t)
        .values(
            kind=item.kind,
            label=item.label,
            spec=spec,
            trigger=trigger,
            target=target,
            spec_hash=item.spec_hash,
            status="queued",
            priority=item.priority,
            max_attempts=item.max_attempts,
            attempts=0,
            executor="engine",
            created_at=now,
            updated_at=now,
        )
        .returning(jobs_t.c.id)
    ).scalar_one()
    for up, input_field in dict.fromkeys(upstream):
        conn.execute(
            insert(deps_t).values(job_id=job_id, depends_on_id=up, input_field=input_field)
        )
    broken = conn.execute(
        select(jobs_t.c.id, jobs_t.c.status).where(
            jobs_t.c.id.in_([u for u, _ in upstream]),
            jobs_t.c.status.in_(RETRYABLE),
        )
    ).first()
    if broken is not None:
        reason = f"upstream job {broken.id} {broken.status}"
        conn.execute(
            update(jobs_t)
            .where(jobs_t.c.id == job_id)
            .values(status="cancelled", error=reason, ended_at=now)
        )
    return job_id


def _join_study(conn: Connection, study_id: int, job_id: int, item: NewJob) -> None:
    """Make the job a member of the study (once), in the role the submission gives it."""
    already = conn.execute(
        select(study_jobs_t.c.job_id).where(
            study_jobs_t.c.study_id == study_id, study_jobs_t.c.job_id == job_id
        )
    ).first()
    if already is None:
        conn.execute(
            insert(study_jobs_t).values(
                study_id=study_id,
                job_id=job_id,
                role=item.role or item.kind,
                trigger=item.trigger,
                method=item.method,
                seed=item.seed,
            )
        )


# ------------------------------------------------------------------------------------------------
# Metric columns: attempts joined at resume, long series cut to per-bucket extremes in SQL

Segment = tuple[int, int, int]  # run id, first step, last step


def _in_segment(key: str, run_id: int, lo: int, hi: int) -> ColumnElement[bool]:
    m = metrics_t.c
    return and_(m.run_id == run_id, m.key == key, m.step >= lo, m.step <= hi)


def _segments(conn: Connection, runs: list[int], key: str) -> list[Segment]:
    """Each run's part of the series: from its first step to before where a later run's begin.
    Steps ascend from segment to segment."""
    m = metrics_t.c
    first = {
        r: conn.execute(select(func.min(m.step)).where(m.run_id == r, m.key == key)).scalar()
        for r in runs
    }
    segments: list[Segment] = []
    for i, r in enumerate(runs):
        later = [step for x in runs[i + 1 :] if (step := first[x]) is not None]
        query = select(func.max(m.step)).where(m.run_id == r, m.key == key)
        if later:
            query = query.where(m.step < min(later))
        last = conn.execute(query).scalar()
        if (start := first[r]) is not None and last is not None:
            segments.append((r, start, last))
    return segments


def _bucket_extremes(key: str, seg: Segment, lo: int, hi: int, buckets: int) -> Select[Any]:
    """The earliest minimum and maximum of each step bucket of a segment: two aggregate passes
    over the (run_id, key, step) index range, a few rows per bucket back."""
    m = metrics_t.c
    bucket = ((cast(m.step, BigInteger) - lo) * buckets // (hi - lo + 1)).label("b")
    pts = select(m.step, m.value, bucket).where(_in_segment(key, *seg)).subquery("pts")
    agg = (
        select(pts.c.b, func.min(pts.c.value).label("lo"), func.max(pts.c.value).label("hi"))
        .group_by(pts.c.b)
        .subquery("agg")
    )
    again = select(m.step, m.value, bucket).where(_in_segment(key, *seg)).subquery("again")
    return (
        select(func.min(again.c.step).label("step"), again.c.value)
        .join_from(
            again,
            agg,
            and_(
                again.c.b == agg.c.b,
                or_(again.c.value == agg.c.lo, again.c.value == agg.c.hi),
            ),
        )
        .group_by(again.c.b, again.c.value)
        .order_by("step")
    )


def _add_ends(
    conn: Connection, key: str, segments: list[Segment], steps: list[int], values: list[float]
) -> None:
    """Make the series start at the first step and end at the last (in place)."""
    m = metrics_t.c
    lo, hi = segments[0][1], segments[-1][2]
    first_end, last_end = (
        conn.execute(
            select(m.step, m.value).where(m.run_id == run, m.key == key, m.step == step)
        ).first()
        for run, step in ((segments[0][0], lo), (segments[-1][0], hi))
    )
    assert first_end is not None and last_end is not None  # lo and hi were read from them
    if not steps or steps[0] != lo:
        steps.insert(0, lo)
        values.insert(0, _stored_float(first_end.value))
    if steps[-1] != hi:
        steps.append(hi)
        values.append(_stored_float(last_end.value))


# ------------------------------------------------------------------------------------------------
# Claims: which jobs, marking them running, one new attempt each


@dataclass(frozen=True)
class _Claimant:
    """The engine that claims, and when: what every attempt it opens records."""

    engine_id: int
    host: str
    executor: str
    code_version: str
    now: datetime
    expect_next_by: datetime


def _claimable(limit: int, kinds: Sequence[str] | None) -> Select[Any]:
    """Queued engine jobs, not asked to cancel, whose upstream jobs all succeeded; by priority."""
    up = jobs_t.alias("upstream")
    unmet = exists().where(
        deps_t.c.job_id == jobs_t.c.id,
        deps_t.c.depends_on_id == up.c.id,
        up.c.status != "succeeded",
    )
    candidates = (
        select(jobs_t.c.id)
        .where(
            jobs_t.c.status == "queued",
            jobs_t.c.executor == "engine",
            jobs_t.c.cancel_requested_at.is_(None),
            ~unmet,
        )
        .order_by(jobs_t.c.priority.desc(), jobs_t.c.id)
        .limit(limit)
    )
    if kinds:
        candidates = candidates.where(jobs_t.c.kind.in_(list(kinds)))
    return candidates


def _mark_claimed(
    conn: Connection, ids: list[int], engine_id: int, code_version: str, now: datetime
) -> Sequence[Any]:
    """The jobs of ``ids`` still queued become running on the engine, one attempt more."""
    return conn.execute(
        update(jobs_t)
        .where(jobs_t.c.id.in_(ids), jobs_t.c.status == "queued")
        .values(
            status="running",
            engine_id=engine_id,
            attempts=jobs_t.c.attempts + 1,
            started_at=func.coalesce(jobs_t.c.started_at, now),
            code_version=code_version,
            updated_at=now,
        )
        .returning(
            jobs_t.c.id,
            jobs_t.c.kind,
            jobs_t.c.spec,
            jobs_t.c.spec_hash,
            jobs_t.c.attempts,
            jobs_t.c.workdir,
        )
    ).all()


def _open_attempt(conn: Connection, job: Any, claimant: _Claimant, workdir_for: Any) -> ClaimedJob:
    """A claimed job's work directory (named once), its run row and its inputs."""
    workdir = job.workdir
    if workdir is None:
        workdir = str(workdir_for(job.kind, job.id))
        conn.execute(update(jobs_t).where(jobs_t.c.id == job.id).values(workdir=workdir))
    previous = conn.execute(
        select(func.count()).select_from(runs_t).where(runs_t.c.job_id == job.id)
    ).scalar_one()
    spec = dict(job.spec or {})
    run_id = _insert_run(
        conn,
        job.id,
        spec,
        claimant.now,
        attempt=job.attempts,
        executor=claimant.executor,
        host=claimant.host,
        code_version=claimant.code_version,
        spec_hash=job.spec_hash,
        engine_id=claimant.engine_id,
        resumed=previous > 0,
        expect_next_by=claimant.expect_next_by,
    )
    return ClaimedJob(
        job_id=job.id,
        run_id=run_id,
        attempt=job.attempts,
        kind=job.kind,
        spec=spec,
        spec_hash=job.spec_hash,
        workdir=workdir,
        resume=previous > 0,
        inputs=_inputs(conn, job.id),
    )


def _inputs(conn: Connection, job_id: int) -> dict[str, int]:
    """Input field -> the upstream job that feeds it."""
    return {
        r.input_field: r.depends_on_id
        for r in conn.execute(
            select(deps_t.c.depends_on_id, deps_t.c.input_field).where(
                deps_t.c.job_id == job_id, deps_t.c.input_field.is_not(None)
            )
        )
    }


# ------------------------------------------------------------------------------------------------
# Recording what runs reported

MetricRow = tuple[int, str, int, float, float]  # run id, key, step, value, wall time


def _metric_rows(batches: Sequence[RunEvents]) -> tuple[list[MetricRow], list[dict[str, Any]]]:
    """The points to store (replayed first) and a warning line per run and key that was NaN.

    SQLite stores NaN as NULL (the column is NOT NULL): a diverged loss must not cost the whole
    batch, so the point is dropped and said in the log. Infinities are stored as they are."""
    rows: list[MetricRow] = []
    warnings: list[dict[str, Any]] = []
    for b in batches:
        warned: set[str] = set()
        for k, s, v, t in itertools.chain(b.replayed, b.metrics):
            if not math.isnan(v):
                rows.append((b.run_id, k, s, v, t))
            elif k not in warned:
                warned.add(k)
                warnings.append(
                    {
                        "run_id": b.run_id,
                        "level": "warning",
                        "message": f"metric {k} was NaN at step {s}; NaN points are not stored",
                        "wall_time": t,
                    }
                )
    return rows, warnings


def _upsert_latest(conn: Connection, metric_rows: list[MetricRow]) -> None:
    """Each run's newest point of each key (by step; the later write of a step wins)."""
    newest: dict[tuple[int, str], dict[str, Any]] = {}
    for run_id, key, step, value, wall in metric_rows:
        seen = newest.get((run_id, key))
        if seen is None or step >= seen["step"]:
            newest[(run_id, key)] = {
                "run_id": run_id,
                "key": key,
                "step": step,
                "value": value,
                "wall_time": wall,
            }
    stmt = dbmod.upsert(latest_t, conn, ["run_id", "key"], ["step", "value", "wall_time"], "step")
    conn.execute(stmt, list(newest.values()))


def _record_run(conn: Connection, b: RunEvents, now: datetime) -> bool:
    """One run's heartbeat, deadline, progress, environment and artifacts; True when its job's
    view changed (progress, points or artifacts), so the job's ``updated_at`` moves."""
    values: dict[str, Any] = {"heartbeat_at": now}
    if b.expect_next_by is not None:
        values["expect_next_by"] = b.expect_next_by
    if b.progress is not None:
        values["progress"] = b.progress
    if b.env:
        values["env"] = b.env
        for field in ("seed", "code_version", "dataset_hash"):
            if b.env.get(field) is not None:
                values[field] = b.env[field]
    if b.metrics:
        first = min(s for _, s, _, _ in b.metrics)
        values["start_step"] = func.coalesce(runs_t.c.start_step, first)
    conn.execute(update(runs_t).where(runs_t.c.id == b.run_id).values(**values))
    if b.env.get("dataset_hash"):
        conn.execute(
            update(jobs_t).where(jobs_t.c.id == b.job_id).values(dataset_hash=b.env["dataset_hash"])
        )
    for path, kind, sha, size in b.artifacts:
        conn.execute(
            insert(artifacts_t).values(
                run_id=b.run_id,
                job_id=b.job_id,
                kind=kind,
                path=path,
                sha256=sha,
                bytes=size,
                created_at=now,
            )
        )
    return bool(b.progress is not None or b.metrics or b.replayed or b.artifacts)


def _statuses(status: str | Iterable[str] | None) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    for s in values:
        if s not in STATUSES:
            raise UserError(f"status '{s}' is unknown; use one of {', '.join(STATUSES)}")
    return values


# ------------------------------------------------------------------------------------------------


# Statements of the hot reads (the TUI polls twice a second), built once: constructing a
# SQLAlchemy statement costs more than SQLite takes to answer it.
_JOBS_BY_IDS = select(jobs_t).where(jobs_t.c.id.in_(bindparam("ids", expanding=True)))
_CURRENT_RUNS = select(runs_t.c.job_id, runs_t.c.id, runs_t.c.progress).where(
    runs_t.c.id.in_(
        select(func.max(runs_t.c.id))
        .where(runs_t.c.job_id.in_(bindparam("ids", expanding=True)))
        .group_by(runs_t.c.job_id)
        .scalar_subquery()
    )
)
_LATEST_OF_RUNS = select(latest_t.c.run_id, latest_t.c.key, latest_t.c.value).where(
    latest_t.c.run_id.in_(bindparam("ids", expanding=True))
)
_STUDY_NAMES = (
    select(study_jobs_t.c.job_id, studies_t.c.name)
    .join(studies_t, studies_t.c.id == study_jobs_t.c.study_id)
    .where(study_jobs_t.c.job_id.in_(bindparam("ids", expanding=True)))
    .order_by(studies_t.c.id)
)
_TAGS_OF = (
    select(tags_t.c.job_id, tags_t.c.tag)
    .where(tags_t.c.job_id.in_(bindparam("ids", expanding=True)))
    .order_by(tags_t.c.tag)
)
_CHANGED_JOB_IDS = (
    select(jobs_t.c.id).where(jobs_t.c.updated_at > bindparam("since")).order_by(jobs_t.c.id)
)
_METRICS_AFTER = (
    select(
        metrics_t.c.id,
        metrics_t.c.run_id,
        metrics_t.c.key,
        metrics_t.c.step,
        metrics_t.c.value,
        metrics_t.c.wall_time,
    )
    .where(
        metrics_t.c.run_id.in_(bindparam("runs", expanding=True)),
        metrics_t.c.id > bindparam("after"),
    )
    .order_by(metrics_t.c.id)
    .limit(bindparam("limit"))
)


def _text_matches(text: str) -> Any:
    """Jobs whose label, note or one of whose tags contains ``text``, in any case (ILIKE on
    PostgreSQL, lower() LIKE on SQLite); % and _ in the text are literal."""
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(
        jobs_t.c.label.ilike(pattern, escape="\\"),
        jobs_t.c.note.ilike(pattern, escape="\\"),
        exists().where(tags_t.c.job_id == jobs_t.c.id, tags_t.c.tag.ilike(pattern, escape="\\")),
    )


def check_tags(tags: Iterable[str]) -> list[str]:
    """Tags as stored (stripped); a tag that is not one word is a UserError."""
    tags = list(tags)
    for tag in tags:
        problem = tag_problem(tag)
        if problem:
            raise UserError(problem)
    return [t.strip() for t in tags]


class Store:
    """The store behind one URL. Cheap to create; safe to share between threads."""

    def __init__(self, url: str | None = None, *, check_schema: bool = True):
        self.url = dbmod.check_url(url or default_db_url())
        # The cheap checks (store.health) first: a damaged or unusable store is one line.
        with health.translated(self.url, opening=True):
            health.check_file(self.url)
            self.engine = dbmod.make_engine(self.url)
            try:
                if check_schema:
                    dbmod.retrying(ensure_schema, self.engine, self.url)
            except BaseException:
                self.engine.dispose()  # a refused store keeps no connection (nor -wal, -shm)
                raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self):
        return dbmod.write_transaction(self.engine)

    def _read(self):
        return dbmod.read_transaction(self.engine)

    # -------------------------------------------------------------------------------- requests

    def submit(self, jobs: Sequence[NewJob], study_id: int | None = None) -> list[int]:
        """Insert jobs (with their dependencies and study membership) in one transaction.

        A ``NewJob`` with ``reuse_of`` creates no row: the existing finished job stands in for it
        (and joins the study). Returns the job id of every item, in order.
        """
        with self._write() as conn:
            return self._submit(conn, jobs, study_id)

    def _submit(self, conn: Connection, jobs: Sequence[NewJob], study_id: int | None) -> list[int]:
        now = utcnow()
        ids: list[int] = []
        for item in jobs:
            upstream = _upstream(item, ids)
            if item.reuse_of is not None:
                job_id = item.reuse_of
            else:
                for up, _ in upstream:
                    self._require_job(conn, up)
                job_id = _insert_job(conn, item, upstream, ids, now)
            if study_id is not None:
                _join_study(conn, study_id, job_id, item)
            ids.append(job_id)
        return ids

    def create_study(
        self, name: str, template: str, params: dict[str, Any], jobs: Sequence[NewJob]
    ) -> tuple[int, list[int]]:
        """A named study and its jobs, in one transaction; the name must be new."""
        check_study_name(name)
        with self._write() as conn:
            if conn.execute(select(studies_t.c.id).where(studies_t.c.name == name)).first():
                raise UserError(
                    f"study '{name}' already exists; pick another name or see `mesa-tui study show {name}`"
                )
            study_id = conn.execute(
                insert(studies_t)
                .values(name=name, template=template, params=params, created_at=utcnow())
                .returning(studies_t.c.id)
            ).scalar_one()
            return study_id, self._submit(conn, jobs, study_id)

    def find_reusable(
        self,
        kind: str,
        spec_hash: str,
        code_version: str,
        dataset_hash: str | None,
        upstream: dict[str, str] | None = None,
    ) -> JobSummary | None:
        """A succeeded job that may stand in for a new one: same kind, spec hash, code version
        and dataset hash, artifacts recorded, and upstream artifacts with the same hashes
        (``upstream``: input field -> sha256 of the artifact the new job would receive).
        ``dataset_hash=None`` skips that comparison: jobs that read their data through an
        upstream model are pinned by the upstream hashes."""
        upstream = upstream or {}
        with self._read() as conn:
            candidates = conn.execute(
                select(jobs_t.c.id)
                .where(
                    jobs_t.c.kind == kind,
                    jobs_t.c.spec_hash == spec_hash,
                    jobs_t.c.status == "succeeded",
                    jobs_t.c.code_version == code_version,
                    (jobs_t.c.dataset_hash == dataset_hash) if dataset_hash is not None else true(),
                    exists().where(artifacts_t.c.job_id == jobs_t.c.id),
                )
                .order_by(jobs_t.c.id.desc())
            ).all()
            for candidate in candidates:
                deps = conn.execute(
                    select(deps_t.c.depends_on_id, deps_t.c.input_field).where(
                        deps_t.c.job_id == candidate.id
                    )
                ).all()
                if {d.input_field for d in deps} != set(upstream):
                    continue
                if all(
                    self._artifact_sha(conn, d.depends_on_id) == upstream[d.input_field]
                    for d in deps
                ):
                    return self._summaries(conn, [candidate.id])[0]
        return None

    def _artifact_sha(self, conn: Connection, job_id: int) -> str | None:
        row = conn.execute(
            select(artifacts_t.c.sha256)
            .where(artifacts_t.c.job_id == job_id)
            .order_by(artifacts_t.c.id.desc())
        ).first()
        return row.sha256 if row else None

    def job_counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._read() as conn:
            return dict(
                conn.execute(select(jobs_t.c.status, func.count()).group_by(jobs_t.c.status)).all()
            )

    def request_cancel(self, job_id: int, reason: str = "cancelled by request") -> JobSummary:
        """Queued jobs are cancelled at once (with their dependents); running ones are flagged and
        the engine that runs them stops them (cooperatively, then by signal)."""
        with self._write() as conn:
            row = self._require_job(conn, job_id)
            now = utcnow()
            if row.status == "queued":
                conn.execute(
                    update(jobs_t)
                    .where(jobs_t.c.id == job_id)
                    .values(
                        status="cancelled",
                        error=reason,
                        cancel_requested_at=now,
                        updated_at=now,
                        ended_at=now,
                    )
                )
                self._cancel_dependents(conn, job_id, f"upstream job {job_id} cancelled", now)
            elif row.status == "running":
                conn.execute(
                    update(jobs_t)
                    .where(jobs_t.c.id == job_id)
                    .values(cancel_requested_at=now, updated_at=now)
                )
            return self._summaries(conn, [job_id])[0]

    def retry(self, job_id: int) -> JobSummary:
        """Queue a failed, cancelled or lost job again (with a fresh budget of attempts), and its
        dependents that were cancelled because of it."""
        with self._write() as conn:
            row = self._require_job(conn, job_id)
            if row.status not in RETRYABLE:
                raise UserError(
                    f"job {job_id} is {row.status}; only failed, cancelled or lost jobs can be retried"
                )
            blocked = conn.execute(
                select(jobs_t.c.id, jobs_t.c.status)
                .join(deps_t, deps_t.c.depends_on_id == jobs_t.c.id)
                .where(
                    deps_t.c.job_id == job_id,
                    jobs_t.c.status.in_(RETRYABLE),
                )
            ).first()
            if blocked is not None:
                raise UserError(
                    f"job {job_id} needs job {blocked.id}, which {blocked.status}; retry job "
                    f"{blocked.id} instead (its dependents are queued with it)"
                )
            now = utcnow()
            todo = [job_id]
            while todo:
                current = todo.pop()
                conn.execute(
                    update(jobs_t)
                    .where(jobs_t.c.id == current)
                    .values(
                        status="queued",
                        error=None,
                        cancel_requested_at=None,
                        engine_id=None,
                        ended_at=None,
                        max_attempts=jobs_t.c.attempts + DEFAULT_MAX_ATTEMPTS,
                        updated_at=now,
                    )
                )
                dependents = conn.execute(
                    select(jobs_t.c.id)
                    .join(deps_t, deps_t.c.job_id == jobs_t.c.id)
                    .where(
                        deps_t.c.depends_on_id == current,
                        jobs_t.c.status == "cancelled",
                        jobs_t.c.error.like("upstream job %"),
                    )
                ).all()
                todo.extend(r.id for r in dependents)
            return self._summaries(conn, [job_id])[0]

    def set_note(self, job_id: int, note: str | None) -> JobSummary:
        """Replace a job's note (None or blank clears it). A face's request like a cancel: the
        job's ``updated_at`` moves, so the app's poll shows the note at once."""
        with self._write() as conn:
            self._require_job(conn, job_id)
            text = (note or "").strip() or None
            conn.execute(
                update(jobs_t).where(jobs_t.c.id == job_id).values(note=text, updated_at=utcnow())
            )
            return self._summaries(conn, [job_id])[0]

    def tag(self, job_id: int, add: Iterable[str] = (), remove: Iterable[str] = ()) -> JobSummary:
        """Add and remove tags of a job (adding one it has, or removing one it lacks, is no
        error); moves ``updated_at`` like ``set_note``."""
        add, remove = check_tags(add), check_tags(remove)
        with self._write() as conn:
            self._require_job(conn, job_id)
            have = {r.tag for r in conn.execute(_TAGS_OF, {"ids": [job_id]})}
            new = [t for t in dict.fromkeys(add) if t not in have and t not in remove]
            if new:
                conn.execute(insert(tags_t), [{"job_id": job_id, "tag": t} for t in new])
            if remove:
                conn.execute(
                    delete(tags_t).where(tags_t.c.job_id == job_id, tags_t.c.tag.in_(remove))
                )
            conn.execute(update(jobs_t).where(jobs_t.c.id == job_id).values(updated_at=utcnow()))
            return self._summaries(conn, [job_id])[0]

    def delete_job(self, job_id: int) -> list[str]:
        """Delete a finished job with its runs, metrics and links; returns the artifact paths and
        work directory for the caller to remove from disk."""
        with self._write() as conn:
            row = self._require_job(conn, job_id)
            if row.status in ACTIVE:
                raise UserError(
                    f"job {job_id} is {row.status}; cancel it first (`mesa-tui cancel {job_id}`)"
                )
            waiting = conn.execute(
                select(jobs_t.c.id)
                .join(deps_t, deps_t.c.job_id == jobs_t.c.id)
                .where(deps_t.c.depends_on_id == job_id, jobs_t.c.status.in_(ACTIVE))
            ).first()
            if waiting is not None:
                raise UserError(
                    f"job {waiting.id} still needs job {job_id}; cancel or delete job {waiting.id} first"
                )
            paths = [
                r.path
                for r in conn.execute(
                    select(artifacts_t.c.path).where(artifacts_t.c.job_id == job_id)
                )
            ]
            if row.workdir:
                paths.append(row.workdir)
            run_ids = select(runs_t.c.id).where(runs_t.c.job_id == job_id)
            for table in (metrics_t, latest_t, logs_t, params_t, artifacts_t):
                conn.execute(delete(table).where(table.c.run_id.in_(run_ids)))
            conn.execute(delete(runs_t).where(runs_t.c.job_id == job_id))
            conn.execute(
                delete(deps_t).where(
                    or_(deps_t.c.job_id == job_id, deps_t.c.depends_on_id == job_id)
                )
            )
            conn.execute(delete(study_jobs_t).where(study_jobs_t.c.job_id == job_id))
            conn.execute(delete(tags_t).where(tags_t.c.job_id == job_id))
            conn.execute(delete(jobs_t).where(jobs_t.c.id == job_id))
            return list(dict.fromkeys(paths))

    def request_engine_stop(self, engine_id: int | None = None) -> list[EngineInfo]:
        """Ask one engine (or every live one) to stop; returns the engines asked."""
        with self._write() as conn:
            now = utcnow()
            cond: ColumnElement[bool] = engines_t.c.stopped_at.is_(None)
            if engine_id is not None:
                cond = and_(cond, engines_t.c.id == engine_id)
            conn.execute(update(engines_t).where(cond).values(stop_requested_at=now))
            rows = conn.execute(select(engines_t).where(cond)).all()
            return [e for e in (_engine_info(r, now) for r in rows) if e.alive]

    # -------------------------------------------------------------------------------- reads

    def _require_job(self, conn: Connection, job_id: int) -> Any:
        row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).first()
        if row is None:
            raise UnknownJob(f"job {job_id} does not exist; see `mesa-tui ls` for job ids")
        return row

    def _summaries(self, conn: Connection, job_ids: Sequence[int]) -> list[JobSummary]:
        if not job_ids:
            return []
        ids = {"ids": list(job_ids)}
        by_id = {r.id: r for r in conn.execute(_JOBS_BY_IDS, ids)}
        current: dict[int, int] = {}
        run_rows: dict[int, Any] = {}
        for run in conn.execute(_CURRENT_RUNS, ids):
            current[run.job_id] = run.id
            run_rows[run.id] = run
        latest: dict[int, dict[str, float]] = defaultdict(dict)
        if current:
            for point in conn.execute(_LATEST_OF_RUNS, {"ids": list(current.values())}):
                latest[point.run_id][point.key] = point.value
        studies: dict[int, list[str]] = defaultdict(list)
        for link in conn.execute(_STUDY_NAMES, ids):
            studies[link.job_id].append(link.name)
        tags: dict[int, list[str]] = defaultdict(list)
        for link in conn.execute(_TAGS_OF, ids):
            tags[link.job_id].append(link.tag)
        out = []
        for job_id in job_ids:
            r = by_id.get(job_id)
            if r is None:
                continue
            run_id = current.get(job_id)
            out.append(
                JobSummary(
                    id=r.id,
                    kind=r.kind,
                    label=r.label,
                    status=r.status,
                    priority=r.priority,
                    attempts=r.attempts,
                    max_attempts=r.max_attempts,
                    executor=r.executor,
                    spec=dict(r.spec or {}),
                    spec_hash=r.spec_hash,
                    error=r.error,
                    created_at=r.created_at,
                    updated_at=r.updated_at,
                    started_at=r.started_at,
                    ended_at=r.ended_at,
                    reused_from=r.reused_from,
                    studies=tuple(studies.get(job_id, ())),
                    current_run_id=run_id,
                    progress=_progress(run_rows[run_id].progress) if run_id in run_rows else None,
                    latest=dict(latest.get(run_id, {})) if run_id else {},
                    cancel_requested=r.cancel_requested_at is not None,
                    note=r.note,
                    tags=tuple(tags.get(job_id, ())),
                    trigger=r.trigger,
                    target=r.target,
                )
            )
        return out

    def list_jobs(
        self,
        status: str | Iterable[str] | None = None,
        kind: str | None = None,
        study: str | None = None,
        changed_since: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        text: str | None = None,
    ) -> list[JobSummary]:
        """Jobs matching the filters, oldest first. ``changed_since`` returns only jobs whose
        ``updated_at`` is later (the TUI's poll cursor: keep the largest ``updated_at`` seen);
        ``text`` keeps jobs whose label, note or a tag contains it (any case)."""
        statuses = _statuses(status)
        with self._read() as conn:
            ids = self._job_ids(
                conn, statuses, kind, study, changed_since, limit, newest_first, text
            )
            return self._summaries(conn, ids)

    def job_ids(
        self,
        status: str | Iterable[str] | None = None,
        kind: str | None = None,
        study: str | None = None,
        changed_since: datetime | None = None,
        text: str | None = None,
    ) -> list[int]:
        """The ids ``list_jobs`` would return, oldest first, without building summaries: an
        index read that stays cheap at any number of jobs (the TUI checks with it which jobs are
        gone, and reads summaries only of the jobs changed since its cursor)."""
        statuses = _statuses(status)
        with self._read() as conn:
            return self._job_ids(conn, statuses, kind, study, changed_since, text=text)

    def _job_ids(
        self,
        conn: Connection,
        statuses: list[str] | None,
        kind: str | None,
        study: str | None,
        changed_since: datetime | None,
        limit: int | None = None,
        newest_first: bool = False,
        text: str | None = None,
    ) -> list[int]:
        query = select(jobs_t.c.id)
        if text:
            query = query.where(_text_matches(text))
        if statuses:
            query = query.where(jobs_t.c.status.in_(statuses))
        if kind:
            query = query.where(jobs_t.c.kind == kind)
        if changed_since is not None:
            query = query.where(jobs_t.c.updated_at > changed_since)
        if study:
            study_id = self._require_study(conn, study).id
            query = query.where(
                exists().where(
                    study_jobs_t.c.job_id == jobs_t.c.id, study_jobs_t.c.study_id == study_id
                )
            )
        query = query.order_by(jobs_t.c.id.desc() if newest_first else jobs_t.c.id)
        if limit:
            query = query.limit(limit)
        return [r.id for r in conn.execute(query)]

    def job(self, job_id: int) -> JobSummary:
        """One job's summary (``UnknownJob``, a UserError, when the id is not in the store)."""
        with self._read() as conn:
            self._require_job(conn, job_id)
            return self._summaries(conn, [job_id])[0]

    def job_detail(self, job_id: int) -> JobDetail:
        """A job with every attempt, its dependencies, dependents, artifacts and parameters."""
        with self._read() as conn:
            row = self._require_job(conn, job_id)
            summary = self._summaries(conn, [job_id])[0]
            runs = tuple(
                _run_info(r)
                for r in conn.execute(
                    select(runs_t).where(runs_t.c.job_id == job_id).order_by(runs_t.c.attempt)
                )
            )
            depends_on = tuple(
                Dependency(job_id=r.id, kind=r.kind, status=r.status, input_field=r.input_field)
                for r in conn.execute(
                    select(jobs_t.c.id, jobs_t.c.kind, jobs_t.c.status, deps_t.c.input_field)
                    .join(deps_t, deps_t.c.depends_on_id == jobs_t.c.id)
                    .where(deps_t.c.job_id == job_id)
                    .order_by(jobs_t.c.id)
                )
            )
            dependents = tuple(
                r.job_id
                for r in conn.execute(
                    select(deps_t.c.job_id)
                    .where(deps_t.c.depends_on_id == job_id)
                    .order_by(deps_t.c.job_id)
                )
            )
            artifacts = tuple(
                _artifact_info(a)
                for a in conn.execute(
                    select(artifacts_t)
                    .where(artifacts_t.c.job_id == job_id)
                    .order_by(artifacts_t.c.id)
                )
            )
            params: dict[str, str] = {}
            if runs:
                params = {
                    r.key: r.value
                    for r in conn.execute(select(params_t).where(params_t.c.run_id == runs[-1].id))
                }
            return JobDetail(
                job=summary,
                workdir=row.workdir,
                code_version=row.code_version,
                dataset_hash=row.dataset_hash,
                result=row.result,
                runs=runs,
                depends_on=depends_on,
                dependents=dependents,
                artifacts=artifacts,
                params=params,
            )

    def runs(self, job_id: int) -> list[RunInfo]:
        """Every attempt of a job, first attempt first."""
        with self._read() as conn:
            return [
                _run_info(r)
                for r in conn.execute(
                    select(runs_t).where(runs_t.c.job_id == job_id).order_by(runs_t.c.attempt)
                )
            ]

    def metrics_since(
        self,
        run_ids: Sequence[int],
        after_id: int = 0,
        limit: int = 100_000,
        keys: Sequence[str] | None = None,
    ) -> list[MetricPoint]:
        """New metric points of some runs in id order (cursor: the last ``id`` you got)."""
        if not run_ids:
            return []
        if not keys:
            with self._read() as conn:
                return [
                    MetricPoint(*r)
                    for r in conn.execute(
                        _METRICS_AFTER, {"runs": list(run_ids), "after": after_id, "limit": limit}
                    )
                ]
        query = select(
            metrics_t.c.id,
            metrics_t.c.run_id,
            metrics_t.c.key,
            metrics_t.c.step,
            metrics_t.c.value,
            metrics_t.c.wall_time,
        ).where(metrics_t.c.run_id.in_(list(run_ids)), metrics_t.c.id > after_id)
        if keys:
            query = query.where(metrics_t.c.key.in_(list(keys)))
        query = query.order_by(metrics_t.c.id).limit(limit)
        with self._read() as conn:
            return [MetricPoint(*r) for r in conn.execute(query)]

    def poll(
        self,
        changed_since: datetime | None,
        run_ids: Sequence[int],
        after_id: int,
        limit: int = 100_000,
    ) -> tuple[list[JobSummary], list[MetricPoint]]:
        """The TUI's poll in one read: jobs changed since ``changed_since`` (all jobs when None)
        and the metric points of ``run_ids`` with id above ``after_id``. Keep as cursors the
        largest ``updated_at`` and the last point ``id`` you got."""
        with self._read() as conn:
            if changed_since is None:
                ids = [r.id for r in conn.execute(select(jobs_t.c.id).order_by(jobs_t.c.id))]
            else:
                ids = [r.id for r in conn.execute(_CHANGED_JOB_IDS, {"since": changed_since})]
            jobs = self._summaries(conn, ids)
            points: list[MetricPoint] = []
            if run_ids:
                points = [
                    MetricPoint(*r)
                    for r in conn.execute(
                        _METRICS_AFTER, {"runs": list(run_ids), "after": after_id, "limit": limit}
                    )
                ]
            return jobs, points

    def metric_keys(self, job_id: int) -> list[str]:
        """Every metric key any attempt of the job has written, sorted."""
        with self._read() as conn:
            return sorted(
                r.key
                for r in conn.execute(
                    select(latest_t.c.key)
                    .distinct()
                    .join(runs_t, runs_t.c.id == latest_t.c.run_id)
                    .where(runs_t.c.job_id == job_id)
                )
            )

    def metric_series(self, job_id: int, key: str) -> list[SeriesPoint]:
        """One metric of a job across its attempts, joined at each resume: an attempt's points
        count up to the step where a later attempt's points of this metric begin, so every step
        appears once. An engine attempt that resumes replays the job's metric journal first, so
        it holds every step from the start and the job's series is that attempt's alone; a run
        without a journal (written before it existed) joins where it resumed."""
        with self._read() as conn:
            self._require_job(conn, job_id)
            runs = conn.execute(
                select(runs_t.c.id, runs_t.c.attempt)
                .where(runs_t.c.job_id == job_id)
                .order_by(runs_t.c.attempt)
            ).all()
            # Per metric, not per run: a resumed task may log a few set-up values at step 0.
            first_step = dict(
                conn.execute(
                    select(metrics_t.c.run_id, func.min(metrics_t.c.step))
                    .where(metrics_t.c.run_id.in_([r.id for r in runs]), metrics_t.c.key == key)
                    .group_by(metrics_t.c.run_id)
                ).all()
            )
            out: list[SeriesPoint] = []
            for i, run in enumerate(runs):
                if run.id not in first_step:
                    continue
                query = select(metrics_t.c.step, metrics_t.c.value, metrics_t.c.wall_time).where(
                    metrics_t.c.run_id == run.id, metrics_t.c.key == key
                )
                later = [first_step[r.id] for r in runs[i + 1 :] if r.id in first_step]
                if later:
                    query = query.where(metrics_t.c.step < min(later))
                for r in conn.execute(query.order_by(metrics_t.c.step)):
                    out.append(SeriesPoint(r.step, r.value, r.wall_time, run.id, run.attempt))
            out.sort(key=lambda p: p.step)
            return out

    def metric_series_columns(
        self, job_id: int, keys: Sequence[str] | None = None, max_points: int = 1000
    ) -> MetricHistory:
        """Every metric of a job (or ``keys``) as columns, attempts joined at resume as in
        ``metric_series``, each cut to at most ``2 * max_points`` points: the first, the last and
        per step bucket the minimum and the maximum (``store.downsample``). The buckets are reduced
        by aggregates in SQL, so a long series costs a few indexed scans, never a row per point in
        Python. ``cursor`` comes from the same snapshot: append ``metrics_since(run_ids, cursor)``.
        """
        with self._read() as conn:
            self._require_job(conn, job_id)
            runs = [
                r.id
                for r in conn.execute(
                    select(runs_t.c.id).where(runs_t.c.job_id == job_id).order_by(runs_t.c.attempt)
                )
            ]
            cursor = 0
            for run_id in runs:  # one index probe per run on (run_id, id)
                top = conn.execute(
                    select(func.max(metrics_t.c.id)).where(metrics_t.c.run_id == run_id)
                ).scalar()
                cursor = max(cursor, top or 0)
            with_key: dict[str, set[int]] = defaultdict(set)
            if runs:
                for r in conn.execute(
                    select(latest_t.c.run_id, latest_t.c.key).where(latest_t.c.run_id.in_(runs))
                ):
                    with_key[r.key].add(r.run_id)
            wanted = sorted(with_key) if keys is None else [k for k in keys if k in with_key]
            series = {
                key: self._series_columns(
                    conn, [r for r in runs if r in with_key[key]], key, max_points
                )
                for key in wanted
            }
            return MetricHistory(cursor=cursor, run_ids=tuple(runs), series=series)

    def _series_columns(
        self, conn: Connection, runs: list[int], key: str, max_points: int
    ) -> SeriesColumns:
        """``key`` over ``runs`` joined at resume: every point when there are few, else each
        bucket's extremes read in SQL and cut to ``max_points`` here."""
        segments = _segments(conn, runs, key)
        counts = [
            conn.execute(
                select(func.count()).select_from(metrics_t).where(_in_segment(key, *seg))
            ).scalar()
            or 0
            for seg in segments
        ]
        total = sum(counts)
        steps: list[int] = []
        values: list[float] = []
        if total <= 2 * max(1, max_points):
            m = metrics_t.c
            for seg in segments:
                query = select(m.step, m.value).where(_in_segment(key, *seg)).order_by(m.step)
                for point in conn.execute(query):
                    steps.append(point.step)
                    values.append(_stored_float(point.value))
            return SeriesColumns(steps, values, total)
        lo, hi = segments[0][1], segments[-1][2]
        buckets = downsample.buckets_for(max_points)
        for n, seg in zip(counts, segments, strict=True):
            if n == 0:
                continue
            for row in conn.execute(_bucket_extremes(key, seg, lo, hi, buckets)):
                steps.append(row.step)
                values.append(_stored_float(row.value))
        _add_ends(conn, key, segments, steps, values)
        steps, values = downsample.minmax(steps, values, max_points, lo, hi)
        return SeriesColumns(steps, values, total)

    def metric_tail(self, job_ids: Sequence[int], key: str, n: int = 24) -> dict[int, list[float]]:
        """The last ``n`` values of ``key`` (by step, oldest first) in each job's newest run, in
        one read: per run an index probe finds the ``n``-th last step, then a range of at most
        ``n`` index entries. Jobs whose newest run lacks the key are left out."""
        if not job_ids or n <= 0:
            return {}
        m2 = metrics_t.alias("m2")
        current = (
            select(runs_t.c.job_id, func.max(runs_t.c.id).label("run_id"))
            .where(runs_t.c.job_id.in_(list(job_ids)))
            .group_by(runs_t.c.job_id)
            .subquery("current")
        )
        nth_last = (
            select(m2.c.step)
            .where(m2.c.run_id == current.c.run_id, m2.c.key == key)
            .order_by(m2.c.step.desc())
            .limit(1)
            .offset(n - 1)
            .scalar_subquery()
        )
        query = (
            select(current.c.job_id, metrics_t.c.value)
            .join_from(
                current,
                metrics_t,
                and_(
                    metrics_t.c.run_id == current.c.run_id,
                    metrics_t.c.key == key,
                    metrics_t.c.step >= func.coalesce(nth_last, -(2**31)),
                ),
            )
            .order_by(current.c.job_id, metrics_t.c.step)
        )
        out: dict[int, list[float]] = defaultdict(list)
        with self._read() as conn:
            for r in conn.execute(query):
                out[r.job_id].append(_stored_float(r.value))
        return dict(out)

    def metric_range(self, job_ids: Sequence[int], key: str) -> dict[int, tuple[float, float]]:
        """The least and greatest value of ``key`` in each job's newest run (the app's best ASR),
        in one read over the (run_id, key, step) index. Jobs whose newest run lacks the key are
        left out (NaN points are never stored: ``record_events`` drops them)."""
        if not job_ids:
            return {}
        current = (
            select(runs_t.c.job_id, func.max(runs_t.c.id).label("run_id"))
            .where(runs_t.c.job_id.in_(list(job_ids)))
            .group_by(runs_t.c.job_id)
            .subquery("current")
        )
        query = (
            select(
                current.c.job_id,
                func.min(metrics_t.c.value).label("low"),
                func.max(metrics_t.c.value).label("high"),
            )
            .join_from(
                current,
                metrics_t,
                and_(metrics_t.c.run_id == current.c.run_id, metrics_t.c.key == key),
            )
            .group_by(current.c.job_id)
        )
        with self._read() as conn:
            return {
                r.job_id: (float(r.low), float(r.high))
                for r in conn.execute(query)
                if r.low is not None
            }

    def latest_metrics(self, run_ids: Sequence[int]) -> dict[int, dict[str, float]]:
        """The newest value of every key, per run."""
        out: dict[int, dict[str, float]] = {int(r): {} for r in run_ids}
        if not run_ids:
            return out
        with self._read() as conn:
            for r in conn.execute(
                select(latest_t.c.run_id, latest_t.c.key, latest_t.c.value).where(
                    latest_t.c.run_id.in_(list(run_ids))
                )
            ):
                out[r.run_id][r.key] = r.value
        return out

    def logs(
        self,
        job_id: int | None = None,
        run_ids: Sequence[int] | None = None,
        after_id: int = 0,
        limit: int = 10_000,
    ) -> list[LogEntry]:
        """Log lines of a job (every attempt) or of some runs, in order, after a cursor id."""
        query = select(logs_t).where(logs_t.c.id > after_id)
        if run_ids is not None:
            query = query.where(logs_t.c.run_id.in_(list(run_ids)))
        elif job_id is not None:
            query = query.where(
                logs_t.c.run_id.in_(select(runs_t.c.id).where(runs_t.c.job_id == job_id))
            )
        with self._read() as conn:
            if job_id is not None:
                self._require_job(conn, job_id)
            return [
                LogEntry(r.id, r.run_id, r.level, r.message, r.wall_time)
                for r in conn.execute(query.order_by(logs_t.c.id).limit(limit))
            ]

    def artifacts(self, job_id: int) -> list[ArtifactInfo]:
        """Artifacts announced by any attempt of the job, oldest first."""
        with self._read() as conn:
            return [
                _artifact_info(a)
                for a in conn.execute(
                    select(artifacts_t)
                    .where(artifacts_t.c.job_id == job_id)
                    .order_by(artifacts_t.c.id)
                )
            ]

    def engines(self, alive_only: bool = False) -> list[EngineInfo]:
        """Engines with their slots and GPU figures; ``alive`` says whose heartbeat is fresh."""
        now = utcnow()
        with self._read() as conn:
            rows = conn.execute(select(engines_t).order_by(engines_t.c.id)).all()
        infos = [_engine_info(r, now) for r in rows]
        return [e for e in infos if e.alive] if alive_only else infos

    # -------------------------------------------------------------------------------- studies

    def _require_study(self, conn: Connection, name: str) -> Any:
        row = conn.execute(select(studies_t).where(studies_t.c.name == name)).first()
        if row is None:
            raise UnknownStudy(f"study '{name}' does not exist; see `mesa-tui study list`")
        return row

    def _study_info(self, conn: Connection, row: Any) -> StudyInfo:
        counts: dict[str, int] = dict(
            conn.execute(
                select(jobs_t.c.status, func.count())
                .join(study_jobs_t, study_jobs_t.c.job_id == jobs_t.c.id)
                .where(study_jobs_t.c.study_id == row.id)
                .group_by(jobs_t.c.status)
            ).all()
        )
        return StudyInfo(
            id=row.id,
            name=row.name,
            template=row.template,
            params=dict(row.params or {}),
            created_at=row.created_at,
            job_count=sum(counts.values()),
            status_counts=counts,
        )

    def studies(self) -> list[StudyInfo]:
        """Every study with its job counts per status."""
        with self._read() as conn:
            rows = conn.execute(select(studies_t).order_by(studies_t.c.id)).all()
            return [self._study_info(conn, r) for r in rows]

    def study(self, name: str) -> StudyInfo:
        with self._read() as conn:
            return self._study_info(conn, self._require_study(conn, name))

    def study_members(self, name: str) -> list[StudyMember]:
        """The study's jobs with their role (train, detect, mesa, defend), trigger, method, seed."""
        with self._read() as conn:
            study = self._require_study(conn, name)
            return [
                StudyMember(
                    study_id=study.id,
                    job_id=r.job_id,
                    role=r.role,
                    trigger=r.trigger,
                    method=r.method,
                    seed=r.seed,
                    kind=r.kind,
                    status=r.status,
                )
                for r in conn.execute(
                    select(
                        study_jobs_t.c.job_id,
                        study_jobs_t.c.role,
                        study_jobs_t.c.trigger,
                        study_jobs_t.c.method,
                        study_jobs_t.c.seed,
                        jobs_t.c.kind,
                        jobs_t.c.status,
                    )
                    .join(jobs_t, jobs_t.c.id == study_jobs_t.c.job_id)
                    .where(study_jobs_t.c.study_id == study.id)
                    .order_by(study_jobs_t.c.job_id)
                )
            ]

    def study_repairs(self, name: str) -> list[StudyRepair]:
        """The study's succeeded defend jobs with spec and result, in job order (one read)."""
        with self._read() as conn:
            study = self._require_study(conn, name)
            return [
                StudyRepair(
                    job_id=r.job_id,
                    trigger=r.trigger,
                    method=r.method,
                    seed=r.seed,
                    spec=r.spec,
                    result=r.result,
                )
                for r in conn.execute(
                    select(
                        study_jobs_t.c.job_id,
                        study_jobs_t.c.trigger,
                        study_jobs_t.c.method,
                        study_jobs_t.c.seed,
                        jobs_t.c.spec,
                        jobs_t.c.result,
                    )
                    .join(jobs_t, jobs_t.c.id == study_jobs_t.c.job_id)
                    .where(
                        study_jobs_t.c.study_id == study.id,
                        jobs_t.c.kind == "defend",
                        jobs_t.c.status == "succeeded",
                    )
                    .order_by(study_jobs_t.c.job_id)
                )
            ]

    def study_summary(self, name: str) -> StudySummary:
        """The paper's table for a study: per method the mean and worst ASR after repair, the
        spread over seeds, clean and robust accuracy, with the paper's numbers (kept in the
        study's params by its template) beside ours. "before repair" rows come from the attacks."""
        with self._read() as conn:
            study = self._require_study(conn, name)
            info = self._study_info(conn, study)
            members = conn.execute(
                select(
                    study_jobs_t.c.job_id,
                    study_jobs_t.c.role,
                    study_jobs_t.c.trigger,
                    study_jobs_t.c.method,
                    study_jobs_t.c.seed,
                    jobs_t.c.status,
                    jobs_t.c.result,
                )
                .join(jobs_t, jobs_t.c.id == study_jobs_t.c.job_id)
                .where(
                    study_jobs_t.c.study_id == study.id,
                    study_jobs_t.c.role.in_(("train", "defend")),
                )
                .order_by(study_jobs_t.c.job_id)
            ).all()
        cells = []
        for m in members:
            metrics = (m.result or {}).get("metrics", {}) if m.status == "succeeded" else {}
            method = "before repair" if m.role == "train" else (m.method or "defend")
            cells.append(
                StudyCell(
                    trigger=m.trigger or "",
                    method=method,
                    seed=m.seed,
                    job_id=m.job_id,
                    status=m.status,
                    asr=metrics.get("eval/asr"),
                    acc_clean=metrics.get("eval/acc_clean"),
                    ra=metrics.get("eval/ra"),
                )
            )
        paper = info.params.get("paper", {}) or {}
        order = ["before repair", *info.params.get("methods", [])]
        for c in cells:
            if c.method not in order:
                order.append(c.method)
        rows = []
        for method in order:
            group = [c for c in cells if c.method == method]
            if not group:
                continue
            rows.append(_method_summary(method, group, paper.get(method, {})))
        return StudySummary(
            study=info,
            rows=tuple(rows),
            cells=tuple(cells),
            protocol_notes=tuple(info.params.get("protocol_notes", [])),
        )

    # -------------------------------------------------------------------------------- engine side

    def register_engine(
        self,
        host: str,
        pid: int,
        version: str,
        slots: int,
        gpus: list[dict[str, Any]] | None = None,
        executor: str = "local",
        log_path: str | None = None,
    ) -> EngineInfo:
        """A new engine row (engine only)."""
        with self._write() as conn:
            now = utcnow()
            row = conn.execute(
                insert(engines_t)
                .values(
                    host=host,
                    pid=pid,
                    version=version,
                    executor=executor,
                    slots=slots,
                    slots_used=0,
                    gpus=gpus or [],
                    log_path=log_path,
                    started_at=now,
                    heartbeat_at=now,
                )
                .returning(*engines_t.c)
            ).first()
            return _engine_info(row, now)

    def engine_heartbeat(
        self,
        engine_id: int,
        slots_used: int,
        gpus: list[dict[str, Any]] | None = None,
        system: dict[str, Any] | None = None,
    ) -> EngineInfo:
        """Record that the engine is alive (engine only); the answer carries stop requests.
        ``system``: the host's CPU and memory and each slot's child (engine.system.snapshot)."""
        with self._write() as conn:
            now = utcnow()
            values: dict[str, Any] = {"heartbeat_at": now, "slots_used": slots_used}
            if gpus is not None:
                values["gpus"] = gpus
            if system is not None:
                values["system"] = system
            row = conn.execute(
                update(engines_t)
                .where(engines_t.c.id == engine_id)
                .values(**values)
                .returning(*engines_t.c)
            ).first()
            return _engine_info(row, now)

    def engine_stopped(self, engine_id: int) -> None:
        with self._write() as conn:
            now = utcnow()
            conn.execute(
                update(engines_t)
                .where(engines_t.c.id == engine_id)
                .values(stopped_at=now, slots_used=0, heartbeat_at=now)
            )

    def claim_jobs(
        self,
        engine_id: int,
        limit: int,
        *,
        host: str,
        executor: str,
        code_version: str,
        workdir_for: Any,
        startup_grace_s: float,
        kinds: Sequence[str] | None = None,
    ) -> list[ClaimedJob]:
        """Claim up to ``limit`` queued jobs whose dependencies all succeeded and open a run row
        for each, in one short transaction (``UPDATE ... RETURNING``; ``FOR UPDATE SKIP LOCKED``
        on PostgreSQL). ``workdir_for(kind, job_id)`` names a new job's stable work directory."""
        if limit <= 0:
            return []
        with self._write() as conn:
            now = utcnow()
            ids = [
                r.id for r in conn.execute(dbmod.claim_lock_clause(_claimable(limit, kinds), conn))
            ]
            if not ids:
                return []
            claimed = _mark_claimed(conn, ids, engine_id, code_version, now)
            claimant = _Claimant(
                engine_id=engine_id,
                host=host,
                executor=executor,
                code_version=code_version,
                now=now,
                expect_next_by=now + timedelta(seconds=startup_grace_s),
            )
            return [
                _open_attempt(conn, job, claimant, workdir_for)
                for job in sorted(claimed, key=lambda r: ids.index(r.id))
            ]

    def upstream_artifact(self, job_id: int) -> ArtifactInfo | None:
        """The artifact a dependent job receives from ``job_id``: the newest one of its runs
        (the directory the task returned when several were announced)."""
        with self._read() as conn:
            result = conn.execute(select(jobs_t.c.result).where(jobs_t.c.id == job_id)).scalar()
            rows = conn.execute(
                select(artifacts_t).where(artifacts_t.c.job_id == job_id).order_by(artifacts_t.c.id)
            ).all()
        if not rows:
            return None
        chosen = (result or {}).get("artifact")
        for a in reversed(rows):
            if chosen and a.path == chosen:
                return _artifact_info(a)
        return _artifact_info(rows[-1])

    def set_run_process(self, run_id: int, external_id: str, gpu: str | None) -> None:
        """Record the child's process id (and GPU) once it is launched."""
        with self._write() as conn:
            conn.execute(
                update(runs_t).where(runs_t.c.id == run_id).values(external_id=external_id, gpu=gpu)
            )

    def record_events(self, batches: Sequence[RunEvents]) -> None:
        """Write what runs reported since the last call, for many runs in one transaction:
        metric points (the last write of a (key, step) within a run wins: replayed points first,
        then the run's own), latest values, logs, artifacts, check-in deadlines, progress and the
        environment. Only a run's own points set its ``start_step``, never replayed ones."""
        batches = [b for b in batches if not b.empty()]
        if not batches:
            return
        with self._write() as conn:
            now = utcnow()
            metric_rows, nan_logs = _metric_rows(batches)
            if metric_rows:
                dbmod.insert_metric_rows(conn, metric_rows)
                _upsert_latest(conn, metric_rows)
            log_rows = [
                {"run_id": b.run_id, "level": lvl, "message": msg, "wall_time": t}
                for b in batches
                for lvl, msg, t in b.logs
            ] + nan_logs
            if log_rows:
                conn.execute(insert(logs_t), log_rows)
            touched_jobs: set[int] = set()
            for b in batches:  # in batch order, as the engine handed them over
                if _record_run(conn, b, now):
                    touched_jobs.add(b.job_id)
            if touched_jobs:
                conn.execute(
                    update(jobs_t).where(jobs_t.c.id.in_(touched_jobs)).values(updated_at=now)
                )

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> JobSummary:
        """Close a run (succeeded, failed or cancelled) and its job; a job that did not succeed
        cancels its dependents, naming itself as the reason."""
        if status not in ("succeeded", "failed", "cancelled"):
            raise ValueError(f"finish_run status {status!r}")
        with self._write() as conn:
            now = utcnow()
            run = conn.execute(select(runs_t).where(runs_t.c.id == run_id)).first()
            conn.execute(
                update(runs_t)
                .where(runs_t.c.id == run_id)
                .values(
                    status=status, ended_at=now, exit_code=exit_code, error=error, result=result
                )
            )
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == run.job_id)
                .values(
                    status=status,
                    error=error,
                    result=result,
                    ended_at=now,
                    updated_at=now,
                    engine_id=None,
                )
            )
            if status != "succeeded":
                self._cancel_dependents(
                    conn, run.job_id, f"upstream job {run.job_id} {status}", now
                )
            return self._summaries(conn, [run.job_id])[0]

    def mark_lost(
        self, run_ids: Sequence[int], reason: str, refund: bool = False
    ) -> list[JobSummary]:
        """Runs that stopped reporting: the run becomes ``lost``; its job is queued again while
        attempts remain (the next attempt resumes from its checkpoint), else it is lost too.
        ``refund`` gives the attempt back (an engine that was stopped on purpose)."""
        out = []
        with self._write() as conn:
            now = utcnow()
            for run_id in run_ids:
                run = conn.execute(
                    select(runs_t.c.job_id, runs_t.c.status).where(runs_t.c.id == run_id)
                ).first()
                if run is None or run.status != "running":
                    continue
                conn.execute(
                    update(runs_t)
                    .where(runs_t.c.id == run_id)
                    .values(status="lost", ended_at=now, error=reason)
                )
                job = conn.execute(select(jobs_t).where(jobs_t.c.id == run.job_id)).first()
                if job.status != "running":
                    continue
                if job.cancel_requested_at is not None:
                    values = {
                        "status": "cancelled",
                        "error": "cancelled by request",
                        "ended_at": now,
                    }
                elif refund or job.attempts < job.max_attempts:
                    values = {
                        "status": "queued",
                        "error": f"attempt {job.attempts} {reason}; retrying",
                    }
                else:
                    values = {
                        "status": "lost",
                        "error": f"{reason}; gave up after {job.attempts} attempts",
                        "ended_at": now,
                    }
                if refund:
                    values["max_attempts"] = job.max_attempts + 1
                conn.execute(
                    update(jobs_t)
                    .where(jobs_t.c.id == job.id)
                    .values(**values, engine_id=None, updated_at=now)
                )
                if values["status"] in ("cancelled", "lost"):
                    self._cancel_dependents(
                        conn, job.id, f"upstream job {job.id} {values['status']}", now
                    )
                out.append(job.id)
            return self._summaries(conn, out)

    def stale_runs(
        self, now: datetime | None = None, dead_engine_ids: Sequence[int] = ()
    ) -> list[RunInfo]:
        """Running runs whose check-in deadline passed, or whose engine is dead or stopped."""
        now = now or utcnow()
        engine_dead = now - timedelta(seconds=ENGINE_DEAD_AFTER_S)
        with self._read() as conn:
            rows = conn.execute(
                select(runs_t)
                .outerjoin(engines_t, engines_t.c.id == runs_t.c.engine_id)
                .where(
                    runs_t.c.status == "running",
                    runs_t.c.executor != "foreground",
                    or_(
                        runs_t.c.expect_next_by < now,
                        engines_t.c.id.is_(None),
                        engines_t.c.heartbeat_at < engine_dead,
                        engines_t.c.stopped_at.is_not(None),
                        runs_t.c.engine_id.in_(list(dead_engine_ids)),
                    ),
                )
            ).all()
            return [_run_info(r) for r in rows]

    def running_runs(self, engine_id: int | None = None) -> list[RunInfo]:
        """Runs in progress (of one engine, or all)."""
        query = select(runs_t).where(runs_t.c.status == "running")
        if engine_id is not None:
            query = query.where(runs_t.c.engine_id == engine_id)
        with self._read() as conn:
            return [_run_info(r) for r in conn.execute(query)]

    def cancel_requests(self, engine_id: int) -> list[tuple[int, int]]:
        """(job id, run id) of this engine's running jobs that someone asked to cancel."""
        with self._read() as conn:
            return [
                (r.job_id, r.id)
                for r in conn.execute(
                    select(runs_t.c.job_id, runs_t.c.id)
                    .join(jobs_t, jobs_t.c.id == runs_t.c.job_id)
                    .where(
                        runs_t.c.engine_id == engine_id,
                        runs_t.c.status == "running",
                        jobs_t.c.cancel_requested_at.is_not(None),
                    )
                )
            ]

    def _cancel_dependents(self, conn: Connection, job_id: int, reason: str, now: datetime) -> None:
        todo = [job_id]
        while todo:
            current = todo.pop()
            rows = conn.execute(
                select(jobs_t.c.id)
                .join(deps_t, deps_t.c.job_id == jobs_t.c.id)
                .where(deps_t.c.depends_on_id == current, jobs_t.c.status == "queued")
            ).all()
            for r in rows:
                conn.execute(
                    update(jobs_t)
                    .where(jobs_t.c.id == r.id)
                    .values(status="cancelled", error=reason, ended_at=now, updated_at=now)
                )
                todo.append(r.id)

    # -------------------------------------------------------------------------------- foreground

    def start_foreground(
        self,
        kind: str,
        spec: dict[str, Any],
        spec_hash: str,
        *,
        label: str,
        host: str,
        pid: int,
        code_version: str,
        workdir: str | None = None,
    ) -> tuple[int, int]:
        """A job and its run for a foreground ``mesa-tui run`` (that process writes its own run);
        its trigger and target come from the spec (it names models by path, not by job)."""
        trigger, target = backdoor_of(spec)
        with self._write() as conn:
            now = utcnow()
            job_id = conn.execute(
                insert(jobs_t)
                .values(
                    kind=kind,
                    label=label,
                    spec=spec,
                    spec_hash=spec_hash,
                    status="running",
                    priority=0,
                    max_attempts=1,
                    attempts=1,
                    executor="foreground",
                    trigger=trigger,
                    target=target,
                    workdir=workdir,
                    code_version=code_version,
                    created_at=now,
                    updated_at=now,
                    started_at=now,
                )
                .returning(jobs_t.c.id)
            ).scalar_one()
            run_id = _insert_run(
                conn,
                job_id,
                spec,
                now,
                attempt=1,
                executor="foreground",
                host=host,
                code_version=code_version,
                spec_hash=spec_hash,
                external_id=str(pid),
            )
            return job_id, run_id


class RunEvents:
    """What one run reported since the last write (filled by the engine, written in a batch).
    ``replayed`` holds the points a resumed attempt re-sent from its work directory's metric
    journal (they came before any point of its own, and are written first)."""

    __slots__ = (
        "run_id",
        "job_id",
        "metrics",
        "replayed",
        "logs",
        "artifacts",
        "expect_next_by",
        "progress",
        "env",
    )

    def __init__(self, run_id: int, job_id: int):
        self.run_id = run_id
        self.job_id = job_id
        self.metrics: list[tuple[str, int, float, float]] = []
        self.replayed: list[tuple[str, int, float, float]] = []
        self.logs: list[tuple[str, str, float]] = []
        self.artifacts: list[tuple[str, str, str | None, int | None]] = []
        self.expect_next_by: datetime | None = None
        self.progress: dict[str, Any] | None = None
        self.env: dict[str, Any] = {}

    def empty(self) -> bool:
        return not (
            self.metrics
            or self.replayed
            or self.logs
            or self.artifacts
            or self.expect_next_by
            or self.progress
            or self.env
        )

    def clear(self) -> None:
        self.metrics = []
        self.replayed = []
        self.logs = []
        self.artifacts = []
        self.expect_next_by = None
        self.progress = None
        self.env = {}


def _method_summary(method: str, group: list[StudyCell], paper: dict[str, Any]) -> MethodSummary:
    done = [c for c in group if c.asr is not None]
    asrs = [c.asr for c in group if c.asr is not None]
    per_seed: dict[Any, list[float]] = defaultdict(list)
    for c in group:
        if c.asr is not None:
            per_seed[c.seed].append(c.asr)
    seed_means = [statistics.fmean(v) for v in per_seed.values()]
    accs = [c.acc_clean for c in done if c.acc_clean is not None]
    ras = [c.ra for c in done if c.ra is not None]
    # "Worst" means the highest ASR for a repair, the lowest for the attack itself (paper's use).
    worst = (min(asrs) if method == "before repair" else max(asrs)) if asrs else None
    return MethodSummary(
        method=method,
        cells=len(group),
        done=len(done),
        asr_mean=statistics.fmean(asrs) if asrs else None,
        asr_worst=worst,
        asr_seed_std=statistics.stdev(seed_means) if len(seed_means) > 1 else None,
        acc_clean_mean=statistics.fmean(accs) if accs else None,
        ra_mean=statistics.fmean(ras) if ras else None,
        paper_asr_mean=_finite(paper.get("mean")),
        paper_asr_worst=_finite(paper.get("worst")),
    )


def _number_reference(value: str, ids: list[int]) -> str:
    """``job:#2`` (the third job of this submission) -> ``job:<its id>``."""
    if value.startswith("job:#"):
        index, _, rest = value[5:].partition(":")
        if index.isdigit() and int(index) < len(ids):
            return f"job:{ids[int(index)]}" + (f":{rest}" if rest else "")
    return value


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _stored_float(value: Any) -> float:
    """A stored metric value; NULL (how some drivers store NaN) reads back as NaN."""
    return math.nan if value is None else float(value)


def check_study_name(name: str) -> None:
    """A study's name is shown in lists and typed in commands: not blank, no path separator, no
    control character."""
    if not name.strip():
        raise UserError(f"invalid study name {name!r}: give a name that is not blank, e.g. mini")
    bad = next((c for c in name if c in "/\\" or unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UserError(
            f"invalid study name {name!r}: {bad!r} is a path separator or control character; "
            "give a name without one, e.g. mini"
        )
