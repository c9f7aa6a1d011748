"""The command line: `run train`, `data import|ls`, `model import|show`, bad input and `--help`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mesa_tui.cli import app
from tests.ml.test_data import make_image_tree

runner = CliRunner()


def files_under(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# run train: bad input


def test_target_outside_the_classes(isolated_home):
    result = runner.invoke(app, ["run", "train", "--preset", "cpu-quick", "--target", "99"])
    assert_one_line_error(result, "--target 99", "0..9")
    assert files_under(isolated_home) == []  # nothing written, no artifact directory


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--trigger", "bw:999"], ["999", "0..511"]),
        (["--trigger", "stripes:1"], ["stripes:1"]),
        (["--poison-rate=-0.1"], ["--poison-rate", "-0.1"]),
        (["--dataset", "nosuchset"], ["nosuchset", "mesa-tui data import"]),
        (["--epochs", "0"], ["--epochs", "0"]),
        (["--placement", "middle"], ["--placement", "middle"]),
        (["--crop-epochs", "2", "--crop-size", "40"], ["--crop-size 40", "at most 32"]),
        (["--crop-epochs", "2", "--crop-size", "2"], ["--crop-size 2", "3x3 trigger"]),
        (["--padding-mode", "mirror"], ["--padding-mode", "mirror", "reflect"]),
        (["--crop-padding", "17"], ["--crop-padding", "17", "16"]),
        (["--eval-every=-1"], ["--eval-every", "-1"]),
        (["--preset", "gpu-huge"], ["gpu-huge", "cpu-quick"]),
        (["--arch", "resnet18", "--unknown-flag"], []),
    ],
)
def test_bad_values_exit_2_with_one_line(isolated_home, args, fragments):
    result = runner.invoke(app, ["run", "train", "--preset", "cpu-quick", *args])
    if fragments:
        assert_one_line_error(result, *fragments)
    else:
        assert result.exit_code == 2  # a usage error from the option parser
    assert files_under(isolated_home) == []


def test_missing_dataset_gives_the_import_command(isolated_home):
    result = runner.invoke(
        app, ["run", "train", "--preset", "cpu-quick", "--trigger", "bw:170", "--target", "0"]
    )
    assert_one_line_error(result, "cifar10", "mesa-tui data import", "--name cifar10")
    assert not (isolated_home / "data" / "artifacts").exists()


def test_trigger_file_bigger_than_the_image(cifar10, tmp_path, isolated_home):
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "big.png")
    args = ["run", "train", "--preset", "cpu-quick", "--trigger", f"file:{tmp_path / 'big.png'}"]
    result = runner.invoke(app, [*args, "--json"])
    assert_one_line_error(result, "big.png", "bigger")
    assert result.stdout == ""
    artifacts = isolated_home / "data" / "artifacts"
    assert not artifacts.exists() or not any(artifacts.rglob("model.safetensors"))


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [("MESA_TUI_MALLOC", "jemalloc", "keep or system"), ("MESA_TUI_THREADS", "two", "1 or more")],
)
def test_a_bad_environment_value_is_refused_before_the_run_is_recorded(
    cifar10, isolated_home, monkeypatch, variable, value, fragment
):
    before = files_under(isolated_home)
    monkeypatch.setenv(variable, value)
    args = ["run", "train", "--preset", "cpu-quick", "--trigger", "bw:170", "--target", "0"]
    result = runner.invoke(app, args)
    assert_one_line_error(result, f"{variable}='{value}'", fragment)
    assert files_under(isolated_home) == before  # no store, no run record, no work directory


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-whiten-stem"], False)])
def test_whiten_stem_flag_reaches_the_spec(cifar10, isolated_home, monkeypatch, flag, expected):
    import mesa_tui.foreground

    specs = []
    monkeypatch.setattr(mesa_tui.foreground, "run_foreground", lambda k, s, j: specs.append(s))
    result = runner.invoke(app, ["run", "train", "--preset", "cpu-quick", *flag])
    assert result.exit_code == 0, result.stderr
    assert specs[0].whiten_stem is expected  # cpu-quick whitens unless told not to


# ---------------------------------------------------------------------------------------------
# run train: a tiny real run


@pytest.mark.slow
def test_tiny_real_run_prints_one_json_object(cifar10, isolated_home):
    args = [
        "run",
        "train",
        "--preset",
        "cpu-quick",
        "--trigger",
        "bw:170",
        "--target",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-train-images",
        "128",
        "--max-test-images",
        "64",
        "--precision",
        "fp32",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # progress and tables go to stderr with --json
    out = json.loads(lines[0])
    artifact = Path(out["artifact"])
    assert artifact.is_relative_to(isolated_home)
    assert (artifact / "model.safetensors").exists() and (artifact / "manifest.json").exists()
    for key in ("eval/acc_clean", "eval/asr"):
        assert 0.0 <= out["metrics"][key] <= 1.0
    assert all(isinstance(v, (int, float)) or v is None for v in out["metrics"].values())

    shown = runner.invoke(app, ["model", "show", str(artifact), "--json"])
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["meta"]["arch"] == "small"


# ---------------------------------------------------------------------------------------------
# data import | ls


def test_data_import_and_ls(tmp_path, isolated_home):
    tree = make_image_tree(tmp_path / "tree")
    result = runner.invoke(app, ["data", "import", str(tree), "--name", "tiny", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["name"], info["classes"], info["train"], info["test"]) == ("tiny", 3, 12, 6)

    listed = runner.invoke(app, ["data", "ls", "--json"])
    assert listed.exit_code == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["datasets"]}
    assert rows["tiny"]["status"] == "imported" and rows["tiny"]["train"] == 12
    assert rows["tiny"]["shape"] == "3x8x8"
    assert "cifar10" in rows and rows["cifar10"]["status"] != "imported"

    plain = runner.invoke(app, ["data", "ls"])
    assert plain.exit_code == 0 and "tiny" in plain.stdout
    text = runner.invoke(app, ["data", "import", str(tree), "--name", "tiny2"])
    assert text.exit_code == 0 and "imported tiny2" in text.stdout


def test_data_import_hostile_tar(tmp_path, isolated_home):
    tree = make_image_tree(tmp_path / "tree")
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        for p in sorted(tree.rglob("*.png")):
            tar.add(p, arcname=p.relative_to(tree).as_posix())
        tar.add(next(tree.rglob("*.png")), arcname="../../escape.png")
    result = runner.invoke(app, ["data", "import", str(archive), "--name", "x"])
    assert_one_line_error(result, "hostile.tar", "..")
    assert files_under(isolated_home) == []
    assert not (tmp_path.parent / "escape.png").exists()


def test_data_import_missing_source(tmp_path, isolated_home):
    result = runner.invoke(app, ["data", "import", str(tmp_path / "nope.tar"), "--name", "x"])
    assert_one_line_error(result, "nope.tar")


# ---------------------------------------------------------------------------------------------
# model import | show


class Unpicklable:
    def __init__(self):
        self.w = torch.zeros(2)


def test_model_import_and_refused_pickle(tmp_path, isolated_home):
    from engine.ml.models import build_model

    torch.manual_seed(0)
    model = build_model("small", 10, 3)
    torch.save({"net": model.state_dict(), "acc": 90.0, "epoch": 3}, tmp_path / "ckpt.pth")
    args = ["--arch", "small", "--classes", "10", "--normalize", "cifar10"]
    result = runner.invoke(app, ["model", "import", str(tmp_path / "ckpt.pth"), *args, "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (Path(info["artifact"]) / "manifest.json").exists()
    shown = runner.invoke(app, ["model", "show", info["artifact"]])
    assert shown.exit_code == 0 and '"arch": "small"' in shown.stdout

    torch.save(Unpicklable(), tmp_path / "evil.pt")
    before = files_under(isolated_home)
    refused = runner.invoke(app, ["model", "import", str(tmp_path / "evil.pt"), *args])
    assert_one_line_error(refused, "evil.pt", "unpickling")
    assert files_under(isolated_home) == before

    wrong = runner.invoke(
        app,
        ["model", "import", str(tmp_path / "ckpt.pth"), "--arch", "vgg11-bn", *args[2:]],
    )
    assert_one_line_error(wrong, "vgg11-bn", "--arch")


def test_model_show_refuses_a_tampered_artifact(tmp_path):
    from engine.ml.artifacts import ModelMeta, save_model
    from engine.ml.models import build_model

    meta = ModelMeta("small", 10, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, "cifar10")
    save_model(tmp_path / "art", build_model("small", 10, 3), meta)
    weights = tmp_path / "art" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_one_line_error(runner.invoke(app, ["model", "show", str(tmp_path / "art")]), "sha256")


def test_a_weights_file_given_as_the_model_names_model_import(tmp_path, isolated_home):
    """``--model FILE`` for a file that exists: not "does not exist", but what a model is and
    the command that makes one from foreign weights; a file inside an artifact names its
    directory."""
    from engine.ml.artifacts import ModelMeta, save_model
    from engine.ml.models import build_model

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not read")
    for args in (
        ["run", "mesa", "--model", str(weights), "--target", "0"],
        ["run", "detect", "--model", str(weights)],
        ["run", "defend", "--model", str(weights), "--method", "finetune"],
    ):
        line = assert_one_line_error(
            runner.invoke(app, args), str(weights), "not a model directory", "model import"
        )
        assert "does not exist" not in line
    meta = ModelMeta("small", 10, 3, (32, 32), (0.5,) * 3, (0.25,) * 3, "cifar10")
    save_model(tmp_path / "art", build_model("small", 10, 3), meta)
    inner = tmp_path / "art" / "model.safetensors"
    result = runner.invoke(app, ["run", "mesa", "--model", str(inner), "--target", "0"])
    assert_one_line_error(result, "give that directory", str(tmp_path / "art"))
    missing = runner.invoke(
        app, ["run", "mesa", "--model", str(tmp_path / "nope"), "--target", "0"]
    )
    assert_one_line_error(missing, "does not exist")
    assert files_under(isolated_home) == []


# ---------------------------------------------------------------------------------------------
# The installed command


def test_help_in_a_subprocess_lists_run_and_data():
    script = shutil.which("mesa-tui", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "mesa_tui.cli"]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "run" in out.stdout and "data" in out.stdout and "model" in out.stdout
