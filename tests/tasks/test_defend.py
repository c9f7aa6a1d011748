"""The defend task and ``mesa-tui run defend``: every method end to end on a hand-built backdoored
model and tiny synthetic images (seconds), the ground-truth-stripped run, the refusals; and one
slow run on a small network trained on real CIFAR-10 images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.errors import UserError
from engine.reporter import MemoryReporter
from tests.ml.planted import (
    CLASSES,
    SIZE,
    PlantedBackdoor,
    TinyBatchNormNet,
    checker_pattern,
    synthetic,
)

TARGET = 1


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("engine.ml.runtime.configure_threads", lambda: None)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def planted(isolated_home, monkeypatch, tmp_path) -> Path:
    """A synthetic dataset 'synth-defend' and a model artifact with a planted backdoor."""
    from engine.catalog import imported_path
    from engine.ml import models
    from engine.ml.artifacts import GroundTruth, ModelMeta, save_model
    from engine.ml.data import _save_arrays

    train_x, train_y = synthetic(64, seed=1)
    test_x, test_y = synthetic(300, seed=2)
    arrays = {
        "train_x": train_x.numpy(),
        "train_y": train_y.numpy(),
        "test_x": test_x.numpy(),
        "test_y": test_y.numpy(),
    }
    names = [str(i) for i in range(CLASSES)]
    _save_arrays(imported_path("synth-defend"), arrays, names, (0.0,) * 3, (1.0,) * 3, "test")
    monkeypatch.setitem(models.ARCHITECTURES, "planted", lambda n, c: PlantedBackdoor(n, c, 1))
    meta = ModelMeta("planted", CLASSES, 3, (SIZE, SIZE), (0.0,) * 3, (1.0,) * 3, "synth-defend")
    truth = GroundTruth("bw:170", checker_pattern(), TARGET, "per-image")
    return save_model(tmp_path / "model", PlantedBackdoor(), meta, ground_truth=truth)


def spec(model: Path, **overrides):
    from engine.specs import build_spec

    values = dict(
        model=str(model),
        method="ideal",
        epochs=2,
        lr=0.05,
        batch_size=50,
        stamp_rate=0.5,
        channels_last=False,
        point_restarts=2,
        point_epochs=1,
        point_batch_size=100,
        nc_epochs=15,
        nc_steps_per_epoch=2,
        nc_batch_size=32,
        residual_steps=4,
        residual_batch_size=16,
        residual_hidden=16,
        device="cpu",
        precision="fp32",
    )
    values.update(overrides)
    return build_spec("defend", overrides=values)


def make_search(model: Path, workdir: Path) -> Path:
    from engine.specs import build_spec
    from engine.tasks.mesa import run

    search_spec = build_spec(
        "mesa",
        overrides=dict(
            model=str(model),
            target=TARGET,
            betas="0.9,0.5",
            steps=6,
            batch_size=16,
            hidden=16,
            stats_every=3,
            sample_every=3,
            n_eval_triggers=8,
            eval_images=16,
            samples=64,
            device="cpu",
            precision="fp32",
        ),
    )
    return Path(run(search_spec, MemoryReporter(workdir)).artifact)


def test_ideal_repair_lowers_asr_and_writes_a_repaired_model(planted, tmp_path, monkeypatch):
    from engine.ml import artifacts
    from engine.ml.artifacts import load_ground_truth, load_model, read_manifest
    from engine.tasks.defend import run

    manifests = []  # what the folder held each time a manifest was written
    write_manifest = artifacts.write_manifest

    def spy(directory, *args, **kwargs):
        manifests.append(sorted(p.name for p in Path(directory).iterdir()))
        return write_manifest(directory, *args, **kwargs)

    monkeypatch.setattr(artifacts, "write_manifest", spy)
    reporter = MemoryReporter(tmp_path / "out")
    result = run(spec(planted), reporter)
    # One manifest, written last over every file: a folder with a manifest is complete.
    assert len(manifests) == 1 and "manifest.json" not in manifests[0]
    assert {"model.safetensors", "outcomes.json", "defense.json"} <= set(manifests[0])
    m = result.metrics
    assert m["before/asr"] > 0.9
    assert m["eval/asr"] < 0.2 and m["eval/asr"] < m["before/asr"]
    for key in ("eval/acc_clean", "eval/ra", "before/acc_clean", "before/ra", "time/repair_s"):
        assert math.isfinite(m[key])
    for key in ("asr_noise", "asr_rot90", "asr_invert", "asr_flip1", "asr_occlude1", "asr_corner"):
        assert 0.0 <= m[f"eval/{key}"] <= 1.0
    assert 0.0 <= m["residual/validity"] <= 1.0
    # Per-epoch series (step 0 = before repair) and the artifact.
    assert [s for s, _ in reporter.series("eval/asr")] == [0, 1, 2]
    assert [s for s, _ in reporter.series("repair/loss")] == [1, 2]
    manifest = read_manifest(result.artifact)
    assert manifest["kind"] == "repaired-model"
    assert str(planted.resolve()) in [u["path"] for u in manifest["upstream"]]
    assert load_ground_truth(result.artifact).target == TARGET  # copied for later evaluation
    repaired, _, _ = load_model(result.artifact)
    assert float(repaired.gain.detach()[TARGET]) < 3.0
    assert reporter.artifacts == [(str(result.artifact), "repaired-model")]
    assert result.extra["target"] == TARGET and result.extra["method"] == "ideal"
    # Per-image outcomes behind the rates, before and after, for paired statistics.
    assert "outcomes.json" in manifest["files"]
    found = json.loads((Path(result.artifact) / "outcomes.json").read_text())
    for when, prefix in (("before", "before/"), ("after", "eval/")):
        clean, asr = found[when]["clean"], found[when]["asr"]
        assert set(clean + asr) <= {"0", "1"} and len(asr) < len(clean)
        assert clean.count("1") / len(clean) == pytest.approx(m[f"{prefix}acc_clean"])
        assert asr.count("1") / len(asr) == pytest.approx(m[f"{prefix}asr"])


def test_finetune_and_random_patch_run_with_the_same_loop(planted, tmp_path):
    from engine.tasks.defend import run

    for method in ("finetune", "random-patch"):
        result = run(
            spec(planted, method=method, target=TARGET, residual_steps=0, variations=False),
            MemoryReporter(tmp_path / method),
        )
        assert {"eval/acc_clean", "eval/asr", "eval/ra"} <= set(result.metrics)
        assert "residual/validity" not in result.metrics
    finetune = run(
        spec(planted, method="finetune", residual_steps=0), MemoryReporter(tmp_path / "f")
    )
    assert finetune.metrics["eval/asr"] > 0.9  # no trigger: nothing to unlearn
    assert finetune.extra["target"] is None


def test_point_and_neural_cleanse_reverse_on_the_defender_split(planted, tmp_path):
    from engine.ml.artifacts import load_array, read_manifest
    from engine.tasks.defend import run

    point = run(spec(planted, method="point", target=TARGET), MemoryReporter(tmp_path / "p"))
    assert point.metrics["eval/asr"] < point.metrics["before/asr"]
    assert len(point.extra["point_success"]) == 2
    assert "point/restart=1/distance_to_true" in point.metrics
    patterns = load_array(Path(point.artifact) / "point_patterns.npy")
    assert patterns.shape == (2, 3, 3, 3)
    assert "point_patterns.npy" in read_manifest(point.artifact)["files"]

    nc = run(
        spec(planted, method="neural-cleanse", nc_epochs=40, nc_steps_per_epoch=4),
        MemoryReporter(tmp_path / "nc"),
    )
    assert nc.extra["target"] == TARGET  # detected over all labels
    assert nc.extra["flagged"] == [TARGET]
    assert set(nc.extra["scores"]) == {str(c) for c in range(CLASSES)}
    assert nc.metrics["defense/target_correct"] == 1.0
    assert nc.metrics["eval/asr"] < nc.metrics["before/asr"]
    mask = load_array(Path(nc.artifact) / "nc_mask.npy")
    assert mask.shape == (SIZE, SIZE) and mask.min() >= 0 and mask.max() <= 1

    # Reusing a reversal at another rate: same trigger, no reversal time, same target.
    again = run(
        spec(planted, method="point", reversal_from=point.artifact, point_index=1, stamp_rate=0.2),
        MemoryReporter(tmp_path / "p2"),
    )
    assert again.extra["target"] == TARGET and "time/reverse_s" not in again.metrics
    assert np.array_equal(load_array(Path(again.artifact) / "point_patterns.npy"), patterns)
    nc_again = run(
        spec(planted, method="neural-cleanse", reversal_from=nc.artifact),
        MemoryReporter(tmp_path / "nc2"),
    )
    assert nc_again.extra["flagged"] == [TARGET]
    assert np.array_equal(load_array(Path(nc_again.artifact) / "nc_mask.npy"), mask)
    with pytest.raises(UserError, match="is a point defense"):
        run(
            spec(planted, method="neural-cleanse", reversal_from=point.artifact),
            MemoryReporter(tmp_path / "bad"),
        )


def test_mesa_repair_uses_the_search_and_its_target(planted, tmp_path):
    from engine.ml.artifacts import read_manifest
    from engine.tasks.defend import run

    search = make_search(planted, tmp_path / "search")
    for overrides in ({"ensemble": "staircase"}, {"beta": 0.9}, {}):
        result = run(
            spec(planted, method="mesa", search=str(search), residual_steps=0, **overrides),
            MemoryReporter(tmp_path / f"mesa{len(overrides)}{overrides.get('beta')}"),
        )
        assert result.extra["target"] == TARGET
        assert math.isfinite(result.metrics["eval/asr"])
    assert result.extra["ensemble"] == "round-robin"
    upstream = [u["path"] for u in read_manifest(result.artifact)["upstream"]]
    assert str(search.resolve()) in upstream


def test_the_residual_check_scans_only_after_a_learned_search(planted, tmp_path, monkeypatch):
    """A residual check at random places costs no position scan (230k forward passes at the
    defaults); after a ``learned`` search it scans the repaired model, where a backdoor left at
    one position would show."""
    import engine.ml.mesa as mesa
    from engine.tasks.defend import run

    search = make_search(planted, tmp_path / "search")  # learned: the spec's default
    scans = []
    real = mesa.scan_for
    monkeypatch.setattr(mesa, "scan_for", lambda *a, **k: scans.append(1) or real(*a, **k))
    cheap = dict(residual_steps=2, variations=False)
    for method in ("ideal", "point"):
        run(spec(planted, method=method, target=TARGET, **cheap), MemoryReporter(tmp_path / method))
    assert scans == []
    run(spec(planted, method="mesa", search=str(search), **cheap), MemoryReporter(tmp_path / "m"))
    assert scans == [1]


def test_stripped_ground_truth_gives_no_attack_metrics(planted, tmp_path):
    from engine.tasks.defend import run

    (planted / "ground_truth.json").unlink()
    result = run(
        spec(planted, method="point", target=TARGET, residual_steps=3),
        MemoryReporter(tmp_path / "o"),
    )
    keys = set(result.metrics)
    assert "eval/acc_clean" in keys and "before/acc_clean" in keys
    assert not any("asr" in k or k.endswith("/ra") for k in keys)
    assert not any("distance_to_true" in k or "nearest_to_true" in k for k in keys)
    assert "residual/validity" in keys  # the defender's own check needs no ground truth
    assert not (Path(result.artifact) / "ground_truth.json").exists()
    with pytest.raises(UserError, match="ideal needs the original trigger"):
        run(spec(planted, method="ideal"), MemoryReporter(tmp_path / "i"))


def _weights(artifact) -> dict[str, torch.Tensor]:
    from engine.ml.artifacts import load_model

    model, _, _ = load_model(artifact)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_the_repair_never_reads_the_ground_truth(planted, tmp_path):
    """Stripping the ground truth changes the metrics, never the repaired weights."""
    from engine.tasks.defend import run

    settings = dict(method="random-patch", target=TARGET, residual_steps=0)
    with_truth = run(spec(planted, **settings), MemoryReporter(tmp_path / "a"))
    (planted / "ground_truth.json").unlink()
    without = run(spec(planted, **settings), MemoryReporter(tmp_path / "b"))
    a, b = _weights(with_truth.artifact), _weights(without.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_repair_resumes_to_the_same_model(planted, tmp_path):
    from engine.errors import Cancelled
    from engine.tasks.defend import run

    settings = dict(method="random-patch", target=TARGET, residual_steps=0, variations=False)
    whole = run(spec(planted, **settings), MemoryReporter(tmp_path / "whole"))
    with pytest.raises(Cancelled):  # 4 batches per epoch: stops inside the second epoch
        run(spec(planted, **settings), MemoryReporter(tmp_path / "cut", stop_after=5))
    assert (tmp_path / "cut" / "checkpoints" / "repair.safetensors").exists()
    resumed_reporter = MemoryReporter(tmp_path / "cut", resume=True)
    resumed = run(spec(planted, **settings), resumed_reporter)
    assert [s for s, _ in resumed_reporter.series("repair/loss")] == [2]
    assert min(s for s, _, _ in resumed_reporter.metrics) == 2  # nothing again at step 0 or 1
    a, b = _weights(whole.artifact), _weights(resumed.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "checkpoints").exists()


class StopWhen(MemoryReporter):
    """Asks to stop once a metric key with ``prefix`` has been logged."""

    def __init__(self, workdir, prefix: str, resume: bool = False):
        super().__init__(workdir, resume=resume)
        self.prefix = prefix

    def should_stop(self) -> bool:
        return any(key.startswith(self.prefix) for _, key, _ in self.metrics)


@pytest.mark.parametrize("method", ["point", "neural-cleanse"])
def test_a_resumed_defense_skips_its_finished_reversal_and_resumes_the_residual_search(
    planted, tmp_path, monkeypatch, method
):
    from engine.errors import Cancelled
    from engine.tasks import defend
    from engine.tasks import mesa as mesa_task

    monkeypatch.setattr(mesa_task, "CHECKPOINT_EVERY_STEPS", 2)
    # 7 restarts: 240 images an epoch leave the rotation of patterns mid-way (240 % 7 = 2).
    settings = dict(method=method, target=TARGET, point_restarts=7, residual_steps=4)
    whole = defend.run(spec(planted, **settings), MemoryReporter(tmp_path / "whole"))

    cut = tmp_path / "cut"
    with pytest.raises(Cancelled):  # after the first repair epoch
        defend.run(spec(planted, **settings), StopWhen(cut, "repair/loss"))
    assert (cut / defend.REVERSAL).exists() and (cut / defend.CHECKPOINT).exists()

    def refuse(*args, **kwargs):
        raise AssertionError("the reversal ran again")

    monkeypatch.setattr("engine.ml.reverse.reverse_point", refuse)
    monkeypatch.setattr("engine.ml.reverse.neural_cleanse", refuse)
    second = StopWhen(cut, "residual/", resume=True)
    with pytest.raises(Cancelled):  # in the residual search, after its checkpoint of step 2
        defend.run(spec(planted, **settings), second)
    assert any(f"finished {method} reversal" in line for _, line in second.lines)
    assert [s for s, _ in second.series("repair/loss")] == [2]
    assert (cut / defend.RESIDUAL).exists()

    last = MemoryReporter(cut, resume=True)
    resumed = defend.run(spec(planted, **settings), last)
    assert any("resumed from the checkpoint at step 2" in line for _, line in last.lines)
    assert not last.series("repair/loss") and not last.series("eval/acc_clean")
    assert [s for s, _ in last.series("residual/beta=0.9/validity")] == [4]
    a, b = _weights(whole.artifact), _weights(resumed.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)
    same = {k: v for k, v in whole.metrics.items() if not k.startswith("time/")}
    assert same == {k: v for k, v in resumed.metrics.items() if not k.startswith("time/")}
    assert (Path(resumed.artifact) / "defense.json").read_text() == (
        Path(whole.artifact) / "defense.json"
    ).read_text()
    assert not (cut / "checkpoints").exists()


def test_a_damaged_repair_checkpoint_repairs_from_the_beginning(planted, tmp_path):
    from engine.tasks import defend

    settings = dict(method="random-patch", target=TARGET, residual_steps=0, variations=False)
    whole = defend.run(spec(planted, **settings), MemoryReporter(tmp_path / "whole"))
    path = tmp_path / "cut" / defend.CHECKPOINT
    path.parent.mkdir(parents=True)
    torch.save({"model": {}}, path)  # a pickle where the checkpoint belongs: never unpickled
    reporter = MemoryReporter(tmp_path / "cut", resume=True)
    resumed = defend.run(spec(planted, **settings), reporter)
    assert any(
        level == "warning" and "starting from the beginning" in m for level, m in reporter.lines
    )
    assert [s for s, _ in reporter.series("repair/loss")] == [1, 2]
    a, b = _weights(whole.artifact), _weights(resumed.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The post-training defenses (anp, i-bau, clp, ft-sam) in the same task


@pytest.fixture
def planted_bn(planted, monkeypatch, tmp_path) -> Path:
    """A model artifact of a network with BatchNorm layers (what ANP and CLP prune) on the same
    synthetic data, with the planted model's ground truth (it has no backdoor of its own)."""
    from engine.ml import models
    from engine.ml.artifacts import GroundTruth, ModelMeta, save_model

    monkeypatch.setitem(models.ARCHITECTURES, "tinybn", lambda n, c: TinyBatchNormNet(n, c))
    torch.manual_seed(0)
    meta = ModelMeta("tinybn", CLASSES, 3, (SIZE, SIZE), (0.0,) * 3, (1.0,) * 3, "synth-defend")
    truth = GroundTruth("bw:170", checker_pattern(), TARGET, "per-image")
    return save_model(tmp_path / "bn-model", TinyBatchNormNet(), meta, ground_truth=truth)


