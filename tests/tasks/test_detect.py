"""Target-class detection: the flagging rule, the task on a backdoored and a clean model, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.tasks.detect import flag_classes, robust_z
from tests.tasks.test_mesa_task import make_model, one_thread, synth_dataset  # noqa: F401

# Short and quick: tiny generators with a larger learning rate find the backdoor in 150 steps.
FAST = dict(
    steps=150,
    batch_size=32,
    hidden=64,
    lr_g=1e-3,
    lr_t=1e-3,
    n_eval_triggers=32,
    eval_images=64,
    device="cpu",
    precision="fp32",
)


def detect_spec(model: Path, **overrides):
    from engine.specs import build_spec

    return build_spec("detect", overrides={"model": str(model), **FAST, **overrides})


def test_flagging_rule():
    # nine near-zero scores: MAD is about 0, the floor keeps noise from flagging
    clean = {c: 0.0 for c in range(9)} | {9: 0.03}
    flagged, z = flag_classes(clean, z_threshold=2.0, min_score=0.5, floor=0.05)
    assert flagged == [] and z[9] == pytest.approx(0.6)
    attacked = {c: 0.02 for c in range(10)} | {3: 0.91}
    flagged, _ = flag_classes(attacked, z_threshold=2.0, min_score=0.5, floor=0.05)
    assert flagged == [3]
    # only the high side: a class far below the others is not flagged
    low = {c: 0.8 for c in range(10)} | {4: 0.0}
    assert flag_classes(low, z_threshold=2.0, min_score=0.5, floor=0.05)[0] == []
    # the absolute minimum: a high z alone is not enough
    weak = {c: 0.0 for c in range(10)} | {2: 0.3}
    assert flag_classes(weak, z_threshold=2.0, min_score=0.5, floor=0.05)[0] == []
    assert robust_z({0: 1.0, 1: 2.0, 2: 3.0}, 0.05)[2] == pytest.approx(1 / 1.4826)


@pytest.mark.slow
@pytest.mark.usefixtures("synth_dataset")
def test_detect_flags_the_attacked_class(tmp_path):
    from engine.reporter import MemoryReporter
    from engine.tasks import detect

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    result = detect.run(detect_spec(model_dir, classes_per_pass=2), MemoryReporter(tmp_path / "d"))
    assert result.extra["flagged"] == [1], result.extra
    scores = result.extra["scores"]
    assert set(scores) == {0, 1, 2, 3}
    assert scores[1] >= 0.5 and max(scores[c] for c in (0, 2, 3)) < 0.2
    assert result.metrics["detect/flagged_count"] == 1.0
    assert result.metrics["detect/class=1/score"] == scores[1]
    assert "detect/class=1/z" in result.metrics
    assert (Path(result.artifact) / "detect.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("synth_dataset")
def test_detect_flags_nothing_on_a_clean_model(tmp_path):
    from engine.reporter import MemoryReporter
    from engine.tasks import detect

    model_dir = make_model(tmp_path / "model", backdoor_target=None)
    result = detect.run(detect_spec(model_dir), MemoryReporter(tmp_path / "d"))
    assert result.extra["flagged"] == []
    assert result.metrics["detect/flagged_count"] == 0.0


@pytest.mark.usefixtures("synth_dataset")
def test_a_resumed_detection_skips_finished_classes_and_resumes_the_pass_under_way(
    tmp_path, monkeypatch
):
    from engine.errors import Cancelled
    from engine.reporter import MemoryReporter
    from engine.tasks import detect
    from engine.tasks import mesa as mesa_task

    monkeypatch.setattr(mesa_task, "CHECKPOINT_EVERY_STEPS", 2)
    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    tiny = dict(
        classes="0,1,2", classes_per_pass=1, steps=6, batch_size=16, hidden=16,
        n_eval_triggers=8, eval_images=16,
    )  # fmt: skip
    whole = detect.run(detect_spec(model_dir, **tiny), MemoryReporter(tmp_path / "whole"))

    class StopInClassOne(MemoryReporter):
        def should_stop(self) -> bool:  # before step 4 of class 1: its checkpoint of step 2
            return any(k.startswith("detect/class=1/") and s >= 3 for s, k, _ in self.metrics)

    cut = tmp_path / "cut"
    with pytest.raises(Cancelled):
        detect.run(detect_spec(model_dir, **tiny), StopInClassOne(cut))
    assert (cut / detect.SCORES).exists()
    reporter = MemoryReporter(cut, resume=True)
    resumed = detect.run(detect_spec(model_dir, **tiny), reporter)
    assert any("1 classes already scored ([0])" in line for _, line in reporter.lines)
    assert any("resumed from the checkpoint at step 2" in line for _, line in reporter.lines)
    assert not reporter.series("detect/class=0/hinge")  # class 0 was not searched again
    assert not reporter.series("detect/class=0/validity")
    assert min(s for s, k, _ in reporter.metrics if k.startswith("detect/class=1/")) > 2
    assert resumed.extra["scores"] == whole.extra["scores"]
    assert resumed.metrics == whole.metrics
    assert (Path(resumed.artifact) / "detect.json").read_text() == (
        Path(whole.artifact) / "detect.json"
    ).read_text()
    assert not (cut / "checkpoints").exists()


@pytest.mark.usefixtures("synth_dataset")
def test_detect_refuses_unknown_classes(tmp_path):
    from engine.tasks import detect

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    with pytest.raises(UserError, match="--classes 5"):
        detect.check_spec(detect_spec(model_dir, classes="0,5"))


@pytest.mark.usefixtures("synth_dataset")
def test_cli_run_detect_json(tmp_path):
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "detect",
            "--model",
            str(model_dir),
            "--classes",
            "0,1",
            "--steps",
            "3",
            "--batch-size",
            "16",
            "--hidden",
            "16",
            "--n-eval-triggers",
            "8",
            "--eval-images",
            "16",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"artifact", "metrics", "flagged", "scores"}
    assert set(obj["scores"]) == {"0", "1"} and isinstance(obj["flagged"], list)

    bad = CliRunner().invoke(app, ["run", "detect", "--model", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr
