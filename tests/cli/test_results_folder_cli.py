"""A paper-study result folder with a damaged file: `study show`, `report` and the app's
`--results` each refuse it in one line naming the file and what is wrong (exit 2, nothing
written), never with a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.engine.test_paper_report import bits, record

runner = CliRunner()


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """Two triggers at rate 0.01 and the pilot's decision; the app never opens (a start check
    that lets a damaged folder through then exits 0 instead of 2)."""
    monkeypatch.setattr("mesa_tui.app.run_app", lambda **_: 0)
    root = tmp_path / "results"
    (root / "rate-0.01").mkdir(parents=True)
    for r in (record("bw:0", 40, 2, (4, 6, 8)), record("bw:85", 39, 3, (20, 10, 12))):
        (root / "rate-0.01" / f"{r['trigger'].replace(':', '-')}.json").write_text(json.dumps(r))
    (root / "rate.json").write_text(json.dumps({"rate": 0.01}))
    return root


def refusals(folder: Path, out: Path) -> dict[str, str]:
    """Each face's one stderr line for the folder, after checking exit 2 and nothing written."""
    from mesa_tui.cli import app

    lines = {}
    for face, args in {
        "show": ["study", "show", str(folder)],
        "report": ["report", str(folder), "--out", str(out)],
        "app": ["--results", str(folder)],
    }.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (face, result.output, result.exception)
        (lines[face],) = result.stderr.strip().splitlines()
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return lines


def complete(**fields) -> str:
    return json.dumps({**record("bw:0", 40, 2, (4, 6, 8)), **fields})


def without(key: str) -> str:
    data = record("bw:0", 40, 2, (4, 6, 8))
    del data[key]
    return json.dumps(data)


def unpaired() -> str:
    data = record("bw:0", 40, 2, (4, 6, 8))
    data["repairs"]["mesa"]["asr_outcomes"] = bits(2, 39)  # one image fewer than the rest
    return json.dumps(data)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[1,2]", "is not a study record: it holds a list, not an object"),
        ("null", "is not a study record: it holds null, not an object"),
        ('{"schema": 1}', "is not a study record: no 'rate'"),
        ('{"schema": 1, "rate": "abc"}', "'rate' is \"abc\", not a stamping rate in (0, 1]"),
        ('{"schema": 1, "rate": 0.1, "trigger": "bw:0"}', "no 'attack.held_out_asr'"),
        (without("repairs"), "is not a study record: no 'repairs'"),
        (complete(repairs={"mesa": [1]}), "'repairs.mesa' holds a list, not an object"),
        (complete(runs=[{"machine": {}}]), "runs[0]: no 'seconds.wall'"),
        (without("floor"), "trigger bw:0: missing 'floor'"),
        (unpaired(), "repairs are paired on the same images, yet mesa 39 where the others"),
        ("{", "is not valid JSON"),
    ],
    ids=[
        "list",
        "null",
        "no-rate",
        "text-rate",
        "no-attack",
        "no-repairs",
        "repair-list",
        "run-no-seconds",
        "no-floor",
        "unpaired",
        "invalid-json",
    ],
)
def test_a_damaged_record_is_one_line_naming_it(folder, tmp_path, content, problem):
    path = folder / "rate-0.01" / "bw-0.json"
    path.write_text(content)
    for face, line in refusals(folder, tmp_path / "out").items():
        assert line.startswith("error: ") and str(path) in line and problem in line, face
        assert line.endswith(("restore it or remove it", "restore or remove it")), face


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "rate.json is not valid JSON"),
        ('{"decided": 1}', "rate.json is not a rate decision: no 'rate'"),
        ('{"rate": 3}', "'rate' is 3, not a stamping rate in (0, 1]"),
    ],
)
def test_a_damaged_rate_decision_is_one_line_naming_it(folder, tmp_path, content, problem):
    (folder / "rate.json").write_text(content)
    for face, line in refusals(folder, tmp_path / "out").items():
        assert str(folder / "rate.json") in line and problem in line, face


def test_a_trigger_recorded_twice_at_one_rate_is_refused(folder, tmp_path):
    copy = folder / "rate-0.01" / "bw-0 (copy).json"
    copy.write_text((folder / "rate-0.01" / "bw-0.json").read_text())
    for line in refusals(folder, tmp_path / "out").values():
        assert f"{copy} and {copy.parent / 'bw-0.json'} both hold trigger bw:0 at rate 0.01" in line


STUDY = "a study name (`mesa-tui study list`)"
OR_FOLDER = " or a folder that benchmarks/paper_study.py wrote"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["study", "show", "{file}"], f"study show: '{{file}}' is a file; give {STUDY}{OR_FOLDER}"),
        (
            ["study", "show", "{missing}"],
            f"study show: '{{missing}}' does not exist, as a folder or as a name; give {STUDY}"
            + OR_FOLDER,
        ),
        (["study", "show", "no-such-study"], "study 'no-such-study' does not exist; see `mesa-tui "
         "study list`"),
        (["study", "export", "{file}"], f"study export: '{{file}}' is a file; give {STUDY}"),
        (
            ["study", "export", "{folder}"],
            "study export: '{folder}' is a result folder, and export reads the store's studies; "
            "show it with `mesa-tui study show {folder}` (--json: its numbers) or write its report "
            "with `mesa-tui report {folder}`",
        ),
        (
            ["report", "{file}", "--out", "{out}"],
            "report: '{file}' is a file; give a study name, a job id" + OR_FOLDER,
        ),
    ],
)  # fmt: skip
def test_a_path_that_is_no_study_says_what_the_path_is(folder, tmp_path, args, line):
    """Not "study '...' does not exist" for a file, a missing folder or a result folder."""
    from mesa_tui.cli import app

    (tmp_path / "notes.txt").write_text("a file")
    paths = {"file": tmp_path / "notes.txt", "missing": tmp_path / "gone" / "dir"}
    paths |= {"folder": folder, "out": tmp_path / "out"}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == ["error: " + line.format(**paths)]
    assert not (tmp_path / "out").exists()
