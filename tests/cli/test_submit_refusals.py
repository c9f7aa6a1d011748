"""Input that `submit` and `study create` used to queue (or report wrongly): each is refused with
one line naming the value given and the fix, exit 2, and nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mesa_tui.cli import app
from store.repository import Store

runner = CliRunner()


def refused(*args: str) -> str:
    """The one error line of a refused command, after checking that nothing was written."""
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    store = Store()
    assert store.list_jobs() == [] and store.studies() == []
    return lines[0]


PIPELINE = ["submit", "pipeline", "--target", "0"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--preset", "nope"], ["preset 'nope' is unknown for a pipeline", "cpu-quick"]),
        (["--methods", ","], ["--methods ','", "no method named", "leave --methods out"]),
        (["--methods", " "], ["--methods ' '", "no method named"]),
        (["--methods", ""], ["--methods ''", "no method named"]),
        (["--methods", "mesa,mesa-ensemble"], ["mesa-ensemble is the same repair as mesa"]),
        (["--methods", "mesa-0.9,mesa-0.90"], ["mesa-0.90 is the same repair as mesa-0.9"]),
        (["--methods", "point,point"], ["point is named twice"]),
        (["--method", "anp"], ["--method is set per defend job by --methods", "--methods anp"]),
        (["--methods", "anp", "--defend-method", "clp"], ["--defend-method", "--methods clp"]),
        (["--methods", "mesa", "--beta", "0.5"], ["--beta", "--methods mesa-0.5"]),
        (["--methods", "mesa", "--anp-iterations", "5"], ["--anp-iterations applies to anp"]),
        (["--methods", "mesa,point", "--defend-sam-rho", "3"], ["--defend-sam-rho", "methods"]),
        (["--train-target", "5", "--methods", "point"], ["--train-target 5 and --target 0"]),
        (["--mesa-target", "5"], ["--mesa-target is set by the pipeline's --target"]),
        (["--train-placement", "random"], ["invalid --train-placement 'random': use per-image"]),
        (["--mesa-betas", "0.5,x"], ["invalid --mesa-betas item 'x'"]),
        (["--methods", "mesa-0.3"], ["beta 0.3 is not among the search's betas 0.9,0.8,0.5"]),
        (["--methods", "mesa-0.9", "--mesa-betas", "0.5,0.7"], ["betas 0.5,0.7", "--mesa-betas"]),
    ],
)
def test_pipeline_refusals(args, fragments):
    line = refused(*PIPELINE, *args)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-t", "defense-bar", "--rates", "0.1,0.10"], ["--rates 0.1,0.1", "named twice"]),
        (["-t", "defense-bar", "--rates", "0.1", "--headline-rate", "0.01"], ["not among"]),
        (["-t", "defense-bar", "--residual-methods", ","], ["give e.g. mesa,point"]),
        (["-t", "cpu-mini", "--target", "oracle", "--train-target", "4"], ["leave --train-target"]),
        (["-t", "defense-bar", "--train-target", "3"], ["attacks class 0"]),
        (["-t", "cpu-mini", "--methods", "anp,clp"], ["cpu-mini fixes its methods; --methods is"]),
        (["-t", "cpu-mini", "--preset", "x"], ["--preset is taken by submit pipeline"]),
        (["-t", "cpu-mini", "--rates", "0.1"], ["--rates is taken by defense-bar"]),
        (["-t", "cpu-mini", "--triggers", ","], ["--triggers ',': no trigger named"]),
        (["-t", "cpu-mini", "--triggers", "bw:1"], ["bw:1 is not among cpu-mini's 3 triggers"]),
        (["-t", "cpu-mini", "--anp-iterations", "5"], ["applies to anp; no anp job here"]),
        (["-t", "defense-bar", "--methods", "mesa", "--nc-epochs", "3"], ["--nc-epochs"]),
    ],
)
def test_study_refusals(args, fragments):
    line = refused("study", "create", "s", *args)
    for fragment in fragments:
        assert fragment in line, line


def test_a_defend_job_refuses_the_settings_of_other_methods(tmp_path):
    args = ["submit", "defend", "--model", str(tmp_path), "--method", "clp"]
    line = refused(*args, "--anp-iterations", "5", "--sam-rho", "3")
    assert "--anp-iterations applies to anp; no anp job here (method clp)" in line
    assert "--clp-u" in refused("run", "defend", "--method", "anp", "--clp-u", "2", "--model", "m")
    result = runner.invoke(app, [*args, "--clp-u", "2.5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_digits_that_int_refuses_are_refused_in_one_line():
    assert "invalid --target '²'" in refused("submit", "pipeline", "--target", "²")
    assert "--device 'cuda:²'" in refused("submit", "train", "--device", "cuda:²")


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", "a\tb", "a\nb"])
def test_study_names_blank_or_with_a_separator_or_control_character_are_refused(name):
    line = refused("study", "create", name, "-t", "cpu-mini")
    assert f"invalid study name {name!r}" in line


def test_a_bad_value_is_named_once():
    line = refused("submit", "pipeline", "--train-placement", "random")
    assert line.count("random") == 1, line


def test_a_trigger_file_training_cannot_use_is_refused_at_submit(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(9, np.float32))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "folder").mkdir()
    cases = {"wide.npy": "shape (3, 4)", "flat.npy": "shape (9,)", "junk.png": "not an image",
             "folder": "not a file"}  # fmt: skip
    for name, reason in cases.items():
        line = refused("submit", "pipeline", "--trigger", f"file:{tmp_path / name}")
        assert f"trigger file {tmp_path / name}" in line and reason in line, line


def test_a_relative_trigger_file_is_stored_with_its_absolute_path(tmp_path, monkeypatch):
    np.save(tmp_path / "t.npy", np.ones((3, 3), np.float32))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["submit", "train", "--trigger", "file:t.npy"])
    assert result.exit_code == 0, result.output
    (job,) = Store().list_jobs()
    assert Store().job(job.id).spec["trigger"] == f"file:{tmp_path / 't.npy'}"


def test_run_refuses_a_job_reference_and_points_to_submit():
    line = refused("run", "defend", "--method", "anp", "--model", "job:1")
    assert "--model job:1: run takes artifact directories, not job references" in line
    assert "mesa-tui submit defend" in line and "mesa-tui show 1" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--method", "mesa"], "--method mesa needs --search"),
        (["--method", "point", "--search", "job:1"], "--search is only used by --method mesa"),
        (["--method", "point", "--point-restarts", "2", "--point-index", "2"], "--point-index 2"),
        (["--method", "finetune", "--reversal-from", "job:1"], "--reversal-from is only used"),
    ],
)
def test_submit_defend_refuses_what_the_task_would_before_upstream_runs(args, fragment):
    assert fragment in refused("submit", "defend", "--model", "job:1", *args)