QUICK_POSTTRAIN = dict(
    residual_steps=0,
    variations=False,
    anp_iterations=4,
    anp_batch_size=16,
    ibau_rounds=2,
    ibau_k=2,
    sam_epochs=2,
)


@pytest.mark.parametrize("method", ["ft-sam", "i-bau"])
def test_ft_sam_and_i_bau_are_the_repair_loop_with_their_own_step(planted, tmp_path, method):
    from engine.ml.artifacts import read_manifest
    from engine.tasks.defend import run

    reporter = MemoryReporter(tmp_path / method)
    result = run(spec(planted, method=method, **QUICK_POSTTRAIN), reporter)
    m = result.metrics
    assert {"eval/acc_clean", "eval/asr", "eval/ra", "before/asr", "time/repair_s"} <= set(m)
    assert [s for s, _ in reporter.series("eval/asr")] == [0, 1, 2]
    assert [s for s, _ in reporter.series("repair/loss")] == [1, 2]
    stamped = [v for _, v in reporter.series("repair/stamped")]
    assert stamped == [0.0, 0.0]  # no trigger source: nothing stamped
    if method == "ft-sam":
        lrs = [v for _, v in reporter.series("repair/lr")]
        assert lrs == [pytest.approx(0.01), pytest.approx(0.005)]  # cosine over sam_epochs
    else:
        assert [s for s, _ in reporter.series("ibau/perturbation_l2")] == [1, 2]
    files = read_manifest(result.artifact)["files"]
    assert "outcomes.json" in files and "defense.json" in files
    assert json.loads((Path(result.artifact) / "defense.json").read_text())["method"] == method


