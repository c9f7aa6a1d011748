"""What is wrong with a store, in one line naming the store, the problem and the fix.

Every face goes through here: ``Store()`` runs the cheap checks before it opens a SQLite file
and turns whatever opening raises into a ``StoreProblem``; the CLI's error wrapper, the engine's
loop and the app classify the failures of later reads and writes with ``classify``. The full
``PRAGMA integrity_check`` reads the whole file (minutes for a store of many gigabytes), so it
runs only in ``mesa-tui db check``, ``db backup`` (on the copy) and at ``engine start``, never on
every ``ls``; damage in the pages a command reads is still reported by that command, in the same
words.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import make_url

from store import db as dbmod
from store.errors import UserError

README = 'docs/operators.md, "When the store is damaged"'


class StoreProblem(UserError):
    """The store cannot be used as it is; the message says what to do."""


class NotADatabase(StoreProblem):
    """The file is not an SQLite database (a wrong path, or a file overwritten)."""


class CorruptStore(StoreProblem):
    """SQLite reports damage: a malformed page, or ``PRAGMA integrity_check`` found errors."""


class StoreNotWritable(StoreProblem):
    """The file, or the directory SQLite keeps its -wal and -shm files in, cannot be written."""


class StoreFull(StoreProblem):
    """The disk (or a size limit) left no room for a write; nothing stored is lost."""


class StoreBusy(StoreProblem):
    """Another process held the write lock past every retry."""


class StoreUnreachable(StoreProblem):
    """The database server does not answer, or closed the connection."""


class StoreAuthFailed(StoreProblem):
    """The database server refused the user or the password."""


class SchemaBehind(StoreProblem):
    """The database was made by an older mesa-tui (or a newer one: its schema is unknown)."""


SchemaState = Literal["behind", "unknown", "foreign"]
BAD_SCHEMA_STATES: tuple[SchemaState, ...] = ("behind", "unknown", "foreign")


def schema_problem(url: str, revision: str | None, state: SchemaState) -> SchemaBehind:
    """The one line for a schema this code cannot use (``state`` as ``check_store`` names it)."""
    from store.migrations import HEAD

    where = _where(url)
    if state == "behind":
        return SchemaBehind(
            f"the store {where} uses schema {revision}, older than this mesa-tui's {HEAD}; "
            f"{dbmod.schema_upgrade_hint()}"
        )
    if state == "unknown":
        return SchemaBehind(
            f"the store {where} uses schema {revision}, which this mesa-tui does not know "
            "(made by a newer one?); upgrade mesa-tui, or point --db / MESA_TUI_DB at another store"
        )
    return SchemaBehind(
        f"the store {where} has tables but no schema version (not made by mesa-tui?); "
        "point --db / MESA_TUI_DB at another file or move this one aside"
    )


def _where(url: str) -> str:
    path = dbmod.sqlite_path(url)
    return str(path) if path is not None else dbmod.safe_url(url)


# ------------------------------------------------------------------------------------------------
# Messages (one place, so every face says the same words)


def not_a_database(path: Path | str) -> NotADatabase:
    return NotADatabase(
        f"the store {path} is not an SQLite database; point --db / MESA_TUI_DB at your store, restore "
        f"it from a backup, or move it aside to start an empty store ({README})"
    )


def corrupt(path: Path | str, detail: str) -> CorruptStore:
    return CorruptStore(
        f"the store {path} is damaged ({detail}); stop its engines, keep a copy of the file and "
        f"restore a backup or recover it with sqlite3's .recover ({README})"
    )


def full(path: Path | str, detail: str) -> StoreFull:
    return StoreFull(
        f"the store {path} cannot grow: no space left ({detail}); nothing stored is lost: free "
        f"space on its disk (df -h {Path(path).parent}) and try again"
    )


# ------------------------------------------------------------------------------------------------
# The cheap checks, before SQLite opens a file


def check_file(url: str, write: bool = True) -> None:
    """Refuse a SQLite store that cannot work, before anything is written: the path is a
    directory, its directory cannot be made or written (SQLite keeps the -wal and -shm files
    there), the file is read-only, or it does not start with SQLite's header. A missing file is
    fine (the store is created); nothing is checked for other dialects. ``write=False`` (a
    backup, which only reads) leaves out the checks for writing."""
    path = dbmod.sqlite_path(url)
    if path is None:
        return
    if not write:
        if path.is_dir():
            raise NotADatabase(
                f"the store {path} is a directory; point --db / MESA_TUI_DB at a file"
            )
        _check_header(path)
        return
    if path.is_dir():
        raise NotADatabase(
            f"the store {path} is a directory; point --db / MESA_TUI_DB at a file, e.g. "
            f"sqlite:///{path / 'mesa.db'}"
        )
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreNotWritable(
                f"the store {path} cannot be created: its directory {parent} cannot be made "
                f"({exc.strerror}); point --db / MESA_TUI_DB at a writable place"
            ) from None
    if not parent.is_dir():
        raise StoreNotWritable(
            f"the store {path} cannot be created: {parent} is not a directory; point --db / "
            "MESA_TUI_DB at a writable place"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreNotWritable(
            f"the store {path} cannot be written: its directory {parent} is not writable "
            "(SQLite keeps the store's -wal and -shm files beside it); make it writable "
            "(chmod/chown), or copy the store to a writable place and point --db there"
        )
    if not path.exists():
        return
    if not os.access(path, os.R_OK):
        raise StoreNotWritable(
            f"the store {path} cannot be read (permission denied); make it readable and "
            f"writable (chmod u+rw {path}, or chown it to this user)"
        )
    if not os.access(path, os.W_OK):
        raise StoreNotWritable(
            f"the store {path} is read-only; make it writable (chmod u+rw {path}), or copy it "
            "to a writable place and point --db there"
        )
    _check_header(path)


def _check_header(path: Path) -> None:
    """SQLite reads the header itself: a plain ``open()`` and ``close()`` of the file would drop
    every POSIX lock this process's SQLite connections hold on it (the locks belong to the
    process and the inode, not to the descriptor), so a second Store in a process that already
    had one open made that one read stale snapshots and write into nowhere. SQLite's own close
    keeps the descriptor while other connections hold locks; ``immutable`` takes none."""
    if not path.exists() or path.stat().st_size == 0:
        return
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB" or "not a database" in str(exc):
            raise not_a_database(path) from None
        # Anything else (permissions, a damaged page 1) is classified when the store opens.


# ------------------------------------------------------------------------------------------------
# Classifying failures


def _sqlite_problem(err: sqlite3.Error, url: str) -> StoreProblem | None:
    path = _where(url)
    name = getattr(err, "sqlite_errorname", "") or ""
    message = str(err).strip().splitlines()[0] if str(err).strip() else name
    low = message.lower()
    if name == "SQLITE_NOTADB" or "file is not a database" in low:
        return not_a_database(path)
    if name.startswith("SQLITE_CORRUPT") or "malformed" in low:
        return corrupt(path, message)
    if name.startswith("SQLITE_FULL") or "database or disk is full" in low:
        return full(path, message)
    if name.startswith("SQLITE_READONLY") or "readonly database" in low:
        return StoreNotWritable(
            f"the store {path} cannot be written ({message}); make the file and its directory "
            "writable (chmod/chown), or copy the store to a writable place and point --db there"
        )
    if name.startswith("SQLITE_BUSY") or "database is locked" in low:
        return StoreBusy(
            f"the store {path} stayed locked by another process for {dbmod.LOCKED_RETRY_S:.0f} s "
            f"({message}); retry, or find the process holding it (fuser {path})"
        )
    if name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in low:
        return StoreNotWritable(
            f"the store {path} cannot be opened ({message}); check that its directory exists "
            "and is readable and writable"
        )
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in low:
        return StoreProblem(
            f"the store {path} could not be read or written ({message}); check its disk (df -h, "
            "dmesg), then run `mesa-tui db check`"
        )
    return None


def _server_problem(err: BaseException, url: str, opening: bool) -> StoreProblem | None:
    where = dbmod.safe_url(url)
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    reason = first.split(" failed: ", 1)[-1].strip() if " failed: " in first else first
    low = text.lower()
    sqlstate = getattr(err, "sqlstate", None)
    try:
        user = make_url(url).username or "(none)"
    except Exception:
        user = "(none)"
    if "password authentication failed" in low or sqlstate in ("28P01", "28000"):
        return StoreAuthFailed(
            f"cannot open the store {where}: the server refused user {user} ({reason}); fix "
            "the user or password in --db / MESA_TUI_DB (postgresql+psycopg://USER:PASSWORD@HOST/DB) "
            "or in ~/.pgpass"
        )
    if "no password supplied" in low:
        return StoreAuthFailed(
            f"cannot open the store {where}: the server wants a password for user {user} and "
            "none was given; add it to --db / MESA_TUI_DB (postgresql+psycopg://USER:PASSWORD@HOST/DB) "
            "or to ~/.pgpass"
        )
    if sqlstate == "3D000" or ("database" in low and "does not exist" in low):
        return StoreUnreachable(
            f"cannot open the store {where}: {reason}; create it (createdb) or fix the database "
            "name in --db / MESA_TUI_DB"
        )
    if "failed to resolve host" in low or "could not translate host name" in low:
        return StoreUnreachable(
            f"cannot open the store {where}: the host is unknown ({reason}); fix the host in "
            "--db / MESA_TUI_DB"
        )
    if sqlstate == "53100" or "no space left on device" in low:
        return StoreFull(
            f"the store {where} cannot grow: the server's disk is full ({reason}); nothing "
            "stored is lost: free space on the database server and try again"
        )
    if (
        "connection refused" in low
        or "timeout expired" in low
        or "could not connect" in low
        or "no route to host" in low
        or "is the server running" in low
    ):
        return StoreUnreachable(
            f"cannot open the store {where}: the server does not answer ({reason}); start it "
            "(e.g. systemctl start postgresql) or fix the host and port in --db / MESA_TUI_DB"
        )
    if (
        "server closed the connection" in low
        or "terminating connection" in low
        or "connection is lost" in low
        or "the connection is closed" in low
        or "consuming input failed" in low
        or sqlstate in ("57P01", "57P02", "57P03")
    ):
        return StoreUnreachable(
            f"the store {where} closed the connection ({reason}); check that the server runs, "
            "then try again"
        )
    if opening:
        return StoreUnreachable(
            f"cannot open the store {where}: {reason}; check that the server runs and the URL "
            "(--db / MESA_TUI_DB) is right"
        )
    return None


def _os_problem(err: OSError, url: str) -> StoreProblem | None:
    """An OSError is the store's only when it names the store's file or directory."""
    path = dbmod.sqlite_path(url)
    if path is None or not err.filename:
        return None
    name = str(err.filename)
    if not (name.startswith(str(path)) or name == str(path.parent)):
        return None
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return full(path, err.strerror or "no space left on device")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreNotWritable(
            f"the store {path} cannot be written ({err.strerror}: {name}); make it and its "
            "directory writable, or copy the store to a writable place and point --db there"
        )
    return None


def classify(exc: BaseException, url: str, *, opening: bool = False) -> StoreProblem | None:
    """The store problem behind ``exc`` (None when it is not one). ``opening``: the error came
    from connecting, so any server error means the store cannot be opened."""
    if isinstance(exc, StoreProblem):
        return exc
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlite3.Error):
            return _sqlite_problem(err, url)
        if isinstance(err, OSError):
            return _os_problem(err, url)
        module = type(err).__module__ or ""
        if module.startswith("psycopg"):
            return _server_problem(err, url, opening)
        err = getattr(err, "orig", None) or err.__cause__
    return None


def describe(exc: BaseException, url: str) -> str:
    """One line for a log: the store problem when ``exc`` is one, else its first line."""
    problem = classify(exc, url)
    if problem is not None:
        return str(problem)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def translated(url: str, *, opening: bool = False) -> Iterator[None]:
    """Raise a store problem as its ``StoreProblem`` (one line, exit code 2)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        problem = classify(exc, url, opening=opening)
        if problem is None:
            raise
        raise problem from None


# ------------------------------------------------------------------------------------------------
# The full check


def integrity_problems(engine: Any, limit: int = 20) -> list[str]:
    """``PRAGMA integrity_check``'s findings on a SQLite store (empty when it is sound); it reads
    every page. PostgreSQL keeps its own checksums: nothing is checked there."""
    if engine.dialect.name != "sqlite":
        return []
    with dbmod.read_transaction(engine) as conn:
        rows = [str(r[0]) for r in conn.exec_driver_sql(f"PRAGMA integrity_check({int(limit)})")]
    return [] if rows == ["ok"] else rows


def _integrity_detail(problems: list[str], limit: int) -> str:
    more = len(problems) - 1
    tail = "" if more == 0 else f" and {more} more" if len(problems) < limit else " and more"
    return f"integrity check: {problems[0]}{tail}"


def _index_only(problems: list[str]) -> bool:
    """Findings about indexes alone: the rows are sound and ``REINDEX`` rebuilds them."""
    return all(
        ("index" in p and "missing from" in p) or "wrong # of entries" in p for p in problems
    )


def integrity_error(problems: list[str], url: str, limit: int = 20) -> CorruptStore | None:
    """The one line for ``PRAGMA integrity_check``'s findings (None when there are none)."""
    if not problems:
        return None
    where = _where(url)
    if _index_only(problems):
        return CorruptStore(
            f"the store {where} is damaged ({_integrity_detail(problems, limit)}); only indexes "
            f"are wrong: stop its engines, keep a copy of the file and rebuild them with "
            f"sqlite3 {where} REINDEX ({README})"
        )
    return corrupt(where, _integrity_detail(problems, limit))


