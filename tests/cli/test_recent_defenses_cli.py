"""The four recent defenses from the command line: a pipeline queues one repair per method with
the method's own defaults, `submit defend` takes each with its settings, and a setting out of
its paper's range is refused in one line before any job is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mesa_tui.cli import app
from store.repository import Store

runner = CliRunner()
RECENT = ("anp", "i-bau", "clp", "ft-sam")


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def queued() -> list:
    return [Store().job(j["id"]) for j in json.loads(run("ls", "--json").stdout)["jobs"]]


def test_a_pipeline_queues_one_repair_per_recent_defense_without_a_search():
    result = run("submit", "pipeline", "--methods", ",".join(RECENT), "--target", "0")
    assert result.exit_code == 0, result.output
    jobs = queued()
    kinds = sorted(job.kind for job in jobs)
    # None of the four reads a trigger distribution: no MESA search is queued for them.
    assert kinds == ["defend"] * 4 + ["train"], kinds
    defends = {job.spec["method"]: job.spec for job in jobs if job.kind == "defend"}
    assert set(defends) == set(RECENT)
    # Each repairs the attack's model and none is told the target (none of the four uses it).
    train = next(job for job in jobs if job.kind == "train")
    for spec in defends.values():
        assert spec["model"] == f"job:{train.id}" and spec["search"] is None
        assert spec["target"] is None


@pytest.mark.parametrize(
    ("method", "setting", "value"),
    [
        ("anp", "anp-eps", "0.2"),
        ("i-bau", "ibau-rounds", "3"),
        ("clp", "clp-u", "2.5"),
        ("ft-sam", "sam-rho", "1.5"),
    ],
)
def test_submit_defend_takes_each_recent_method_and_its_own_setting(method, setting, value):
    result = run(
        "submit", "defend", "--method", method, "--model", "/tmp/m", "--target", "0",
        f"--{setting}", value,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (job,) = queued()
    assert job.spec["method"] == method
    assert job.spec[setting.replace("-", "_")] == pytest.approx(float(value))


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "ft-sam", "--sam-rho", "-1"],
        ["--method", "i-bau", "--ibau-portion", "2"],
        ["--method", "anp", "--anp-threshold", "2"],
        ["--method", "clp", "--clp-u", "-1"],
    ],
)
def test_a_recent_defense_setting_out_of_range_is_refused_in_one_line(args):
    result = run("submit", "defend", "--model", "/tmp/m", "--target", "0", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and args[2] in lines[0], lines
    assert Store().list_jobs() == []
