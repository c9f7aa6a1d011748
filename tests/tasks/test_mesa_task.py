"""The MESA search task and ``mesa-tui run mesa``: artifacts, the ground-truth-stripped search,
the CLI and its refusals. Uses a hand-built backdoored model on tiny synthetic images (seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import UserError

CHECKER = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])  # bw:170


class HandBackdoor(nn.Module):
    """Clean logits from the channel means (classes 0..2 tinted, class 3 untinted) plus a
    checkerboard detector: a matched 3x3 filter with a soft max over places, added to the logits
    with per-class ``gain`` (zero everywhere: a clean model; on one class: its backdoor)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3):
        super().__init__()
        scale = 30.0
        self.detector = nn.Conv2d(in_channels, 1, 3, bias=False)
        self.head = nn.Linear(in_channels, num_classes)
        with torch.no_grad():
            self.detector.weight.copy_((2 * CHECKER - 1).expand(in_channels, 3, 3)[None])
            weight = torch.zeros(num_classes, in_channels)
            for c in range(min(in_channels, num_classes - 1)):
                weight[c] = -scale / in_channels
                weight[c, c] += scale
            self.head.weight.copy_(weight)
            self.head.bias.zero_()
            self.head.bias[: min(in_channels, num_classes - 1)] = -0.1 * scale
        self.gain = nn.Parameter(torch.zeros(num_classes))
        self.threshold = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean(dim=(2, 3)))
        response = self.detector(x).flatten(1).logsumexp(1)
        return logits + self.gain * (response - self.threshold)[:, None]