def check_integrity(engine: Any, url: str, limit: int = 20) -> None:
    """Refuse a store that fails ``PRAGMA integrity_check`` (``CorruptStore``)."""
    with translated(url):
        problems = integrity_problems(engine, limit)
    error = integrity_error(problems, url, limit)
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------------
# mesa-tui db check / db backup


def check_store(url: str, limit: int = 20) -> dict[str, Any]:
    """What ``mesa-tui db check`` reports: the store, its size, its schema against this code's,
    and ``PRAGMA integrity_check`` (every page is read). ``problem`` is the one line of the
    first thing wrong (None when the store is sound); nothing is created or written."""
    from store.migrations import HEAD, known_revisions

    path = dbmod.sqlite_path(url)
    report: dict[str, Any] = {
        "store": _where(url),
        "dialect": make_url(url).get_backend_name(),
        "exists": True,
        "bytes": None,
        "schema": None,
        "head": HEAD,
        "schema_state": None,
        "integrity": None,
        "problem": None,
    }
    if path is not None and not path.exists():
        report["exists"] = False
        return report
    try:
        check_file(url)
        if path is not None:
            report["bytes"] = sum(
                p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()
            )
        engine = dbmod.make_engine(url)
        try:
            with translated(url, opening=True):
                revision = dbmod.current_revision(engine)
                report["schema"] = revision
                if revision == HEAD:
                    report["schema_state"] = "current"
                elif revision is None:
                    report["schema_state"] = "foreign" if dbmod.has_tables(engine) else "empty"
                elif revision in known_revisions():
                    report["schema_state"] = "behind"
                else:
                    report["schema_state"] = "unknown"
            with translated(url):
                problems = integrity_problems(engine, limit)
            report["integrity"] = problems or "ok"
            error = integrity_error(problems, url, limit)
            if error is not None:
                raise error
        finally:
            engine.dispose()
    except StoreProblem as exc:
        report["problem"] = str(exc)
        return report
    if report["schema_state"] in BAD_SCHEMA_STATES:
        report["problem"] = str(schema_problem(url, report["schema"], report["schema_state"]))
    return report


