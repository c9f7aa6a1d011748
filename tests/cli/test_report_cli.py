"""``mesa-tui report``: --json output, tables equal to ``study show --json``, bad input (exit 2,
one line naming the value and the fix, nothing written)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.report.build import CELL_COLUMNS, SUMMARY_COLUMNS
from mesa_tui.cli import app
from tests.engine.report_study import make_study

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def study(tmp_path):
    store = make_study(tmp_path / "artifacts")
    yield store
    store.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def same(text: str, value) -> bool:
    """A CSV cell against the JSON value: empty for null, numbers compared as numbers."""
    if value is None:
        return text == ""
    if isinstance(value, bool | str):
        return text == str(value)
    if isinstance(value, int | float):
        return float(text) == float(value)
    return False


def test_report_json_and_tables_equal_study_show(study, tmp_path):
    out = tmp_path / "rep"
    done = run("report", "mini", "--out", str(out), "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert set(data) == {"report", "figures", "tables"}
    assert data["report"] == str(out / "report.md") and Path(data["report"]).is_file()
    assert all(Path(p).is_file() for p in data["figures"] + data["tables"])

    shown = json.loads(run("study", "show", "mini", "--json").stdout)
    summary = read_csv(out / "tables" / "summary.csv")
    assert [r["method"] for r in summary] == [r["method"] for r in shown["rows"]]
    for ours, theirs in zip(summary, shown["rows"], strict=True):
        for column in SUMMARY_COLUMNS:
            assert same(ours[column], theirs[column]), (ours["method"], column)
    cells = read_csv(out / "tables" / "cells.csv")
    assert len(cells) == len(shown["cells"]) == 15
    for ours, theirs in zip(cells, shown["cells"], strict=True):
        for column in CELL_COLUMNS:
            assert same(ours[column], theirs[column]), (ours["job_id"], column)


def test_report_of_a_job_and_the_default_directory(study):
    from engine import paths

    job = next(m.job_id for m in study.study_members("mini") if m.kind == "mesa")
    done = run("report", str(job))
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(f"wrote {paths.data_home() / 'reports'}/job-{job}-")
    assert "figures" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "'nope' is neither a study nor a job id; see `mesa-tui study list`"),
        (["999"], "'999' is neither a study nor a job id"),
        (["mini", "--gpu-results", "missing.json"], "--gpu-results 'missing.json' does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(study, tmp_path, args, message):
    out = tmp_path / "out"
    done = run("report", *args, "--out", str(out))
    assert done.exit_code == 2, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_non_empty_directory_needs_force(study, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = run("report", "mini", "--out", str(out))
    assert done.exit_code == 2
    assert "is not empty; give a new directory or pass --force" in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    train = next(m.job_id for m in study.study_members("mini") if m.kind == "train")
    done = run("report", str(train), "--out", str(out), "--force", "--json")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.md", "tables"]
