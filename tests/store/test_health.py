"""store.health: failures classified into one line each; ``db backup`` while an engine writes;
a PostgreSQL server that is down or refuses the password."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time

import pytest
from typer.testing import CliRunner

from mesa_tui.cli import app
from store import health
from store.entities import NewJob
from store.migrations import HEAD
from store.repository import Store
from tests.cli.test_run_cli import assert_one_line_error
from tests.engine.helpers import start_engine, stop_engine, wait_for

runner = CliRunner()


def sqlite_error(message: str, name: str) -> sqlite3.Error:
    exc = sqlite3.DatabaseError(message)
    exc.sqlite_errorname = name
    return exc


@pytest.mark.parametrize(
    "message, name, kind, words",
    [
        ("file is not a database", "SQLITE_NOTADB", health.NotADatabase, "not an SQLite"),
        ("database disk image is malformed", "SQLITE_CORRUPT", health.CorruptStore, "damaged"),
        ("database or disk is full", "SQLITE_FULL", health.StoreFull, "cannot grow"),
        ("attempt to write a readonly database", "SQLITE_READONLY", health.StoreNotWritable, ""),
        ("database is locked", "SQLITE_BUSY", health.StoreBusy, "fuser"),
        ("disk I/O error", "SQLITE_IOERR_WRITE", health.StoreProblem, "db check"),
    ],
)
def test_sqlite_failures_become_one_line_naming_the_file(message, name, kind, words):
    from sqlalchemy.exc import OperationalError

    wrapped = OperationalError("SELECT 1", {}, sqlite_error(message, name))
    problem = health.classify(wrapped, "sqlite:////data/mesa.db")
    assert isinstance(problem, kind)
    assert "/data/mesa.db" in str(problem) and words in str(problem)
    assert "\n" not in str(problem)


def test_only_the_stores_own_os_errors_are_store_problems():
    url = "sqlite:////data/mesa.db"
    full = OSError(errno.ENOSPC, "No space left on device", "/data/mesa.db.lock")
    assert isinstance(health.classify(full, url), health.StoreFull)
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/reports/figure.png")
    assert health.classify(elsewhere, url) is None
    assert health.classify(ValueError("nothing to do with it"), url) is None


def test_a_full_disk_during_a_command_is_one_line_and_writes_nothing(monkeypatch, isolated_home):
    """``study create`` writes many jobs in one transaction; with no room left it says so in
    one line and the store keeps what it had (SQLite rolls the transaction back)."""
    from sqlalchemy import event

    import mesa_tui.commands.jobs as jobs_cmd

    store = Store()
    store.submit([NewJob("train", {"kept": True}, "kept")])
    path = isolated_home / "data" / "mesa.db"
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]

    def full_store():
        full = Store()

        @event.listens_for(full.engine, "connect")
        def _cap(dbapi_connection, _record):
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        full.engine.dispose()
        return full

    monkeypatch.setattr(jobs_cmd, "open_store", full_store)
    result = runner.invoke(app, ["study", "create", "mini", "--template", "cpu-mini"])
    assert_one_line_error(result, str(path), "cannot grow", "nothing stored is lost", "df -h")
    assert [j.spec for j in store.list_jobs()] == [{"kept": True}] and store.studies() == []


def test_store_problem_hints_the_docs_section_that_exists():
    from pathlib import Path

    from store.health import README

    assert README.startswith("docs/operators.md")
    readme = (Path(__file__).resolve().parents[2] / "docs/operators.md").read_text()
    assert "## When the store is damaged" in readme
    for command in ("mesa-tui db check", "mesa-tui db backup", ".recover", "REINDEX"):
        assert command in readme


# ------------------------------------------------------------------------------------------------
# db backup while an engine writes


def test_db_backup_while_an_engine_writes_is_a_sound_consistent_copy(
    tmp_path, store_url, monkeypatch
):
    if not store_url.startswith("sqlite"):
        pytest.skip("SQLite's backup API; PostgreSQL prints pg_dump (tested below)")
    store = Store()
    spec = {"steps": 4000, "step_s": 0.002, "keys": 8, "checkpoint_every": 10_000}
    (job,) = store.submit([NewJob("count", spec, "backup")])
    engine = start_engine(tmp_path)
    copies = []
    try:
        wait_for(lambda: store.job(job).latest, timeout=60, what="the first points")
        for i in range(3):
            result = runner.invoke(app, ["db", "backup", str(tmp_path / f"copy-{i}.db")])
            assert result.exit_code == 0, result.output
            copies.append(tmp_path / f"copy-{i}.db")
            time.sleep(0.3)
        assert store.job(job).status == "running", "the engine was to be writing throughout"
    finally:
        stop_engine(engine)
    counts = []
    for copy in copies:
        conn = sqlite3.connect(copy)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one whole file
        # One snapshot: each key's latest value is the newest point in the same copy (the
        # engine writes both in one transaction).
        stale = conn.execute(
            "SELECT count(*) FROM latest_metrics l WHERE l.step != "
            "(SELECT max(step) FROM metrics m WHERE m.run_id = l.run_id AND m.key = l.key)"
        ).fetchone()[0]
        assert stale == 0
        counts.append(conn.execute("SELECT count(*) FROM metrics").fetchone()[0])
        conn.close()
        backup = Store(f"sqlite:///{copy}")  # opens as a store, at this code's schema
        assert [j.id for j in backup.list_jobs()] == [job]
        backup.close()
    assert 0 < counts[0] < counts[-1]  # taken while the points kept coming
    monkeypatch.setenv("MESA_TUI_DB", f"sqlite:///{copies[-1]}")
    checked = runner.invoke(app, ["db", "check", "--json"])
    assert checked.exit_code == 0 and f'"schema": "{HEAD}"' in checked.stdout


def test_db_backup_refuses_to_overwrite_and_names_a_dated_file_in_a_directory(tmp_path):
    Store().submit([NewJob("train", {}, "h")])
    target = tmp_path / "copies"
    first = runner.invoke(app, ["db", "backup", f"{target}/", "--json"])
    assert first.exit_code == 0, first.output
    (made,) = target.iterdir()
    assert made.name.startswith("mesa-") and made.suffix == ".db"
    again = runner.invoke(app, ["db", "backup", str(made)])
    assert_one_line_error(again, str(made), "exists already")
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no partial left


# ------------------------------------------------------------------------------------------------
# PostgreSQL: down, a refused password, backups through pg_dump


async def _app_line() -> str:
    from mesa_tui.app import app_for_store
    from mesa_tui.screens.store_error import StoreErrorApp

    shown = app_for_store()
    assert isinstance(shown, StoreErrorApp)
    async with shown.run_test() as pilot:
        text = str(shown.query_one("#message").render())
        await pilot.press("q")
    assert shown.return_code == 2
    return text


def _every_face(monkeypatch, url: str, *words: str) -> None:
    monkeypatch.setenv("MESA_TUI_DB", url)
    lines = set()
    for args in (["ls"], ["submit", "train"], ["engine", "start", "--detach"], ["db", "check"]):
        lines.add(assert_one_line_error(runner.invoke(app, args), *words))
    assert len(lines) == 1, lines
    assert asyncio.run(_app_line()) == lines.pop()


@pytest.mark.postgres
def test_a_postgresql_server_that_is_down(monkeypatch):
    pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")
    from tests.postgres import _free_port

    url = f"postgresql+psycopg://mesa:secret@127.0.0.1:{_free_port()}/mesa"
    _every_face(monkeypatch, url, "cannot open the store", "does not answer", "start it")
    assert "secret" not in runner.invoke(app, ["ls"]).stderr


@pytest.mark.postgres
def test_a_postgresql_server_that_refuses_the_password(postgres_server, monkeypatch):
    name = postgres_server.create_database()
    try:
        with postgres_server.admin() as conn:
            conn.execute("DROP ROLE IF EXISTS mesa_pw")
            conn.execute("CREATE ROLE mesa_pw LOGIN PASSWORD 'right'")
            conn.execute(f'ALTER DATABASE "{name}" OWNER TO mesa_pw')
            hba = postgres_server.data / "pg_hba.conf"
            if "mesa_pw" not in hba.read_text():
                hba.write_text("host all mesa_pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        base = f"127.0.0.1:{postgres_server.port}/{name}"
        wait_for(lambda: _refused(f"postgresql+psycopg://mesa_pw:wrong@{base}"), timeout=10)
        _every_face(
            monkeypatch,
            f"postgresql+psycopg://mesa_pw:wrong@{base}",
            "refused user mesa_pw",
            "password",
        )
        assert "wrong" not in runner.invoke(app, ["ls"]).stderr
        _every_face(
            monkeypatch, f"postgresql+psycopg://mesa_pw@{base}", "wants a password", "~/.pgpass"
        )
        # The right password works, and a backup is the pg_dump command (without it).
        monkeypatch.setenv("MESA_TUI_DB", f"postgresql+psycopg://mesa_pw:right@{base}")
        assert runner.invoke(app, ["ls"]).exit_code == 0
        dump = runner.invoke(app, ["db", "backup", "store.dump"])
        assert dump.exit_code == 0, dump.output
        command = dump.stdout.strip().splitlines()[-1]
        assert command == f"pg_dump --format=custom --file store.dump postgresql://mesa_pw@{base}"
    finally:
        postgres_server.drop_database(name)


def _refused(url: str) -> bool:
    try:
        Store(url)
    except health.StoreAuthFailed:
        return True
    return False


def test_a_second_store_in_a_process_keeps_the_first_ones_sqlite_locks(tmp_path):
    """Opening and closing the store file with plain Python drops every POSIX lock the process's
    SQLite connections hold: the next process to close its connection then deletes the -wal file
    under the first Store, whose later writes vanish. The header check goes through SQLite."""
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "store.db"
    first = Store(f"sqlite:///{path}")
    first.submit([NewJob("count", {"n": 0}, "before")])
    Store(f"sqlite:///{path}").close()  # the cheap checks of a second Store in this process
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sqlite3; sqlite3.connect({str(path)!r}).execute('select count(*) from jobs').fetchall()",
        ],
        check=True,
    )
    first.submit([NewJob("count", {"n": 1}, "after")])
    seen = sqlite3.connect(path).execute("select count(*) from jobs").fetchone()[0]
    first.close()
    assert seen == 2