def backup_target(url: str, dest: Path | str) -> Path:
    """The backup's file: ``dest``, or a dated name inside ``dest`` when it is a directory (or
    ends with a slash: the directory is made)."""
    import time

    as_directory = str(dest).endswith(("/", os.sep))
    dest = Path(dest).expanduser()
    if as_directory or dest.is_dir():
        path = dbmod.sqlite_path(url)
        stem = path.stem if path is not None else "mesa"
        dest = dest / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.db"
    if dest.exists():
        raise UserError(f"the backup {dest} exists already; give a new file name or a directory")
    return dest


def pg_dump_command(url: str, dest: Path | str) -> list[str]:
    """The ``pg_dump`` call that backs a PostgreSQL store up (the password stays out of it:
    libpq reads PGPASSWORD or ~/.pgpass)."""
    from sqlalchemy.engine import URL

    u = make_url(url)
    libpq = URL.create(
        "postgresql", u.username, None, u.host, u.port, u.database, u.query
    ).render_as_string(hide_password=False)
    return ["pg_dump", "--format=custom", "--file", str(dest), libpq]


def _backup_source(path: Path) -> sqlite3.Connection:
    source = sqlite3.connect(str(path), timeout=dbmod.BUSY_TIMEOUT_MS / 1000)
    try:
        source.execute(f"PRAGMA busy_timeout = {dbmod.BUSY_TIMEOUT_MS}")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return source
    except sqlite3.Error as exc:
        source.close()
        cannot_open = (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_CANTOPEN")
        if not cannot_open or os.access(path.parent, os.W_OK):
            raise
    # SQLite cannot make the -shm file in a directory it may not write: read the file as it is
    # (no engine can be writing there).
    source = sqlite3.connect(path.resolve().as_uri() + "?immutable=1", uri=True)
    source.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return source


def backup_sqlite(url: str, dest: Path | str) -> dict[str, Any]:
    """Copy a SQLite store with SQLite's online backup API while engines keep writing.

    The copy is taken in one step, inside one read transaction: in WAL mode that is a consistent
    snapshot that never blocks the writers (a step-wise backup would restart at every write).
    It is written beside ``dest``, switched to a rollback journal (one self-contained file),
    checked with ``PRAGMA integrity_check`` and renamed into place, so ``dest`` is always whole.
    """
    path = dbmod.sqlite_path(url)
    if path is None:
        raise UserError(
            f"the store {dbmod.safe_url(url)} is in memory; there is nothing to back up"
        )
    if not path.exists():
        raise UserError(f"no store at {path} to back up; check --db / MESA_TUI_DB")
    with translated(url, opening=True):
        check_file(url, write=False)
    dest = backup_target(url, dest)
    if dest.resolve() == path.resolve():
        raise UserError(f"the backup {dest} is the store itself; give another path")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot write the backup {dest} ({exc.strerror}); choose another place"
        ) from None
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    source = None
    target = None
    try:
        with translated(url, opening=True):
            # Opened as the engines open it, so that closing it tidies the -wal and -shm files
            # away on a quiet store; SQLite falls back to reading a file it may not write, and
            # the backup only reads.
            source = _backup_source(path)
        try:
            target = sqlite3.connect(str(partial))
        except sqlite3.Error as exc:
            raise UserError(
                f"cannot write the backup {dest} ({exc}); choose another place"
            ) from None
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", "") or ""
            if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "malformed" in str(exc):
                raise _sqlite_problem(exc, url) or exc from None
            raise UserError(
                f"cannot write the backup {dest} ({exc}); free space there or choose another place"
            ) from None
        problems = [str(r[0]) for r in target.execute("PRAGMA integrity_check(20)")]
        error = integrity_error([] if problems == ["ok"] else problems, url)
        if error is not None:
            raise error
        schema = None
        if target.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone():
            row = target.execute("SELECT version_num FROM alembic_version").fetchone()
            schema = row[0] if row else None
        target.close()
        target = None
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, dest)
    finally:
        if target is not None:
            target.close()
        if source is not None:
            source.close()
        with contextlib.suppress(OSError):
            partial.unlink()
    return {
        "store": str(path),
        "backup": str(dest),
        "bytes": dest.stat().st_size,
        "schema": schema,
        "integrity": "ok",
    }
