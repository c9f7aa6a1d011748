"""A damaged or unusable store answers in one line naming the file, what is wrong and what to do,
with exit code 2, from every face: ``ls``, ``submit``, ``engine start`` (nothing written, no
engine), the app (a screen with the same words, then exit code 2) and ``db check``."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mesa_tui.cli import app
from tests.cli.test_run_cli import assert_one_line_error
from tests.damaged import CASES, index_damage, released, snapshot
from tests.engine.helpers import ROOT, engine_env

runner = CliRunner()

COMMANDS = {
    "ls": ["ls"],
    "submit": ["submit", "train", "--epochs", "1"],
    "engine start": ["engine", "start", "--detach", "--cpu-slots", "1"],
    "engine start (foreground)": ["engine", "start", "--cpu-slots", "1"],
    "db check": ["db", "check"],
}
# A backup only reads: it works where writing is refused, and for a newer schema.
BACKUP_WORKS = {"newer-schema", "unwritable-directory", "read-only-file"}


@pytest.fixture
def damaged(request, tmp_path, isolated_home, monkeypatch):
    """The case's store at tmp_path/store/mesa.db as MESA_TUI_DB; returns (words, where)."""
    path = tmp_path / "store" / "mesa.db"
    with released():
        words = CASES[request.param](path)
        monkeypatch.setenv("MESA_TUI_DB", f"sqlite:///{path}")
        monkeypatch.chdir(tmp_path)
        yield words, tmp_path


async def _app_shows(words: list[str]) -> tuple[str, int | None]:
    from mesa_tui.app import app_for_store
    from mesa_tui.screens.store_error import StoreErrorApp

    shown = app_for_store()
    assert isinstance(shown, StoreErrorApp), "the app opened a damaged store"
    async with shown.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        text = str(shown.query_one("#message").render())
        await pilot.press("x")  # any key leaves
        await pilot.pause()
    return text, shown.return_code


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_every_face_refuses_a_damaged_store_in_one_line(damaged, isolated_home, request):
    words, where = damaged
    before = snapshot(where)
    lines = {}
    for name, args in COMMANDS.items():
        result = runner.invoke(app, args)
        lines[name] = assert_one_line_error(result, *words)
        assert snapshot(where) == before, f"{name} wrote something"
    assert len(set(lines.values())) == 1, lines  # the same words from every command
    assert not (isolated_home / "data" / "logs").exists()  # no engine log: nothing started
    text, code = asyncio.run(_app_shows(words))
    assert text == lines["ls"] and code == 2
    assert snapshot(where) == before
    backup = runner.invoke(app, ["db", "backup", str(where / "backup.db")])
    if request.node.callspec.id in BACKUP_WORKS:
        assert backup.exit_code == 0, backup.output
        assert (where / "backup.db").exists()
    else:
        assert_one_line_error(backup, *words)
        assert snapshot(where) == before


def test_the_entry_points_answer_in_one_line_too(tmp_path):
    """``mesa-tui ls`` and ``python -m engine.daemon`` as a person runs them: no traceback."""
    from tests.damaged import header_then_garbage

    path = tmp_path / "mesa.db"
    words = header_then_garbage(path)
    env = engine_env(MESA_TUI_DB=f"sqlite:///{path}")
    for command in (
        [sys.executable, "-m", "mesa_tui.cli", "ls"],
        [sys.executable, "-m", "engine.daemon", "--cpu-slots", "1"],
    ):
        out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: ") and all(w in line for w in words), line


def test_damage_that_reads_do_not_meet_stops_the_engine_and_db_check(tmp_path, monkeypatch):
    """An index that disagrees with its table: ``ls`` still lists (it reads the rows; the full
    check reads the whole file, too slow for every command), but ``engine start`` and ``db check``
    run ``PRAGMA integrity_check`` and refuse, naming the fix (REINDEX)."""
    path = tmp_path / "mesa.db"
    words = index_damage(path)
    monkeypatch.setenv("MESA_TUI_DB", f"sqlite:///{path}")
    assert runner.invoke(app, ["ls"]).exit_code == 0
    before = snapshot(tmp_path)
    for args in (COMMANDS["engine start"], COMMANDS["engine start (foreground)"]):
        assert_one_line_error(runner.invoke(app, args), *words)
    assert snapshot(tmp_path) == before
    checked = runner.invoke(app, ["db", "check"])
    assert_one_line_error(checked, *words)
    assert "row 1 missing from index ix_jobs_updated_at" in checked.stdout
    # The REINDEX the line names repairs it.
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("REINDEX")
    conn.close()
    checked = runner.invoke(app, ["db", "check", "--json"])
    assert checked.exit_code == 0, checked.output
    assert '"integrity": "ok"' in checked.stdout