def test_anp_and_clp_refuse_a_network_without_batchnorm(planted, tmp_path):
    from engine.tasks.defend import run

    for method in ("anp", "clp"):
        with pytest.raises(UserError, match=f"--method {method} prunes BatchNorm neurons"):
            run(spec(planted, method=method, **QUICK_POSTTRAIN), MemoryReporter(tmp_path / method))


def test_anp_and_clp_prune_without_repair_epochs_and_end_like_every_method(planted_bn, tmp_path):
    from engine.ml.artifacts import load_array, read_manifest
    from engine.tasks.defend import run

    for method, key, file in (
        ("anp", "anp/pruned", "anp_masks"),
        ("clp", "clp/pruned", "clp_uclc"),
    ):
        reporter = MemoryReporter(tmp_path / method)
        result = run(spec(planted_bn, method=method, clp_u=1.0, **QUICK_POSTTRAIN), reporter)
        m = result.metrics
        assert {"eval/acc_clean", "eval/asr", "time/prune_s", key} <= set(m)
        assert [s for s, _ in reporter.series("eval/asr")] == [0, 1]  # before, after pruning
        assert not reporter.series("repair/loss")
        files = read_manifest(result.artifact)["files"]
        assert {"outcomes.json", "defense.json", f"{file}.npy"} <= set(files)
        assert load_array(Path(result.artifact) / f"{file}.npy").shape == (14,)  # 6 + 8 neurons
        entry = json.loads((Path(result.artifact) / "defense.json").read_text())[method]
        assert entry["pruned"] == m[key] and [layer["bn"] for layer in entry["layers"]] == [
            "bn1",
            "bn2",
        ]
    assert [s for s, _ in reporter.series("clp/pruned")] == [1]  # with the final metrics


