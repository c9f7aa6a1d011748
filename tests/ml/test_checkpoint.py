"""Checkpoints: the safetensors + JSON format, and a MESA search interrupted and resumed giving
exactly the generators of an uninterrupted one (tiny model, CPU, fp32, seconds)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from engine.errors import Cancelled
from engine.ml import checkpoint as ckpt
from engine.ml.mesa import SearchCheckpoint, search
from engine.reporter import MemoryReporter
from tests.ml.test_mesa import tiny_config, tiny_setup

# 10 steps, statistics every 2, evaluations every 4, checkpoints every 3: the cut after step 5
# resumes from step 3, with a half-filled statistics window (step 3 of the window 3..4).
STEPS, EVERY = 10, 3


def config():
    return tiny_config(steps=STEPS, stats_every=2, sample_every=4)


def run_search(reporter, path=None, resume=False, every=EVERY):
    model, norm, images, labels = tiny_setup()
    checkpoint = SearchCheckpoint(path, resume=resume, every_steps=every) if path else None
    return search(
        model,
        norm,
        images,
        1,
        config(),
        labels=labels,
        reporter=reporter,
        seed=3,
        checkpoint=checkpoint,
    )


def assert_same_search(a, b):
    for ga, gb in zip(a.generators + a.statistics, b.generators + b.statistics, strict=True):
        sa, sb = ga.state_dict(), gb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for xa, xb in zip(a.samples, b.samples, strict=True):
        assert torch.equal(xa, xb)
    assert a.history == b.history
    assert a.pca == b.pca
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        assert a.metrics[k] == pytest.approx(b.metrics[k], nan_ok=True, rel=0, abs=0), k


# ---------------------------------------------------------------------------------------------
# The format


def test_nested_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), betas=(0.5, 0.999))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),  # int keys, tuples, 0-dim tensors
        "stream": torch.Generator().manual_seed(5).get_state(),
        "array": np.arange(4, dtype=np.uint32),
        "nested": [{"a": (1, 2.5, None)}, float("nan"), "text", True],
        "empty": None,
    }
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, "test", state, {"seed": 1})
    assert not list(tmp_path.glob("*.part"))
    back = ckpt.load_checkpoint(path, "test", {"seed": 1})
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(back["optimizer"])
    assert fresh.state_dict()["param_groups"][0]["betas"] == (0.5, 0.999)
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"]
    )
    assert torch.equal(back["stream"], state["stream"]) and back["stream"].dtype == torch.uint8
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [0, 1, 2, 3]
    assert back["nested"][0] == {"a": (1, 2.5, None)} and np.isnan(back["nested"][1])
    assert back["nested"][2:] == ["text", True] and back["empty"] is None


def test_global_random_state_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    path = tmp_path / "rng.safetensors"
    ckpt.save_checkpoint(path, "rng", {"rng": ckpt.global_rng_state()})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_global_rng_state(ckpt.load_checkpoint(path, "rng")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def forbid_unpickling(monkeypatch):
    """Any unpickling from here on fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.mark.parametrize("content", ["garbage", "pickle", "truncated"])
def test_damaged_or_foreign_files_are_refused_in_one_line(tmp_path, content, monkeypatch):
    path = tmp_path / "c.safetensors"
    if content == "pickle":
        torch.save({"model": torch.zeros(2)}, path)  # a torch pickle where a checkpoint belongs
    elif content == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint" * 50)
    else:
        ckpt.save_checkpoint(path, "test", {"x": torch.zeros(100)})
        path.write_bytes(path.read_bytes()[:-40])
    forbid_unpickling(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="damaged|not a mesa-tui") as info:
        ckpt.load_checkpoint(path, "test")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_other_kind_settings_or_format_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, "mesa-search", {"x": 1}, {"seed": 1})
    with pytest.raises(ckpt.CheckpointError, match="not a defend-repair state"):
        ckpt.load_checkpoint(path, "defend-repair", {"seed": 1})
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(seed\)$"):
        ckpt.load_checkpoint(path, "mesa-search", {"seed": 2})
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(precision, seed\)$"):
        ckpt.load_checkpoint(path, "mesa-search", {"seed": 2, "precision": "bf16"})
    hashed = tmp_path / "h.safetensors"  # a fingerprint that is not a mapping: no names
    ckpt.save_checkpoint(hashed, "mesa-search", {"x": 1}, "abc")
    with pytest.raises(ckpt.CheckpointError, match=r"other settings$"):
        ckpt.load_checkpoint(hashed, "mesa-search", "abd")
    plain = tmp_path / "weights.safetensors"  # safetensors, but not a checkpoint
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ckpt.CheckpointError, match="not a mesa-tui checkpoint"):
        ckpt.load_checkpoint(plain, "mesa-search")
    reporter = MemoryReporter(tmp_path / "r")
    assert ckpt.load_or_none(plain, "mesa-search", None, reporter) is None
    assert (
        reporter.lines[-1][0] == "warning"
        and "starting from the beginning" in reporter.lines[-1][1]
    )
    assert ckpt.load_or_none(tmp_path / "missing", "mesa-search", None, reporter) is None


