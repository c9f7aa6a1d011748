"""``study export --format tensorboard`` and ``show JOB --format tensorboard`` (issue 28): the
events are read back with TensorBoard's own ``EventAccumulator`` and compared with the store:
every series point for point (attempts joined as the store joins them), each search's trigger
grids byte for byte, the spec as text; and the refusals (no tensorboard package, no -o, a
non-empty directory, an unknown job), each one line with exit 2 and nothing written."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mesa_tui.cli import app
from store.entities import NewJob
from store.repository import RunEvents
from tests.engine.report_study import BETAS, make_study

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')",
)

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def png(width: int, height: int, shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def study(tmp_path):
    """The finished cpu-mini study of the report tests (18 jobs), with a trigger grid per beta in
    every search artifact, as ``write_search_artifact`` leaves them."""
    store = make_study(tmp_path / "artifacts")
    for member in store.study_members("mini"):
        if member.kind == "mesa":
            directory = Path(store.job_detail(member.job_id).result["artifact"])
            for i, beta in enumerate(BETAS):
                (directory / f"beta={beta}" / "grid.png").write_bytes(png(40 + i, 30, 60 * i))
    yield store
    store.close()


def read_run(directory: Path):
    acc = event_accumulator.EventAccumulator(
        str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def text_of(acc, tag: str) -> str:
    (event,) = acc.Tensors(tag)
    return event.tensor_proto.string_val[0].decode()


def assert_series_equal(acc, store, job_id: int) -> int:
    """Every stored series of the job, point for point (values as float32, TensorBoard's)."""
    keys = store.metric_keys(job_id)
    assert set(acc.Tags()["scalars"]) == set(keys)
    points = 0
    for key in keys:
        stored = store.metric_series(job_id, key)
        read = acc.Scalars(key)
        assert [e.step for e in read] == [p.step for p in stored], key
        assert [e.value for e in read] == [float(np.float32(p.value)) for p in stored], key
        assert [e.wall_time for e in read] == pytest.approx([p.wall_time for p in stored])
        points += len(stored)
    return points


def test_study_export_writes_every_job_as_a_run_and_reads_back(study, tmp_path):
    out = tmp_path / "tb"
    done = invoke("study", "export", "mini", "--format", "tensorboard", "-o", out)
    assert done.exit_code == 0, done.output
    assert str(out) in done.stdout and "18 TensorBoard runs" in done.stdout

    members = study.study_members("mini")
    runs = sorted(p.name for p in out.iterdir())
    assert len(runs) == len(members) == 18
    for member in members:
        job = study.job(member.job_id)
        (run,) = [r for r in runs if r.startswith(f"{job.id}-{job.kind}-")]
        label = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", job.label).strip("-.")
        assert run == f"{job.id}-{job.kind}-{label}"
        acc = read_run(out / run)
        assert assert_series_equal(acc, study, job.id) > 0

        spec = text_of(acc, "spec")
        assert spec.startswith("```json\n") and spec.endswith("\n```")
        assert json.loads(spec.removeprefix("```json\n").removesuffix("\n```")) == job.spec
        summary = text_of(acc, "job")
        assert f"- kind: {job.kind}" in summary and "- status: succeeded" in summary

        images = acc.Tags()["images"]
        if member.kind != "mesa":
            assert images == []
            continue
        directory = Path(study.job_detail(job.id).result["artifact"])
        assert sorted(images) == sorted(f"trigger_grid/beta={b}" for b in BETAS)
        for i, beta in enumerate(BETAS):
            (image,) = acc.Images(f"trigger_grid/beta={beta}")
            assert (
                image.encoded_image_string == (directory / f"beta={beta}" / "grid.png").read_bytes()
            )
            assert (image.width, image.height) == (40 + i, 30)
            assert image.step == max(
                p.step for k in study.metric_keys(job.id) for p in study.metric_series(job.id, k)
            )


def test_a_job_with_two_attempts_exports_the_joined_series(tmp_path):
    """``show JOB --format tensorboard``: a job lost at step 9 and resumed from its checkpoint at
    step 6; the run holds attempt 1's steps 0..5 and attempt 2's 6..14, each step once."""
    from store.repository import Store

    store = Store()
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit(
        [NewJob("train", {"seed": 3, "epochs": 2}, "0" * 64, "bw:170 resumed", max_attempts=2)]
    )

    def attempt(steps, sign):
        (claimed,) = store.claim_jobs(
            engine.id, 1, host="here", executor="local", code_version="t",
            workdir_for=lambda k, i: str(tmp_path / f"{k}-{i}"), startup_grace_s=60,
        )  # fmt: skip
        events = RunEvents(claimed.run_id, job)
        events.metrics = [("train/loss", s, sign * (1.0 + s), time.time()) for s in steps]
        events.metrics += [("eval/acc_clean", s, 0.1 * s, time.time()) for s in steps if s % 5 == 0]
        store.record_events([events])
        return claimed.run_id

    store.mark_lost([attempt(range(0, 10), 1.0)], "missed its check-in")
    store.finish_run(attempt(range(6, 15), -1.0), "succeeded", result={"metrics": {}})

    out = tmp_path / "one"
    done = invoke("show", job, "--format", "tensorboard", "-o", out, "--json")
    assert done.exit_code == 0, done.output
    written = json.loads(done.stdout)
    (run,) = written["runs"]
    assert run["run"] == f"{job}-train-bw-170-resumed" and run["job"] == job
    assert [p.name for p in out.iterdir()] == [run["run"]]
    acc = read_run(out / run["run"])
    assert assert_series_equal(acc, store, job) == run["points"] == 15 + 3
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(15))
    assert [e.value for e in loss] == [1.0 + s for s in range(6)] + [
        -(1.0 + s) for s in range(6, 15)
    ]
    assert json.loads(text_of(acc, "spec").strip("`").removeprefix("json")) == {
        "seed": 3,
        "epochs": 2,
    }
    assert "- attempts: 2/2" in text_of(acc, "job")
    store.close()