def test_anp_with_an_accuracy_budget_prunes_at_the_sweeps_choice(planted_bn, tmp_path):
    from engine.ml.anp import SWEEP_THRESHOLDS
    from engine.tasks.defend import run

    settings = dict(QUICK_POSTTRAIN, method="anp", anp_max_acc_drop=0.1)
    result = run(spec(planted_bn, **settings), MemoryReporter(tmp_path / "anp"))
    entry = json.loads((Path(result.artifact) / "defense.json").read_text())["anp"]
    sweep, m = entry["sweep"], result.metrics
    assert [p["threshold"] for p in sweep["points"]] == list(SWEEP_THRESHOLDS)
    floor = sweep["unpruned_defender_acc"] * 0.9
    fits = [p for p in sweep["points"] if p["defender_acc"] >= floor]
    chosen = max(fits, key=lambda p: p["threshold"])
    assert entry["threshold"] == sweep["chosen"] == m["anp/threshold"] == chosen["threshold"]
    assert entry["pruned"] == chosen["pruned"] == m["anp/pruned"] and entry["max_acc_drop"] == 0.1
    assert m["anp/defender_acc"] == chosen["defender_acc"]


def test_an_interrupted_anp_resumes_to_the_same_masks_and_model(planted_bn, tmp_path, monkeypatch):
    from engine.errors import Cancelled
    from engine.tasks import defend

    monkeypatch.setattr("engine.ml.anp.LOG_EVERY", 2)
    monkeypatch.setattr(defend, "ANP_CHECKPOINT_EVERY_STEPS", 2)
    settings = dict(QUICK_POSTTRAIN, method="anp", anp_iterations=6, anp_prune_count=3)
    whole = defend.run(spec(planted_bn, **settings), MemoryReporter(tmp_path / "whole"))
    cut = tmp_path / "cut"
    with pytest.raises(Cancelled):  # after the masks' first logged step (2) and its checkpoint
        defend.run(spec(planted_bn, **settings), StopWhen(cut, "anp/loss"))
    assert (cut / defend.ANP_CHECKPOINT).exists()
    resumed_reporter = MemoryReporter(cut, resume=True)
    resumed = defend.run(spec(planted_bn, **settings), resumed_reporter)
    assert any("after iteration 2" in line for _, line in resumed_reporter.lines)
    assert [s for s, _ in resumed_reporter.series("anp/loss")] == [4, 6]
    assert [s for s, _ in resumed_reporter.series("eval/acc_clean")] == [1]  # not step 0 again
    a, b = _weights(whole.artifact), _weights(resumed.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)
    same = {k: v for k, v in whole.metrics.items() if not k.startswith("time/")}
    assert same == {k: v for k, v in resumed.metrics.items() if not k.startswith("time/")}
    assert not (cut / "checkpoints").exists()


