"""The headless CLI of the store and engine: submit, ls, show, cancel, retry, rm, db, paths,
bad input (exit 2, one line, no row) and the schema upgrade."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from alembic import command
from typer.testing import CliRunner

from engine import paths
from mesa_tui.cli import app
from store.migrations import alembic_config
from store.repository import Store

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def jobs_in_store() -> int:
    return len(Store().list_jobs())


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "train", "--epochs", "abc"],
        ["submit", "train", "--bogus-setting", "1"],
        ["submit", "train", "--trigger", "bw:999"],
        ["submit", "train", "--target", "12"],
        ["submit", "mesa", "--model", "job:99"],
        ["submit", "defend", "--method", "magic", "--model", "/tmp/m"],
        ["submit", "pipeline", "--trigger", "bw:999"],
        ["submit", "pipeline", "--methods", "mesa,wishful"],
        ["submit", "pipeline", "--target", "sometimes"],
        ["submit", "pipeline", "--no-such-setting", "3"],
        ["submit", "pipeline", "--target", "12"],  # cifar10 has 10 classes
        ["submit", "pipeline", "--train-placement", "at:40,40"],  # off the 32x32 images
        ["submit", "train", "--placement", "at:30,2"],  # a 3x3 patch at row 30 leaves them
        ["study", "create", "s", "--template", "nope"],
        ["study", "create", "s", "--template", "cpu-mini", "--seeds", "x"],
    ],
)
def test_invalid_specs_exit_2_with_one_line_and_no_row(args):
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert jobs_in_store() == 0
    assert Store().studies() == []


@pytest.mark.parametrize(
    "args",
    [
        ["show", "99"],
        ["logs", "99"],
        ["metrics", "99", "--key", "eval/asr"],
        ["cancel", "99"],
        ["retry", "99"],
        ["rm", "99", "--yes"],
        ["tag", "99", "baseline"],
        ["note", "99", "text"],
        ["study", "show", "nope"],
    ],
)
def test_unknown_ids_exit_2(args):
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "does not exist" in result.stderr


def test_pipeline_jobs_ls_show_cancel_retry_rm():
    result = run(
        "submit", "pipeline", "--preset", "cpu-quick", "--trigger", "bw:170", "--target", "0",
        "--methods", "mesa,ideal", "--epochs", "1", "--steps", "20", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    train, mesa, defend_mesa, defend_ideal = json.loads(result.stdout)["jobs"]
    listed = json.loads(run("ls", "--json").stdout)["jobs"]
    assert [(j["id"], j["kind"], j["status"]) for j in listed] == [
        (train, "train", "queued"),
        (mesa, "mesa", "queued"),
        (defend_mesa, "defend", "queued"),
        (defend_ideal, "defend", "queued"),
    ]
    shown = json.loads(run("show", str(defend_mesa), "--json").stdout)
    assert shown["spec"]["model"] == f"job:{train}" and shown["spec"]["search"] == f"job:{mesa}"
    assert {d["job_id"] for d in shown["depends_on"]} == {train, mesa}
    assert shown["job"]["spec"]["epochs"] == 1 and "metrics" in shown
    assert json.loads(run("show", str(mesa), "--json").stdout)["spec"]["steps"] == 20
    text = run("show", str(defend_mesa)).stdout
    assert f"after: {train} (train, queued, model), {mesa} (mesa, queued, search)" in text
    assert f"job:{train}" in text and f"job:{mesa}" in text  # the spec table
    assert "spec hash:" in text and "run  attempt" not in text  # no attempt yet: no runs table

    assert run("cancel", str(train)).exit_code == 0
    statuses = {j["id"]: j for j in json.loads(run("ls", "--json").stdout)["jobs"]}
    assert {j["status"] for j in statuses.values()} == {"cancelled"}
    assert statuses[mesa]["error"] == f"upstream job {train} cancelled"
    assert (
        json.loads(run("ls", "--status", "cancelled", "--kind", "defend", "--json").stdout)["jobs"][
            0
        ]["id"]
        == defend_mesa
    )

    assert run("retry", str(train)).exit_code == 0
    assert {j["status"] for j in json.loads(run("ls", "--json").stdout)["jobs"]} == {"queued"}
    assert run("rm", str(train), "--yes").exit_code == 2  # queued: cancel first
    run("cancel", str(defend_ideal))
    result = run("rm", str(defend_ideal), "--yes", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["deleted"] == defend_ideal
    assert len(json.loads(run("ls", "--json").stdout)["jobs"]) == 3


def test_tag_and_note_then_ls_finds_them():
    from store.entities import NewJob

    a, b = Store().submit([NewJob("train", {}, "a", label="bw:1"), NewJob("train", {}, "b")])
    assert run("tag", str(a), "baseline", "paper").stdout == f"job {a} tags: baseline paper\n"
    assert run("tag", str(a), "paper", "--remove").stdout == f"job {a} tags: baseline\n"
    assert run("note", str(b), "odd loss spike at epoch 3").exit_code == 0
    found = json.loads(run("ls", "--find", "SPIKE", "--json").stdout)["jobs"]
    assert [(j["id"], j["note"]) for j in found] == [(b, "odd loss spike at epoch 3")]
    by_tag = json.loads(run("ls", "--find", "basel", "--json").stdout)["jobs"]
    assert [j["id"] for j in by_tag] == [a]
    assert "#baseline" in run("ls").stdout
    assert "note: odd loss spike" in run("show", str(b)).stdout
    bad = run("tag", str(a), "two words")
    assert bad.exit_code == 2 and "'two words' is not one word" in bad.stderr
    assert run("note", str(b), "").stdout == f"job {b} note cleared\n"


def test_older_schema_gives_the_upgrade_message_then_db_upgrade_works():
    url = paths.default_db_url()
    paths.data_home().mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "0001")
    result = run("ls")
    assert result.exit_code == 2
    assert "run `mesa-tui db upgrade`" in result.stderr
    upgraded = run("db", "upgrade")
    assert upgraded.exit_code == 0 and "upgraded from schema 0001" in upgraded.stdout
    assert run("ls", "--json").exit_code == 0
    assert "already at schema" in run("db", "upgrade").stdout


def test_paths_and_study_create_show_export(tmp_path):
    where = json.loads(run("paths", "--json").stdout)
    assert where["store"].startswith("sqlite:///") and where["artifacts"].endswith("artifacts")
    assert where["app_config"] == os.path.join(os.environ["MESA_TUI_HOME"], "config", "app.toml")
    result = run("study", "create", "mini", "--template", "cpu-mini", "--json")
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert created["study"] == "mini" and len(created["jobs"]) > 10
    assert run("study", "create", "mini", "--template", "cpu-mini").exit_code == 2
    shown = json.loads(run("study", "show", "mini", "--json").stdout)
    assert shown["study"]["job_count"] == len(created["jobs"])
    assert "before repair" in {r["method"] for r in shown["rows"]}
    assert shown["statistics"] is None  # no repair has finished, so no outcomes to read
    assert any("stamping rate" in n for n in shown["protocol_notes"])
    out = tmp_path / "mini.csv"
    assert run("study", "export", "mini", "--format", "csv", "--output", str(out)).exit_code == 0
    assert out.read_text().splitlines()[0] == "trigger,method,seed,job_id,status,asr,acc_clean,ra"
    assert (
        json.loads(run("study", "export", "mini", "--format", "json").stdout)["study"]["name"]
        == "mini"
    )
    assert run("study", "export", "mini", "--format", "xml").exit_code == 2
    ls = json.loads(run("ls", "--study", "mini", "--kind", "detect", "--json").stdout)["jobs"]
    assert len(ls) == 3


def test_study_create_paper_small_template():
    """The CPU protocol's template from the command line: every trigger, a subset, the stamping
    rate, and the point restarts' reversal reused through a dependency on the first one."""
    result = run("study", "create", "small", "--template", "paper-cifar10-bw-small", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["jobs"]) == 1 + 51 * 8
    args = ["--template", "paper-cifar10-bw-small", "--triggers", "pilot", "--stamp-rate", "0.1"]
    created = json.loads(run("study", "create", "pilot", *args, "--json").stdout)
    assert len(created["jobs"]) == 1 + 3 * 8
    shown = json.loads(run("study", "show", "pilot", "--json").stdout)
    params = shown["study"]["params"]
    assert params["triggers"] == ["bw:0", "bw:85", "bw:170"] and params["target_mode"] == "oracle"
    assert params["overrides"] == {"stamp_rate": 0.1}
    assert [r["method"] for r in shown["rows"]] == ["before repair", "mesa", "point", "ideal",
                                                    "finetune"]  # fmt: skip
    store = Store()
    points = [j for j in store.list_jobs(study="pilot", kind="defend") if "point" in j.label]
    assert len(points) == 9
    for job in points:
        detail = store.job_detail(job.id)
        spec = detail.job.spec
        assert spec["stamp_rate"] == 0.1
        reused = [d.job_id for d in detail.depends_on if d.input_field == "reversal_from"]
        if spec["point_index"] == 0:
            assert reused == [] and spec["reversal_from"] is None
        else:
            first = store.job_detail(reused[0]).job.spec
            assert first["point_index"] == 0 and first["model"] == spec["model"]
            assert spec["reversal_from"] == f"job:{reused[0]}"
    for bad in (["--target", "auto"], ["--mesa-steps", "5"], ["--triggers", "bw:4"]):
        failed = run("study", "create", "bad", "--template", "paper-cifar10-bw-small", *bad)
        assert failed.exit_code == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert "bad" not in {s.name for s in store.studies()}


