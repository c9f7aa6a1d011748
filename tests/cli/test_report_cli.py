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


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("notes.txt/sub", "'{tmp}/notes.txt' is a file, not a folder; give another path"),
        ("notes.txt/a/b", "'{tmp}/notes.txt' is a file, not a folder; give another path"),
        ("/proc/report", "'/proc/report' cannot be made (No such file or directory)"),
    ],
)
def test_an_out_that_cannot_be_made_is_one_line_and_leaves_nothing(study, tmp_path, out, message):
    (tmp_path / "notes.txt").write_text("keep me")
    before = sorted(tmp_path.iterdir())
    done = run("report", "mini", "--out", out if out.startswith("/") else str(tmp_path / out))
    assert done.exit_code == 2, done.output
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --out '") and message.format(tmp=tmp_path) in line
    assert sorted(tmp_path.iterdir()) == before and not Path("/proc/report").exists()


def test_a_report_that_fails_removes_the_folders_made_for_it(tmp_path):
    """A damaged record is found after --out's folders are made: they go with the report."""
    from tests.engine.test_paper_report import record

    folder = tmp_path / "results"
    (folder / "rate-0.01").mkdir(parents=True)
    (folder / "rate-0.01" / "bw-0.json").write_text(json.dumps(record("bw:0", 40, 2, (4, 6, 8))))
    (folder / "rate-0.01" / "bw-1.json").write_text("[1]")
    done = run("report", str(folder), "--out", str(tmp_path / "new" / "deep" / "out"))
    assert done.exit_code == 2 and "bw-1.json is not a study record" in done.stderr
    assert not (tmp_path / "new").exists()


def test_a_queued_job_is_refused_a_running_one_says_so_and_a_failed_one_how_it_ended(tmp_path):
    from engine import paths
    from store.repository import Store

    (train, _) = json.loads(
        run("submit", "pipeline", "--target", "0", "--methods", "ideal", "--json").stdout
    )["jobs"]
    store = Store()
    for out in (["--out", str(tmp_path / "out")], []):  # --out, or the default folder
        done = run("report", str(train), *out)
        assert done.exit_code == 2, done.output
        assert done.stderr.strip().splitlines() == [
            f"error: job {train} is queued and has no results yet; wait for it "
            f"(`mesa-tui wait {train}`) and report it then"
        ]
        assert not (tmp_path / "out").exists() and not (paths.data_home() / "reports").exists()
    engine = store.register_engine("here", 1, "test", 1)
    (claimed,) = store.claim_jobs(
        engine.id, 1, host="here", executor="local", code_version="t",
        workdir_for=lambda k, i: str(tmp_path / f"{k}-{i}"), startup_grace_s=60,
    )  # fmt: skip
    done = run("report", str(train), "--out", str(tmp_path / "live"))
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().endswith(
        f"job {train} is running: the report holds its results so far"
    )
    store.finish_run(claimed.run_id, "failed", error="boom at epoch 3")
    done = run("report", str(train), "--out", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().endswith(f"tables); job {train} failed: boom at epoch 3")
    assert "Status **failed** (boom at epoch 3)" in (tmp_path / "out" / "report.md").read_text()
    store.close()