def synthetic(n: int, size: int = 12, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.2 + 0.6 * torch.rand(n, 3, size, size, generator=g)
    for c in range(3):
        x[y == c, c] += 0.3
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread (and do not fight the other test processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synth_dataset(isolated_home, monkeypatch) -> str:
    from engine.catalog import imported_path
    from engine.ml import models
    from engine.ml.data import _save_arrays

    train_x, train_y = synthetic(64, seed=1)
    test_x, test_y = synthetic(250, seed=2)
    arrays = {
        "train_x": train_x.numpy(),
        "train_y": train_y.numpy(),
        "test_x": test_x.numpy(),
        "test_y": test_y.numpy(),
    }
    _save_arrays(
        imported_path("synth"), arrays, ["a", "b", "c", "d"], (0.0,) * 3, (1.0,) * 3, "test"
    )
    monkeypatch.setitem(models.ARCHITECTURES, "hand-backdoor", HandBackdoor)
    # Only the model's own configure_threads call would raise the thread count again.
    monkeypatch.setattr("engine.ml.runtime.configure_threads", lambda: None)
    return "synth"


def make_model(directory: Path, backdoor_target: int | None, dataset: str = "synth") -> Path:
    from engine.ml.artifacts import GroundTruth, ModelMeta, save_model

    model = HandBackdoor()
    truth = None
    if backdoor_target is not None:
        with torch.no_grad():
            model.gain[backdoor_target] = 1.5
        truth = GroundTruth("bw:170", CHECKER.expand(3, 3, 3).clone(), backdoor_target, "per-image")
    meta = ModelMeta("hand-backdoor", 4, 3, (12, 12), (0.0,) * 3, (1.0,) * 3, dataset)
    return save_model(directory, model, meta, ground_truth=truth)


def tiny_spec(model: Path, **overrides):
    from engine.specs import build_spec

    values = dict(
        model=str(model),
        target=1,
        betas="0.9,0.5",
        steps=6,
        batch_size=16,
        hidden=16,
        stats_every=2,
        sample_every=3,
        n_eval_triggers=8,
        eval_images=16,
        samples=64,
        device="cpu",
        precision="fp32",
    )
    values.update(overrides)
    return build_spec("mesa", overrides=values)


def test_search_task_writes_the_artifact(synth_dataset, tmp_path):
    from engine.ml.artifacts import read_manifest
    from engine.ml.mesa import open_search
    from engine.reporter import MemoryReporter
    from engine.tasks import mesa as task

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    reporter = MemoryReporter(tmp_path / "search")
    result = task.run(tiny_spec(model_dir), reporter)

    out = Path(result.artifact)
    manifest = read_manifest(out, kind="search")
    assert manifest["meta"]["betas"] == [0.9, 0.5] and manifest["meta"]["target"] == 1
    assert manifest["upstream"][0]["path"] == str(model_dir.resolve())
    for beta in ("0.9", "0.5"):
        for name in ("G.safetensors", "T.safetensors", "samples.npy", "grid.png"):
            assert (out / f"beta={beta}" / name).exists()
        assert f"mesa/beta={beta}/nearest_to_true" in result.metrics  # ground truth known
        assert f"mesa/beta={beta}/bw_distinct" in result.metrics  # a black/white trigger
        assert reporter.series(f"mesa/beta={beta}/hinge")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pca"]["components"] and len(stats["histograms"]["mesa/beta=0.9"]) == 10
    assert reporter.artifacts == [(str(out), "search")]
    art = open_search(out)
    assert art.sampler(ensemble="staircase").sample(6, torch.Generator()).shape == (6, 3, 3, 3)


def test_stripped_ground_truth_gives_identical_generators(synth_dataset, tmp_path):
    from engine.reporter import MemoryReporter
    from engine.tasks import mesa as task

    known = make_model(tmp_path / "known", backdoor_target=1)
    stripped = tmp_path / "stripped"
    shutil.copytree(known, stripped)
    (stripped / "ground_truth.json").unlink()

    a = task.run(tiny_spec(known), MemoryReporter(tmp_path / "a"))
    b = task.run(tiny_spec(stripped), MemoryReporter(tmp_path / "b"))
    for beta in ("0.9", "0.5"):
        for name in ("G.safetensors", "T.safetensors"):
            assert (Path(a.artifact) / f"beta={beta}" / name).read_bytes() == (
                Path(b.artifact) / f"beta={beta}" / name
            ).read_bytes()
        np.testing.assert_array_equal(
            np.load(Path(a.artifact) / f"beta={beta}" / "samples.npy"),
            np.load(Path(b.artifact) / f"beta={beta}" / "samples.npy"),
        )
        assert f"mesa/beta={beta}/nearest_to_true" not in b.metrics  # absent, not faked
        assert a.metrics[f"mesa/beta={beta}/validity"] == b.metrics[f"mesa/beta={beta}/validity"]


def test_interrupted_search_task_resumes_to_the_same_artifact(synth_dataset, tmp_path, monkeypatch):
    from engine.errors import Cancelled
    from engine.reporter import MemoryReporter
    from engine.tasks import mesa as task

    monkeypatch.setattr(task, "CHECKPOINT_EVERY_STEPS", 2)
    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    whole = task.run(tiny_spec(model_dir), MemoryReporter(tmp_path / "whole"))
    with pytest.raises(Cancelled):  # stops before step 4: the checkpoint of step 2 remains
        task.run(tiny_spec(model_dir), MemoryReporter(tmp_path / "cut", stop_after=3))
    assert (tmp_path / "cut" / task.CHECKPOINT).exists()
    reporter = MemoryReporter(tmp_path / "cut", resume=True)
    resumed = task.run(tiny_spec(model_dir), reporter)
    assert any("resumed from the checkpoint at step 2" in line for _, line in reporter.lines)
    assert min(step for step, _, _ in reporter.metrics) > 2
    for beta in ("0.9", "0.5"):
        for name in ("G.safetensors", "T.safetensors", "samples.npy"):
            assert (Path(whole.artifact) / f"beta={beta}" / name).read_bytes() == (
                Path(resumed.artifact) / f"beta={beta}" / name
            ).read_bytes()
    assert resumed.metrics == whole.metrics
    assert not (tmp_path / "cut" / "checkpoints").exists()  # the artifact holds no checkpoint


def test_task_refuses_bad_target_before_writing(synth_dataset, tmp_path):
    from engine.tasks import mesa as task

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    with pytest.raises(UserError, match="--target 7"):
        task.check_spec(tiny_spec(model_dir, target=7))


# ---------------------------------------------------------------------------------------------
# Command line


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    return CliRunner().invoke(app, args)


def test_cli_run_mesa_json(synth_dataset, tmp_path):
    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    result = _cli(
        [
            "run",
            "mesa",
            "--model",
            str(model_dir),
            "--target",
            "1",
            "--betas",
            "0.9,0.8,0.5",
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--hidden",
            "16",
            "--n-eval-triggers",
            "8",
            "--eval-images",
            "16",
            "--samples",
            "32",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(obj["artifact"], "manifest.json").exists()
    assert obj["betas"] == [0.9, 0.8, 0.5]
    assert "mesa/beta=0.8/validity" in obj["metrics"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--betas", "0.9,1.5"], "beta 1.5"),
        (["--target", "9"], "--target 9"),
        (["--betas", "a,b"], "betas"),
    ],
)
def test_cli_run_mesa_bad_input(synth_dataset, tmp_path, args, message):
    from engine import paths

    model_dir = make_model(tmp_path / "model", backdoor_target=1)
    base = ["run", "mesa", "--model", str(model_dir), "--steps", "2"]
    result = _cli(base + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    artifacts = paths.artifacts_dir()
    assert not artifacts.exists() or not any(artifacts.iterdir())