def test_study_show_statistics(tmp_path):
    """`study show --json` carries the study's statistics (the same function's table), and the
    plain table puts each method's interval beside its mean ASR, with the paired tests below."""
    from engine.report.study_stats import study_statistics
    from tests.report.small_study import make_small_study

    store, _ = make_small_study(tmp_path / "artifacts")
    shown = json.loads(run("study", "show", "small", "--json").stdout)
    assert shown["statistics"] == study_statistics(store, "small")
    assert shown["statistics"]["methods"]["point"]["worst_restart"]["asr"] > 0
    text = run("study", "show", "small").stdout
    for method in ("mesa", "point", "ideal", "finetune"):
        mean = shown["statistics"]["methods"][method]["asr_mean"]
        interval = f"{100 * mean['mean']:.1f}% [{100 * mean['lo']:.1f}, {100 * mean['hi']:.1f}]"
        assert interval in text, (interval, text)
    flat = " ".join(text.split())  # the console wraps long lines at its width
    assert "outcomes of 4 triggers; not implanted, left out: bw:1" in flat
    test = shown["statistics"]["wilcoxon"]["finetune"]
    row = [line.split() for line in text.splitlines() if line.startswith("finetune ")][-1]
    assert row[1:4] == [str(test["n"]), str(test["lower"]), str(test["higher"])]
    assert row[4] == f"{100 * test['mean_diff']:.1f}" and row[-1] == f"{test['p']:.2g}"


def test_help_does_not_import_the_store_or_torch():
    code = (
        "import sys; import mesa_tui.cli; "
        "print(sorted(m for m in ('sqlalchemy', 'torch', 'textual', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wait_prints_results_and_exits_1_on_failure():
    train, *_ = json.loads(
        run("submit", "pipeline", "--target", "0", "--methods", "ideal", "--json").stdout
    )["jobs"]
    run("cancel", str(train))
    result = run("wait", str(train), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["jobs"][0]["status"] == "cancelled"
    store = Store()
    engine = store.register_engine("here", 1, "test", 1)
    store.retry(train)
    (claimed,) = store.claim_jobs(
        engine.id, 1, host="here", executor="local", code_version="t",
        workdir_for=lambda k, i: f"/tmp/{k}-{i}", startup_grace_s=60,
    )  # fmt: skip
    store.finish_run(claimed.run_id, "failed", error="boom")
    failed = run("wait", str(train))
    assert failed.exit_code == 1 and "failed" in failed.stdout


def test_logs_label_every_line_with_its_attempt_and_keep_a_lost_attempts_lines():
    from store.repository import RunEvents

    store = Store()
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = json.loads(run("submit", "train", "--epochs", "1", "--json").stdout)["jobs"]

    def attempt(message: str) -> int:
        (claimed,) = store.claim_jobs(
            engine.id, 1, host="here", executor="local", code_version="t",
            workdir_for=lambda k, i: f"/tmp/{k}-{i}", startup_grace_s=60,
        )  # fmt: skip
        events = RunEvents(claimed.run_id, job)
        events.logs = [("info", message, 1000.0 + claimed.attempt)]
        store.record_events([events])
        return claimed.run_id

    store.mark_lost([attempt("epoch 1 of the first attempt")], "its engine died")
    store.finish_run(attempt("resumed from the checkpoint"), "succeeded")
    lines = run("logs", str(job)).stdout.splitlines()
    assert lines == [
        "[attempt 1] 00:16:41 info    epoch 1 of the first attempt",
        "[attempt 2] 00:16:42 info    resumed from the checkpoint",
    ]


def test_follow_prints_a_line_per_change_where_output_is_not_a_terminal(capsys):
    """``submit --follow`` / ``wait`` under nohup or a pipe: lines at each status change and tenth
    of a stage, then the results table once (the live table would print nothing until the end)."""
    from types import SimpleNamespace as NS

    from mesa_tui.commands.jobs import follow_jobs

    def job(status, done=None, latest=None):
        progress = NS(stage="train", done=done, total=200) if done is not None else None
        return NS(id=7, kind="train", label="attack bw:170 -> 0", status=status,
                  progress=progress, latest=latest or {})  # fmt: skip

    snapshots = iter(
        [
            [job("queued")],
            [job("queued")],  # no change: no line
            [job("running", 1)],
            [job("running", 15)],  # still the first tenth
            [job("running", 41)],
            [job("succeeded", latest={"eval/acc_clean": 0.8509, "eval/asr": 0.9999})],
        ]
    )
    store = NS(list_jobs=lambda: next(snapshots))
    jobs = follow_jobs(store, [7], poll_s=0)
    assert [j.status for j in jobs] == ["succeeded"]
    lines = capsys.readouterr().out.splitlines()
    events = [line.split("  ", 1)[1] for line in lines if "  job 7  " in line]
    assert events == [
        "job 7  train  attack bw:170 -> 0  queued",
        "job 7  train  attack bw:170 -> 0  running  train 0%",
        "job 7  train  attack bw:170 -> 0  running  train 20%",
        "job 7  train  attack bw:170 -> 0  succeeded  acc 0.8509  asr 0.9999",
    ]
    table = lines[len(events) :]
    assert table[0].split() == ["id", "kind", "label", "status", "progress", "acc", "asr", "ra"]
    assert "succeeded" in table[1] and "0.8509" in table[1]


def test_submit_pipeline_placement_corner_goes_to_the_attack():
    result = run(
        "submit", "pipeline", "--placement", "corner", "--methods", "mesa", "--target", "0"
    )
    assert result.exit_code == 0, result.output
    assert "--placement corner applies to the train stage only" in result.stdout
    train, mesa, defend = (
        Store().job(j["id"]) for j in json.loads(run("ls", "--json").stdout)["jobs"]
    )
    assert train.spec["placement"] == "corner"
    # The search keeps its own default (learned: the position scan, then pi); the repair's
    # placements are its own too.
    assert mesa.spec["placement"] == "learned" and defend.spec["placement"] == "per-image"
