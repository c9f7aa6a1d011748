"""Repairs of a backdoor that lives at one fixed place (issue 31), on the planted model that
answers to its checkerboard at one offset only and tiny synthetic images (seconds each):

- the ideal oracle stamps the true trigger where the attack stamped;
- a MESA repair from a learned search mixes in the position scan's probes that pass the search's
  validity test, and never reads the ground truth doing so;
- a search given a detection's scan (``scan_from``, a pipeline's wiring) does no scan of its own
  and ends with the generators and pi of a search that scanned again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.reporter import MemoryReporter
from tests.ml.planted import CLASSES, SIZE, checker_pattern, synthetic
from tests.ml.test_positions import SPOT, FixedSpotBackdoor
from tests.tasks.test_defend import _weights, one_thread  # noqa: F401
from tests.tasks.test_defend import spec as defend_spec

TARGET = 1
WHERE = f"at:{SPOT[0]},{SPOT[1]}"


@pytest.fixture
def spot_model(isolated_home, monkeypatch, tmp_path) -> Path:
    """A synthetic dataset and the planted model that answers at ``SPOT`` only (its ground
    truth says so: the checkerboard at ``at:8,1``)."""
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
    _save_arrays(imported_path("synth-spot"), arrays, names, (0.0,) * 3, (1.0,) * 3, "test")
    monkeypatch.setitem(models.ARCHITECTURES, "planted-spot", lambda n, c: FixedSpotBackdoor())
    meta = ModelMeta("planted-spot", CLASSES, 3, (SIZE, SIZE), (0.0,) * 3, (1.0,) * 3, "synth-spot")
    truth = GroundTruth("bw:170", checker_pattern(), TARGET, WHERE)
    return save_model(tmp_path / "model", FixedSpotBackdoor(), meta, ground_truth=truth)


SEARCH = dict(
    target=TARGET,
    betas="0.8,0.5",
    steps=6,
    batch_size=16,
    hidden=16,
    stats_every=3,
    sample_every=3,
    n_eval_triggers=8,
    eval_images=32,
    samples=64,
    scan_images=8,
    device="cpu",
    precision="fp32",
)


def search_spec(model: Path, **overrides):
    from engine.specs import build_spec

    return build_spec("mesa", overrides={"model": str(model), **SEARCH, **overrides})


def detect_spec(model: Path, **overrides):
    from engine.specs import build_spec

    values = {k: v for k, v in SEARCH.items() if k not in ("target", "betas", "samples")}
    values = {k: v for k, v in values.items() if k not in ("stats_every", "sample_every")}
    return build_spec("detect", overrides={"model": str(model), **values, "beta": 0.8, **overrides})


def test_the_ideal_stamps_where_the_fixed_position_attack_stamped(spot_model, tmp_path):
    from engine.tasks.defend import run

    result = run(defend_spec(spot_model, residual_steps=0), MemoryReporter(tmp_path / "ideal"))
    assert result.extra["positions"] == WHERE
    assert result.metrics["before/asr"] > 0.9
    assert result.metrics["eval/asr"] < 0.1  # the trigger unlearnt at its one place


def test_the_scans_valid_probes_join_the_mesa_repair_without_ground_truth(spot_model, tmp_path):
    from engine.tasks import mesa
    from engine.tasks.defend import run

    search = mesa.run(search_spec(spot_model), MemoryReporter(tmp_path / "search")).artifact
    settings = dict(method="mesa", search=search, residual_steps=0, probe_share=0.5)
    mixed = run(defend_spec(spot_model, **settings), MemoryReporter(tmp_path / "a"))
    probes = json.loads((Path(mixed.artifact) / "defense.json").read_text())["probes"]
    assert probes["share"] == 0.5 and probes["valid"], probes
    for beta, success in probes["success"].items():  # the search's rule: own ASR >= beta
        assert all((i in probes["valid"]) >= (s >= float(beta)) for i, s in enumerate(success)), (
            probes
        )
    assert mixed.metrics["mesa/probes_valid"] == len(probes["valid"])
    (spot_model / "ground_truth.json").unlink()
    blind = run(defend_spec(spot_model, **settings), MemoryReporter(tmp_path / "b"))
    assert json.loads((Path(blind.artifact) / "defense.json").read_text())["probes"] == probes
    a, b = _weights(mixed.artifact), _weights(blind.artifact)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the defender never read the truth
    alone = run(
        defend_spec(spot_model, **{**settings, "probe_share": 0.0}), MemoryReporter(tmp_path / "c")
    )
    assert "probes" not in alone.extra
    c = _weights(alone.artifact)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the probes changed the repair


def _count_scans(monkeypatch) -> list[int]:
    import engine.ml.mesa as ml_mesa

    calls: list[int] = []
    real = ml_mesa.scan_positions

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ml_mesa, "scan_positions", counted)
    return calls


def _search_files(artifact: str) -> dict[str, bytes]:
    root = Path(artifact)
    names = ["beta=0.8/positions.npy", "beta=0.8/samples.npy", "beta=0.5/G.safetensors"]
    return {name: (root / name).read_bytes() for name in names}


def test_a_search_reuses_its_detections_scan(spot_model, tmp_path, monkeypatch):
    from engine.tasks import detect, mesa

    scans = _count_scans(monkeypatch)
    found = detect.run(detect_spec(spot_model), MemoryReporter(tmp_path / "detect")).artifact
    recorded = json.loads((Path(found) / "detect.json").read_text())["scan"]["settings"]
    assert recorded["images"] == 8 and recorded["precision"] == "fp32" and len(scans) == 1
    again = mesa.run(search_spec(spot_model), MemoryReporter(tmp_path / "s1"))
    assert len(scans) == 2  # without scan_from: its own scan
    reused = mesa.run(search_spec(spot_model, scan_from=found), MemoryReporter(tmp_path / "s2"))
    assert len(scans) == 2  # no scan forward passes
    assert _search_files(reused.artifact) == _search_files(again.artifact)
    assert reused.metrics == again.metrics
    other = detect.run(detect_spec(spot_model, scan_images=4), MemoryReporter(tmp_path / "d2"))
    mesa.run(search_spec(spot_model, scan_from=other.artifact), MemoryReporter(tmp_path / "s3"))
    assert len(scans) == 4  # another scan setting: the search scans as before