def test_refusals_are_one_line_and_write_nothing(study, tmp_path):
    job = study.study_members("mini")[0].job_id
    one_line_error(invoke("study", "export", "mini", "--format", "tensorboard"), "-o DIR")
    one_line_error(invoke("show", job, "--format", "tensorboard"), "-o DIR")
    one_line_error(
        invoke("study", "export", "mini", "--format", "tb", "-o", tmp_path / "x"),
        "'tb'",
        "tensorboard",
    )
    one_line_error(invoke("show", job, "--format", "yaml"), "'yaml'", "tensorboard")
    one_line_error(invoke("show", job, "-o", tmp_path / "x"), "-o")
    one_line_error(invoke("show", 9999, "--format", "tensorboard", "-o", tmp_path / "x"), "9999")
    one_line_error(
        invoke("study", "export", "nope", "--format", "tensorboard", "-o", tmp_path / "x"), "nope"
    )
    assert not (tmp_path / "x").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    one_line_error(
        invoke("study", "export", "mini", "--format", "tensorboard", "-o", taken), "not empty"
    )
    one_line_error(invoke("show", job, "--format", "tensorboard", "-o", taken), "not empty")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert invoke("show", job, "--format", "tensorboard", "-o", empty).exit_code == 0
    # The other formats are as they were.
    assert json.loads(invoke("show", job, "--format", "json").stdout)["id"] == job
    assert invoke("study", "export", "mini").stdout.startswith("trigger,method,seed,job_id")


def test_without_the_tensorboard_package_the_export_names_the_extra(study, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    job = study.study_members("mini")[0].job_id
    for args in (
        ("study", "export", "mini", "--format", "tensorboard", "-o", tmp_path / "tb"),
        ("show", job, "--format", "tensorboard", "-o", tmp_path / "tb"),
        ("study", "export", "mini", "--format", "tensorboard"),
    ):
        one_line_error(invoke(*args), "pip install 'mesa-tui[tensorboard]'")
    assert not (tmp_path / "tb").exists()
    # csv and json need nothing extra.
    assert invoke("study", "export", "mini", "--format", "json").exit_code == 0