@pytest.mark.parametrize("method", ["i-bau", "ft-sam"])
def test_an_interrupted_i_bau_or_ft_sam_repair_resumes_to_the_same_model(planted, tmp_path, method):
    from engine.errors import Cancelled
    from engine.tasks import defend

    settings = dict(QUICK_POSTTRAIN, method=method)
    whole = defend.run(spec(planted, **settings), MemoryReporter(tmp_path / "whole"))
    cut = tmp_path / "cut"
    with pytest.raises(Cancelled):  # after the first round or epoch
        defend.run(spec(planted, **settings), StopWhen(cut, "repair/loss"))
    reporter = MemoryReporter(cut, resume=True)
    resumed = defend.run(spec(planted, **settings), reporter)
    assert [s for s, _ in reporter.series("repair/loss")] == [2]
    a, b = _weights(whole.artifact), _weights(resumed.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_spec_refusals(planted, tmp_path):
    from engine.tasks.defend import check_spec

    search = make_search(planted, tmp_path / "search")
    cases = [
        (dict(method="mesa"), "needs --search"),
        (dict(method="mesa", search=str(tmp_path / "nope")), "does not exist"),
        (dict(method="mesa", search=str(planted)), "give a search"),
        (dict(method="mesa", search=str(search), beta=0.7), "invalid --beta 0.7"),
        (dict(method="mesa", search=str(search), beta=0.9, ensemble="equal"), "not both"),
        (dict(method="mesa", search=str(search), target=2), "invalid --target 2"),
        (dict(method="point", search=str(search)), "--search is only used"),
        (dict(method="finetune", ensemble="equal"), "--ensemble is only used"),
        (dict(method="point", target=9), "invalid --target 9"),
        (dict(method="point", point_restarts=2, point_index=2), "invalid --point-index 2"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            check_spec(spec(planted, **overrides))


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_defend_json(planted):
    from mesa_tui.cli import app

    args = ["run", "defend", "--model", str(planted), "--method", "ideal", "--json"]
    args += ["--stamp-rate", "0.5", "--epochs", "1", "--lr", "0.05", "--batch-size", "50"]
    args += ["--residual-steps", "0", "--device", "cpu", "--precision", "fp32"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(obj["artifact"]).is_dir()
    for key in ("eval/acc_clean", "eval/asr", "eval/ra", "before/asr"):
        assert 0.0 <= obj["metrics"][key] <= 1.0
    assert obj["method"] == "ideal"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "mesa"], "--search"),
        (["--method", "nope"], "--method"),
        (["--method", "ideal", "--stamp-rate", "1.5"], "--stamp-rate 1.5"),
        (["--method", "ideal", "--stamp-rate", "-0.1"], "--stamp-rate -0.1"),
        (["--method", "finetune", "--ensemble", "stairs"], "--ensemble"),
        (
            ["--method", "anp", "--anp-prune-count", "5", "--anp-max-acc-drop", "0.1"],
            "--anp-prune-count 5 and --anp-max-acc-drop 0.1 are two pruning rules; give one",
        ),
        (["--method", "anp", "--anp-max-acc-drop", "1.5"], "--anp-max-acc-drop 1.5"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(planted, extra, message):
    from engine import paths
    from mesa_tui.cli import app

    out = CliRunner().invoke(app, ["run", "defend", "--model", str(planted), *extra])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.output
    assert not paths.artifacts_dir().exists() or not any(paths.artifacts_dir().iterdir())


def test_cli_defend_takes_the_post_training_defenses_settings(planted):
    from mesa_tui.cli import app

    args = ["run", "defend", "--model", str(planted), "--method", "ft-sam", "--json"]
    args += ["--sam-epochs", "1", "--sam-rho", "1.5", "--no-sam-adaptive", "--batch-size", "50"]
    args += ["--residual-steps", "0", "--device", "cpu", "--precision", "fp32"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    spec_json = json.loads((Path(obj["artifact"]) / "manifest.json").read_text())["spec"]
    assert spec_json["sam_rho"] == 1.5 and spec_json["sam_adaptive"] is False
    assert spec_json["sam_epochs"] == 1
    bad = CliRunner().invoke(app, ["run", "defend", "--model", str(planted), "--sam-rhoo", "2"])
    assert bad.exit_code == 2 and "unknown option --sam-rhoo; did you mean --sam-rho?" in bad.output


def test_cli_missing_model_is_refused(isolated_home):
    from mesa_tui.cli import app

    out = CliRunner().invoke(app, ["run", "defend", "--method", "finetune"])
    assert out.exit_code == 2 and "--model is required" in out.output


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
def test_real_cifar_backdoor_is_repaired_by_ideal_and_not_by_finetune(cifar10, tmp_path):
    """A small network trained on 8k real CIFAR-10 images with a strong bw:170 backdoor; the
    defend task runs on a 1k-image test subset (800 defender images, 200 held out)."""
    from engine.catalog import imported_path
    from engine.ml.data import _save_arrays, load_dataset
    from engine.specs import build_spec
    from engine.tasks.defend import run as defend
    from engine.tasks.train import run as train

    data = load_dataset(cifar10)
    arrays = {
        "train_x": data.train_x[:8000].numpy(),
        "train_y": data.train_y[:8000].numpy(),
        "test_x": data.test_x[:1000].numpy(),
        "test_y": data.test_y[:1000].numpy(),
    }
    _save_arrays(imported_path("cifar-mini"), arrays, data.classes, data.mean, data.std, "test")
    train_spec = build_spec(
        "train",
        preset="cpu-quick",
        overrides=dict(dataset="cifar-mini", epochs=5, poison_rate=0.2, trigger="bw:170"),
    )
    model = Path(train(train_spec, MemoryReporter(tmp_path / "model")).artifact)
    common = dict(epochs=3, stamp_rate=0.3, residual_steps=0, variations=False, lr=1e-2)
    ideal = defend(spec(model, method="ideal", **common), MemoryReporter(tmp_path / "ideal"))
    finetune = defend(spec(model, method="finetune", **common), MemoryReporter(tmp_path / "ft"))
    before = ideal.metrics["before/asr"]
    assert before > 0.8
    assert ideal.metrics["eval/asr"] < 0.5 * before
    assert ideal.metrics["eval/asr"] < finetune.metrics["eval/asr"]


@pytest.mark.slow
def test_defense_benchmark_quick_runs_end_to_end(cifar10, tmp_path):
    """``benchmarks/defense.py --quick``: every method, the alpha ablation and the paper recipe
    on a tiny CIFAR-10 subset; checks the report's shape, not its numbers."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "defense.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/defense.py", "--quick", "--out", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert report["machine"]["cpu"] and report["machine"]["precision"] in ("fp32", "bf16")
    methods = report["summary"]["methods"]
    expected = {"mesa", "mesa:0.9", "mesa:0.8", "mesa:0.5", "ideal", "point"}
    assert expected | {"neural-cleanse", "finetune", "random-patch"} == set(methods)
    assert methods["point"]["n"] == 2  # both restarts, pooled
    repairs = report["models"][0]["repairs"]
    assert all(0.0 <= r["asr"] <= 1.0 and 0.0 <= r["acc_clean"] <= 1.0 for r in repairs)
    assert all(set(r["variations"]) >= {"asr_noise", "asr_corner"} for r in repairs)
    assert any(r["residual_validity"] is not None for r in repairs)
    assert len(report["alpha_ablation"]) == 6
    assert {"mesa", "point"} == set(report["paper_recipe"]["summary"])
    assert "search_validity_min" in report["bar"]
    for section in ("## Every repair", "## Alpha ablation", "## The paper's attack recipe"):
        assert section in proc.stderr  # the same figures as Markdown tables
    assert "| bw:170 | 0 | point#1 | 0.1 |" in proc.stderr
