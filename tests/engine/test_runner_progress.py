"""The runner's progress events carry the stage's start, which the jobs table's ETA needs."""

from __future__ import annotations

import threading

import pytest

from engine import runner


class Stream:
    def __init__(self):
        self.broken = threading.Event()
        self.events = []

    def send(self, event):
        self.events.append(event)


@pytest.fixture
def reporter(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "PROGRESS_INTERVAL_S", 0.0)
    clock = {"t": 1000.0}
    monkeypatch.setattr(runner.time, "time", lambda: clock["t"])
    stream = Stream()
    r = runner.RunnerReporter(stream, tmp_path, False, threading.Event(), threading.Event())
    return r, stream, clock


def started(reporter, clock, stage, done, at):
    r, stream, _ = reporter
    clock["t"] = at
    r.progress(stage, done, 100, {})
    return stream.events[-1]["started"]


def test_a_stage_seen_from_step_zero_started_when_first_seen(reporter):
    _, _, clock = reporter
    assert started(reporter, clock, "train", 0, 1000.0) == 1000.0
    assert started(reporter, clock, "train", 10, 1010.0) == 1000.0
    assert started(reporter, clock, "eval", 0, 1020.0) == 1020.0  # a new stage starts anew


def test_a_resumed_stage_is_extrapolated_back_from_its_pace(reporter):
    _, _, clock = reporter
    assert started(reporter, clock, "train", 40, 1000.0) is None  # pace unknown yet
    # 10 steps in 20 s: 2 s a step, so 50 steps done means it would have started 100 s ago.
    assert started(reporter, clock, "train", 50, 1020.0) == pytest.approx(920.0)
    assert started(reporter, clock, "train", 60, 1040.0) == pytest.approx(920.0)
