"""Opening the store: engines with SQLite pragmas, schema checks, short read and write transactions.

SQLite is opened in WAL mode with a busy timeout and foreign keys on. Every write runs in a short
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers queue on the busy
timeout instead of failing on a lock upgrade); reads use deferred transactions and never block
writers in WAL mode. Everything dialect-specific lives here, so PostgreSQL needs changes in this
module only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from store.errors import UserError

BUSY_TIMEOUT_MS = 30_000
# A write that still finds the database locked after the busy timeout is retried this long.
LOCKED_RETRY_S = 120.0


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for in-memory databases and other dialects)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).expanduser()


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine; for SQLite with WAL, busy timeout, foreign keys and manual BEGIN."""
    url = check_url(url)
    if not is_sqlite(url):
        check_driver(url)
        return create_engine(url, pool_pre_ping=True, future=True, json_serializer=json_dumps)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        future=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        if path is not None:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _finite_only(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for servers that validate it (PostgreSQL refuses ``NaN``): a non-finite number is
    stored as ``null``. SQLite keeps Python's ``NaN`` tokens, which it stores as text."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite_only(value), allow_nan=False)


def _is_locked(exc: OperationalError) -> bool:
    message = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return "database is locked" in message or "database is busy" in message


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One short write transaction (``BEGIN IMMEDIATE`` on SQLite).

    The body must be safe to run again: a lock that outlasts the busy timeout rolls back and
    retries, so "database is locked" never reaches a person.
    """
    options = {"sqlite_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    deadline = time.monotonic() + LOCKED_RETRY_S
    attempt = 0
    while True:
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(**options)
                with conn.begin():
                    yield conn
            return
        except OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            attempt += 1
            time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))


@contextlib.contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only snapshot (a deferred transaction; in WAL mode it never blocks writers)."""
    with engine.connect() as conn, conn.begin():
        yield conn


def retrying(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and retry it while SQLite reports a lock (for bodies that open their own
    transactions; ``write_transaction`` can only retry a lock taken at BEGIN)."""
    deadline = time.monotonic() + LOCKED_RETRY_S
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            attempt += 1
            time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))


def insert_metric_rows(conn: Connection, rows: list[tuple[int, str, int, float, float]]) -> None:
    """Bulk-write (run_id, key, step, value, wall_time) rows; the last write of a (run, key, step)
    wins (value and wall time replaced, the row keeps its id). A resumed attempt first replays
    its journal and then computes the steps after its checkpoint again: the recomputed points
    replace the replayed ones. SQLite goes straight to the driver's executemany (the hot path of
    ingest), which applies the rows in order; PostgreSQL sends them as one multi-row statement,
    which may not touch a row twice, so a batch keeps only its last point per (run, key, step)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(
            "INSERT INTO metrics (run_id, key, step, value, wall_time) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, key, step) DO UPDATE SET "
            "value = excluded.value, wall_time = excluded.wall_time",
            rows,
        )
        return
    from store.models import Metric

    last = {(r[0], r[1], r[2]): r for r in rows}
    names = ("run_id", "key", "step", "value", "wall_time")
    conn.execute(
        upsert(Metric.__table__, conn, ["run_id", "key", "step"], ["value", "wall_time"]),
        [dict(zip(names, r, strict=True)) for r in last.values()],
    )


def upsert(
    table: Any,
    engine_or_conn: Engine | Connection,
    keys: list[str],
    update: list[str],
    only_if_not_older: str | None = None,
) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO UPDATE SET update = excluded.update``, optionally only
    where the stored ``only_if_not_older`` column is not greater than the new one."""
    from sqlalchemy.dialects import postgresql, sqlite

    stmt: postgresql.Insert | sqlite.Insert
    if engine_or_conn.dialect.name == "postgresql":
        stmt = postgresql.insert(table)
    else:
        stmt = sqlite.insert(table)
    where = None
    if only_if_not_older is not None:
        where = table.c[only_if_not_older] <= stmt.excluded[only_if_not_older]
    return stmt.on_conflict_do_update(
        index_elements=keys, set_={name: stmt.excluded[name] for name in update}, where=where
    )


def claim_lock_clause(stmt: Any, engine_or_conn: Engine | Connection) -> Any:
    """Row locking for the claim's candidate select: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
    SQLite needs nothing (``BEGIN IMMEDIATE`` already serialises writers)."""
    if engine_or_conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


@contextlib.contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Serialise schema creation between processes opening a new SQLite file at once."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def current_revision(engine: Engine) -> str | None:
    """The alembic revision stamped in the database (None when it has none)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return row[0] if row else None


def has_tables(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(inspect(conn).get_table_names())


def safe_url(url: str) -> str:
    """The URL with its password masked (for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def check_url(url: str) -> str:
    """Refuse URLs mesa-tui cannot open, with the fix; ``postgresql://`` means psycopg 3."""
    try:
        u = make_url(url)
    except Exception:
        raise UserError(
            f"store URL '{url}' is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB"
        ) from None
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite":
        return url
    if backend != "postgresql":
        raise UserError(
            f"store URL '{safe_url(url)}': the {backend} database is not supported; use "
            "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    if "+" not in u.drivername:
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    elif driver != "psycopg":
        raise UserError(
            f"store URL '{safe_url(url)}': driver {driver} is not supported; use "
            "postgresql+psycopg://USER@HOST/DB"
        )
    return url


def check_driver(url: str) -> None:
    """A PostgreSQL URL needs psycopg (the ``postgres`` extra)."""
    if is_sqlite(url):
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UserError(
            f"store URL '{safe_url(url)}' needs psycopg: install the postgres extra: "
            "pip install -e '.[postgres]'"
        ) from None


def schema_upgrade_hint() -> str:
    return "run `mesa-tui db upgrade`"
