"""The repository: requests, claiming with dependencies, attempts, metrics and reads."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from engine.errors import UserError
from store.entities import NewJob, to_json
from store.repository import RunEvents, Store, utcnow


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def claim(store, engine_id, n=4):
    return store.claim_jobs(
        engine_id,
        n,
        host="here",
        executor="local",
        code_version="test",
        workdir_for=lambda kind, job_id: f"/tmp/{kind}-{job_id}",
        startup_grace_s=60,
    )


def points(run, job, steps, value=1.0):
    events = RunEvents(run, job)
    events.metrics = [("train/loss", s, value, time.time()) for s in steps]
    return events


def pipeline(store):
    return store.submit(
        [
            NewJob("train", {"seed": 0}, "a", label="train"),
            NewJob("mesa", {"model": "job:#0"}, "b", depends_on=(("#0", "model"),)),
            NewJob(
                "defend", {"model": "job:#0"}, "c", depends_on=(("#0", "model"), ("#1", "search"))
            ),
        ]
    )


def test_dependencies_gate_claiming_and_failures_cascade(store):
    engine = store.register_engine("here", 1, "test", 2)
    train, mesa, defend = pipeline(store)
    claimed = claim(store, engine.id)
    assert [c.job_id for c in claimed] == [train]
    assert claimed[0].workdir == f"/tmp/train-{train}" and not claimed[0].resume
    store.finish_run(claimed[0].run_id, "failed", error="boom")
    assert store.job(mesa).status == "cancelled"
    assert store.job(defend).error == f"upstream job {train} failed"
    assert claim(store, engine.id) == []
    with pytest.raises(UserError, match=f"retry job {train} instead"):
        store.retry(mesa)
    store.retry(train)
    assert {store.job(j).status for j in (train, mesa, defend)} == {"queued"}


def test_inputs_are_passed_by_reference(store):
    engine = store.register_engine("here", 1, "test", 2)
    train, mesa, _ = pipeline(store)
    first = claim(store, engine.id)[0]
    events = RunEvents(first.run_id, first.job_id)
    events.artifacts = [("/tmp/model-dir", "model", "ab" * 32, 10)]
    store.record_events([events])
    store.finish_run(
        first.run_id, "succeeded", result={"artifact": "/tmp/model-dir", "metrics": {}}
    )
    second = claim(store, engine.id)
    assert [c.job_id for c in second] == [mesa]
    assert second[0].inputs == {"model": train}
    assert store.upstream_artifact(train).path == "/tmp/model-dir"


def test_lost_attempts_retry_and_join_at_the_checkpoint(store):
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit([NewJob("train", {"seed": 3}, "a", max_attempts=2)])
    first = claim(store, engine.id)[0]
    store.record_events([points(first.run_id, job, range(10))])
    # Written again (a flush the engine retried): the last write of a (key, step) wins.
    store.record_events([points(first.run_id, job, range(10), value=9.0)])
    assert store.mark_lost([first.run_id], "missed its check-in")[0].status == "queued"
    second = claim(store, engine.id)[0]
    assert second.resume and second.attempt == 2
    setup = RunEvents(second.run_id, job)
    setup.metrics = [("info/params_m", 0, 0.3, time.time())]  # logged again at every start
    store.record_events([setup])
    store.record_events([points(second.run_id, job, range(6, 12), value=2.0)])
    series = store.metric_series(job, "train/loss")
    assert [p.step for p in series] == list(range(12))
    assert [p.attempt for p in series] == [1] * 6 + [2] * 6
    assert {p.value for p in series if p.attempt == 1} == {9.0}
    assert len(store.metrics_since([first.run_id])) == 10
    assert store.mark_lost([second.run_id], "missed")[0].status == "lost"
    detail = store.job_detail(job)
    assert [r.status for r in detail.runs] == ["lost", "lost"]
    assert detail.runs[0].seed == 3


def test_a_resumed_attempt_that_replays_its_journal_holds_the_whole_series(store):
    """The engine's retry replays the journal (every point the lost attempt computed, some of
    which never reached the store) before computing the steps after its checkpoint again: the
    job's series is then the last attempt's alone, each step once, recomputed values winning."""
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit([NewJob("train", {"seed": 3}, "a", max_attempts=3)])
    first = claim(store, engine.id)[0]
    store.record_events([points(first.run_id, job, range(4))])  # steps 4..11 never arrived
    store.mark_lost([first.run_id], "its engine died")
    second = claim(store, engine.id)[0]
    replay = RunEvents(second.run_id, job)
    replay.replayed = [("train/loss", s, 1.0, time.time()) for s in range(12)]
    store.record_events([replay])
    assert store.runs(job)[1].start_step is None  # replayed points do not say where it resumed
    # The checkpoint was at step 9: the retry computes 10 and 11 again, then goes on.
    store.record_events([points(second.run_id, job, range(10, 15), value=2.0)])
    run = store.runs(job)[1]
    assert run.start_step == 10
    series = store.metric_series(job, "train/loss")
    assert [p.step for p in series] == list(range(15))
    assert {p.attempt for p in series} == {2}
    assert [p.value for p in series] == [1.0] * 10 + [2.0] * 5
    columns = store.metric_series_columns(job).series["train/loss"]
    assert columns.steps == list(range(15)) and columns.values == [p.value for p in series]
    assert columns.count == 15
    assert store.metric_tail([job], "train/loss", 6) == {job: [1.0] + [2.0] * 5}
    assert store.job(job).latest == {"train/loss": 2.0}
    # A batch holding a (key, step) twice keeps its last point (one statement on PostgreSQL).
    twice = points(second.run_id, job, [20])
    twice.metrics.append(("train/loss", 20, 3.0, time.time()))
    store.record_events([twice])
    assert store.metric_series(job, "train/loss")[-1].value == 3.0


def test_cancel_queued_and_running(store):
    engine = store.register_engine("here", 1, "test", 1)
    a, b = store.submit([NewJob("train", {}, "a"), NewJob("train", {}, "b")])
    run = claim(store, engine.id, 1)[0]
    assert store.request_cancel(b).status == "cancelled"
    assert store.request_cancel(a).cancel_requested
    assert store.cancel_requests(engine.id) == [(a, run.run_id)]
    store.finish_run(run.run_id, "cancelled", error="cancelled by request")
    assert store.job(a).status == "cancelled"


def test_unknown_ids_and_bad_filters_are_user_errors(store):
    with pytest.raises(UserError, match="job 42 does not exist"):
        store.job(42)
    with pytest.raises(UserError, match="status 'done' is unknown"):
        store.list_jobs(status="done")
    with pytest.raises(UserError, match="only failed, cancelled or lost"):
        store.retry(store.submit([NewJob("train", {}, "a")])[0])


def test_changed_since_and_metric_cursor(store):
    engine = store.register_engine("here", 1, "test", 1)
    a, b = store.submit([NewJob("train", {}, "a"), NewJob("train", {}, "b")])
    cursor = max(j.updated_at for j in store.list_jobs())
    assert store.list_jobs(changed_since=cursor) == []
    run = claim(store, engine.id, 1)[0]
    assert [j.id for j in store.list_jobs(changed_since=cursor)] == [a]
    store.record_events([points(run.run_id, a, range(5))])
    got = store.metrics_since([run.run_id])
    assert [p.step for p in got] == list(range(5))
    store.record_events([points(run.run_id, a, range(5, 8))])
    assert [p.step for p in store.metrics_since([run.run_id], after_id=got[-1].id)] == [5, 6, 7]
    assert store.job(a).latest == {"train/loss": 1.0}


def test_delete_refuses_active_jobs_and_returns_paths(store):
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit([NewJob("train", {}, "a")])
    run = claim(store, engine.id)[0]
    with pytest.raises(UserError, match="cancel it first"):
        store.delete_job(job)
    events = points(run.run_id, job, range(3))
    events.artifacts = [("/tmp/art", "model", None, None)]
    store.record_events([events])
    store.finish_run(run.run_id, "succeeded", result={"artifact": "/tmp/art", "metrics": {}})
    assert store.delete_job(job) == ["/tmp/art", f"/tmp/train-{job}"]
    with pytest.raises(UserError):
        store.job(job)


def test_stale_runs_include_dead_engines(store):
    engine = store.register_engine("here", 1, "test", 1)
    store.submit([NewJob("train", {}, "a")])
    run = claim(store, engine.id)[0]
    assert store.stale_runs() == []
    assert [r.id for r in store.stale_runs(now=utcnow() + timedelta(seconds=120))] == [run.run_id]
    assert [r.id for r in store.stale_runs(dead_engine_ids=[engine.id])] == [run.run_id]


def test_study_summary_with_paper_numbers(store):
    params = {
        "methods": ["ideal", "mesa"],
        "paper": {"ideal": {"mean": 0.024, "worst": 0.037}},
        "protocol_notes": ["small model"],
    }
    study_id, ids = store.create_study(
        "s",
        "cpu-mini",
        params,
        [
            NewJob("train", {}, "t", role="train", trigger="bw:170", seed=0),
            NewJob("defend", {}, "d1", role="defend", trigger="bw:170", method="ideal", seed=0),
            NewJob("defend", {}, "d2", role="defend", trigger="bw:170", method="mesa", seed=0),
        ],
    )
    engine = store.register_engine("here", 1, "test", 3)
    for c in claim(store, engine.id):
        asr = {ids[0]: 0.99, ids[1]: 0.02, ids[2]: 0.03}[c.job_id]
        store.finish_run(
            c.run_id, "succeeded", result={"metrics": {"eval/asr": asr, "eval/acc_clean": 0.8}}
        )
    summary = store.study_summary("s")
    rows = {r.method: r for r in summary.rows}
    assert list(rows) == ["before repair", "ideal", "mesa"]
    assert rows["ideal"].asr_mean == pytest.approx(0.02) and rows["ideal"].paper_asr_mean == 0.024
    assert summary.protocol_notes == ("small model",)
    assert to_json(summary)["study"]["name"] == "s"
    with pytest.raises(UserError, match="already exists"):
        store.create_study("s", "cpu-mini", {}, [])


def test_concurrent_claims_are_disjoint(store):
    """Four claimers at once (threads, one connection each) take every job exactly once:
    ``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL."""
    import threading

    engines = [store.register_engine("here", i, "test", 3).id for i in range(4)]
    jobs = store.submit([NewJob("train", {"seed": i}, f"h{i}") for i in range(40)])
    taken: list[list[int]] = [[] for _ in engines]

    def claimer(k: int) -> None:
        while batch := claim(store, engines[k], 3):
            taken[k] += [c.job_id for c in batch]

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [j for batch in taken for j in batch]
    assert sorted(everything) == sorted(jobs)
    assert all(len(store.runs(j)) == 1 for j in jobs)


def test_nan_points_are_dropped_and_said_without_losing_the_batch(store):
    engine = store.register_engine("here", 1, "test", 1)
    (job,) = store.submit([NewJob("defend", {"seed": 1}, "a")])
    run = claim(store, engine.id)[0]
    events = points(run.run_id, job, range(4))
    events.metrics[1] = ("train/loss", 1, float("nan"), time.time())
    events.metrics[2] = ("train/loss", 2, float("nan"), time.time())
    events.metrics.append(("train/grad", 0, float("inf"), time.time()))
    events.logs = [("info", "step line", time.time())]
    store.record_events([events])
    assert [p.step for p in store.metric_series(job, "train/loss")] == [0, 3]
    assert [p.value for p in store.metric_series(job, "train/grad")] == [float("inf")]
    messages = [e.message for e in store.logs(job)]
    assert "step line" in messages
    assert [m for m in messages if "NaN" in m] == [
        "metric train/loss was NaN at step 1; NaN points are not stored"
    ]


def test_notes_and_tags_are_found_by_the_text_filter(store):
    a, b = store.submit([NewJob("train", {}, "a", label="point bw:85"), NewJob("train", {}, "b")])
    cursor = max(j.updated_at for j in store.list_jobs())
    job = store.set_note(a, "  lr too high, rerun with 0.01 ")
    assert job.note == "lr too high, rerun with 0.01"
    assert store.tag(b, ["Baseline", "paper", "paper"]).tags == ("Baseline", "paper")
    assert store.tag(b, remove=["paper"]).tags == ("Baseline",)
    assert {j.id for j in store.list_jobs(changed_since=cursor)} == {a, b}  # the app sees them
    assert [j.id for j in store.list_jobs(text="LR TOO")] == [a]
    assert [j.id for j in store.list_jobs(text="basel")] == [b]
    assert [j.id for j in store.list_jobs(text="bw:85")] == [a]  # the label too
    assert store.list_jobs(text="100%") == []  # % is literal
    assert store.job_ids(text="baseline") == [b]
    assert store.set_note(a, "").note is None
    with pytest.raises(UserError, match="'two words' is not one word"):
        store.tag(a, ["two words"])


def test_the_heartbeat_carries_the_hosts_system(store):
    engine = store.register_engine("here", 1, "test", 2)
    assert engine.system is None
    system = {
        "cpus": 2,
        "cpu_pct": 50.0,
        "mem_used_mb": 1000.0,
        "mem_total_mb": 4000.0,
        "slots": [{"slot": 0, "gpu": None, "job_id": 3, "cpu_pct": 99.0, "rss_mb": 500.0}],
    }
    beat = store.engine_heartbeat(engine.id, 1, [], system)
    assert beat.system.cpus == 2 and beat.system.slots[0].job_id == 3
    assert store.engines()[0].system == beat.system


def test_jobs_carry_their_trigger_and_target_from_the_spec_or_their_upstream_job(store):
    """Stored at insert and read back as fields: an attack's from its spec, a search or repair
    inherits its model's (in a later submission too), its own spec's target first; a clean model
    and a repair of a model given by path name none, whatever their labels say."""
    attack, clean = store.submit(
        [
            NewJob("train", {"trigger": "bw:85", "target": 3}, "a", label="x"),
            NewJob("train", {"trigger": None, "target": 0}, "b", label="attack bw:7 -> 0"),
        ]
    )
    mesa, repair, told = store.submit(
        [
            NewJob("mesa", {"model": f"job:{attack}"}, "c", depends_on=((attack, "model"),)),
            NewJob(
                "defend",
                {"model": f"job:{attack}", "search": "job:#0", "target": None},
                "d",
                depends_on=((attack, "model"), ("#0", "search")),
            ),
            NewJob(
                "defend",
                {"model": f"job:{attack}", "target": 5},
                "e",
                depends_on=((attack, "model"),),
            ),
        ]
    )
    (by_path,) = store.submit([NewJob("defend", {"model": "/m"}, "f", label="point bw:7 -> 0")])
    found = {s.id: (s.trigger, s.target) for s in store.list_jobs()}
    assert found[attack] == ("bw:85", 3) and found[clean] == (None, None)
    assert found[mesa] == found[repair] == ("bw:85", 3) and found[told] == ("bw:85", 5)
    assert found[by_path] == (None, None)
    assert to_json(store.job(repair))["trigger"] == "bw:85"
    job_id, _ = store.start_foreground(
        "train", {"trigger": "color:3", "target": 1}, "g", label="", host="h", pid=1,
        code_version="t",
    )  # fmt: skip
    assert (store.job(job_id).trigger, store.job(job_id).target) == ("color:3", 1)