def test_cadence_by_steps_and_by_cost(monkeypatch):
    by_steps = ckpt.Cadence(every_steps=3)
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    clock = [100.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock[0])
    by_time = ckpt.Cadence(every_s=60.0)
    clock[0] += 59
    assert not by_time.due(1)
    clock[0] += 2
    assert by_time.due(2)
    by_time.wrote(3.0)  # a 3 s write: the next no sooner than 150 s later (2 %)
    clock[0] += 100
    assert not by_time.due(3)
    clock[0] += 51
    assert by_time.due(4)


# ---------------------------------------------------------------------------------------------
# The search


def test_interrupted_search_resumes_to_exactly_the_same_generators(tmp_path):
    whole_reporter = MemoryReporter(tmp_path / "whole")
    whole = run_search(whole_reporter)

    path = tmp_path / "cut" / "search.safetensors"
    first = MemoryReporter(tmp_path / "cut", stop_after=5)  # stops before step 6
    with pytest.raises(Cancelled):
        run_search(first, path)
    assert path.exists() and not list(path.parent.glob("*.part"))
    torch.manual_seed(12345)  # the global stream is part of the checkpoint, not of this process
    resumed_reporter = MemoryReporter(tmp_path / "cut", resume=True)
    resumed = run_search(resumed_reporter, path, resume=True)
    assert any("resumed from the checkpoint at step 3" in m for _, m in resumed_reporter.lines)
    assert_same_search(whole, resumed)

    # The resumed attempt logs only steps after the checkpoint; joined per key at the resumed
    # attempt's first step, the two attempts give exactly the uninterrupted series.
    assert min(s for s, _, _ in resumed_reporter.metrics) == 4  # the first log after step 3
    for key in {k for _, k, _ in whole_reporter.metrics}:
        later = resumed_reporter.series(key)
        cut = later[0][0] if later else STEPS + 1
        joined = [p for p in first.series(key) if p[0] < cut] + later
        expected = whole_reporter.series(key)
        assert [s for s, _ in joined] == [s for s, _ in expected], key
        assert np.allclose([v for _, v in joined], [v for _, v in expected], equal_nan=True), key
    pairs = [(s, k) for s, k, _ in resumed_reporter.metrics]
    assert len(pairs) == len(set(pairs))  # no (key, step) twice within the resumed attempt


def test_without_resume_the_checkpoint_is_ignored(tmp_path):
    path = tmp_path / "cut" / "search.safetensors"
    with pytest.raises(Cancelled):
        run_search(MemoryReporter(tmp_path / "cut", stop_after=7), path)
    again = MemoryReporter(tmp_path / "cut")
    result = run_search(again, path, resume=False)
    assert min(s for s, _, _ in again.metrics) <= 2
    assert_same_search(run_search(MemoryReporter(tmp_path / "whole")), result)


@pytest.mark.parametrize("content", ["garbage", "pickle", "foreign"])
def test_damaged_or_foreign_checkpoint_restarts_cleanly(tmp_path, content, monkeypatch):
    path = tmp_path / "cut" / "search.safetensors"
    path.parent.mkdir(parents=True)
    if content == "pickle":
        torch.save({"trainer": {}}, path)
    elif content == "garbage":
        path.write_bytes(b"{}" * 100)
    else:  # a whole checkpoint of another search (other betas)
        model, norm, images, labels = tiny_setup()
        with pytest.raises(Cancelled):
            search(
                model,
                norm,
                images,
                1,
                tiny_config(betas=(0.7,), steps=STEPS),
                labels=labels,
                reporter=MemoryReporter(tmp_path / "other", stop_after=5),
                checkpoint=SearchCheckpoint(path, every_steps=2),
            )
    whole = run_search(MemoryReporter(tmp_path / "whole"))
    forbid_unpickling(monkeypatch)
    reporter = MemoryReporter(tmp_path / "cut", resume=True)
    result = run_search(reporter, path, resume=True)
    warnings = [m for level, m in reporter.lines if level == "warning"]
    assert len(warnings) == 1 and "starting from the beginning" in warnings[0]
    assert str(path) in warnings[0]
    assert_same_search(whole, result)


def test_stop_is_still_checked_between_steps_with_checkpoints(tmp_path):
    reporter = MemoryReporter(tmp_path, stop_after=4)
    with pytest.raises(Cancelled):
        run_search(reporter, tmp_path / "c.safetensors", every=1)
    assert max(s for s, _, _ in reporter.metrics) == 4
