"""The runner's metric journal (every batch in the work directory before it is sent, replayed
by a resumed attempt) and the parsing of the test-only crash points."""

from __future__ import annotations

import json
import math
import threading

import pytest

from engine import crashpoints, runner


class Stream:
    def __init__(self):
        self.broken = threading.Event()
        self.events = []

    def send(self, event):
        self.events.append(event)


def reporter(workdir, resume, crash=None):
    stream = Stream()
    r = runner.RunnerReporter(stream, workdir, resume, threading.Event(), threading.Event(), crash)
    return r, stream


def test_batches_are_journaled_before_they_are_sent_and_a_resume_replays_them(tmp_path):
    class Spy:
        def journaled(self, points):
            lines = (tmp_path / runner.JOURNAL).read_text().splitlines()
            assert lines[-1] == json.dumps(points, separators=(",", ":"))  # journaled already
            assert not any(e["points"] == points for e in stream.events)  # not sent yet

    first, stream = reporter(tmp_path, False, Spy())
    first.log({"a": 1.0, "b": math.nan}, 0)
    first.flush()
    first.log({"a": 2.0}, 1)
    first.flush()
    first.close()
    assert [e["points"][0][:3] for e in stream.events] == [["a", 0, 1.0], ["a", 1, 2.0]]

    second, stream = reporter(tmp_path, True)
    assert second.replay() == 3
    (event,) = stream.events
    assert event["replay"] is True
    assert [p[:2] for p in event["points"]] == [["a", 0], ["b", 0], ["a", 1]]
    assert math.isnan(event["points"][1][2])
    second.log({"a": 3.0}, 2)
    second.flush()
    second.close()
    assert len((tmp_path / runner.JOURNAL).read_text().splitlines()) == 3  # appended

    fresh, stream = reporter(tmp_path, False)  # a first attempt starts it empty
    assert fresh.replay() == 0 and stream.events == []
    fresh.close()


def test_a_line_cut_by_a_kill_is_dropped_and_the_replay_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "REPLAY_POINTS", 4)
    lines = [
        json.dumps([["k", s, float(s), 0.0] for s in range(i * 3, i * 3 + 3)]) for i in range(3)
    ]
    (tmp_path / runner.JOURNAL).write_text("\n".join(lines) + '\n[["k", 9, 9.0')
    r, stream = reporter(tmp_path, True)
    assert r.replay() == 9
    assert [len(e["points"]) for e in stream.events] == [6, 3]
    assert [p[1] for e in stream.events for p in e["points"]] == list(range(9))
    r.log({"k": 9.0}, 9)
    r.flush()
    r.close()
    journal = (tmp_path / runner.JOURNAL).read_text().splitlines()
    assert len(journal) == 4 and json.loads(journal[-1])[0][:3] == ["k", 9, 9.0]


def test_the_journal_is_not_counted_in_an_artifacts_bytes(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / runner.JOURNAL).write_text("x" * 100)
    assert runner.artifact_identity(tmp_path)[1] == 2


def test_crash_points_parse_and_refuse_bad_values():
    assert crashpoints.parse("engine-received:7") == crashpoints.CrashPoint("engine-received", 7)
    point = crashpoints.parse("both:job")
    assert point.per_job and point.hits(5, 5, {"t": "log"}) and not point.hits(4, 5, {})
    assert crashpoints.parse("child-sent:job+40").hits(45, 5, {})
    keyed = crashpoints.parse("child-journaled:key=eval/acc_clean")
    assert keyed.hits(1, 1, {"t": "metrics", "points": [["eval/acc_clean", 4, 0.5, 0.0]]})
    assert not keyed.hits(1, 1, {"t": "metrics", "points": [["train/loss", 4, 0.5, 0.0]]})
    at = crashpoints.parse("both:key=mesa/beta=0.9/hinge@4")
    assert (at.key, at.step) == ("mesa/beta=0.9/hinge", 4)
    assert at.hits(9, 1, {"t": "metrics", "points": [["mesa/beta=0.9/hinge", 4, 0.1, 0.0]]})
    assert not at.hits(9, 1, {"t": "metrics", "points": [["mesa/beta=0.9/hinge", 2, 0.1, 0.0]]})
    for bad in ("engine-received", "explode:3", "child-sent:0", "child-sent:x"):
        with pytest.raises(ValueError, match="MESA_TUI_TEST_CRASH"):
            crashpoints.parse(bad)


def test_only_a_first_attempt_of_a_child_mode_gets_a_crash_point(monkeypatch):
    crashpoints.configured.cache_clear()
    monkeypatch.setenv(crashpoints.ENV, "child-sent:job")
    try:
        assert crashpoints.child_side({"attempt": 1, "job_id": 3}).job_id == 3
        assert crashpoints.child_side({"attempt": 2, "job_id": 3}) is None
        assert crashpoints.engine_side(None) is None
    finally:
        crashpoints.configured.cache_clear()
