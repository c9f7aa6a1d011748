"""The store's disk fills up while the engine writes (simulated with SQLite's
``PRAGMA max_page_count`` on the engine's connections): the engine keeps its buffered events and
the finished run's ending, says so in one log line, and writes them all once space returns;
nothing stored before is lost and nothing is written twice."""

from __future__ import annotations

import logging
import sqlite3
import threading

from sqlalchemy import event

from engine.daemon import Engine, EngineConfig
from store.entities import NewJob
from store.repository import Store
from tests.engine.helpers import pid_alive, wait_for

STEPS, KEYS = 60, 20


def page_count(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()


def stored_points(path, job_id: int) -> list[tuple[str, int, float]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT m.key, m.step, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
            "WHERE r.job_id = ? AND m.key LIKE 'count/%' ORDER BY m.key, m.step",
            (job_id,),
        ).fetchall()
    finally:
        conn.close()


def test_a_full_disk_keeps_the_events_and_loses_nothing(tmp_path, monkeypatch, caplog):
    path = tmp_path / "mesa.db"
    url = f"sqlite:///{path}"
    monkeypatch.setenv("MESA_TUI_DB", url)
    monkeypatch.setenv("MESA_TUI_TASK_MODULES", "count=tests.engine.counting_task")
    caplog.set_level(logging.INFO, logger="mesa")
    store = Store(url)
    spec = {"steps": STEPS, "step_s": 0.1, "keys": KEYS, "checkpoint_every": 1000}
    (job,) = store.submit([NewJob("count", spec, "full-disk")])

    engine_store = Store(url)
    cap: dict[str, int | None] = {"pages": None}

    @event.listens_for(engine_store.engine, "connect")
    def _limit(dbapi_connection, _record) -> None:
        if cap["pages"]:
            dbapi_connection.execute(f"PRAGMA max_page_count = {cap['pages']}")

    def fill_disk(pages: int | None) -> None:
        cap["pages"] = pages
        engine_store.engine.dispose()  # the engine's next connections get the limit (or not)

    engine = Engine(EngineConfig(cpu_slots=1, heartbeat_every_s=0.5), store=engine_store)
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(stored_points(path, job)) >= KEYS, timeout=60, what="first points")
        fill_disk(page_count(path))
        before = stored_points(path, job)
        (run,) = store.runs(job)
        child = int(run.external_id)
        wait_for(lambda: not pid_alive(child), timeout=60, what="the child to finish")
        wait_for(
            lambda: any("cannot grow" in r.getMessage() for r in caplog.records),
            timeout=30,
            what="the full-disk line in the engine's log",
        )
        wait_for(lambda: engine.active and not engine.active[run.id].events.empty(), timeout=10)
        # The run's last events and its ending wait in the engine; nothing stored went away.
        assert store.job(job).status == "running"
        held = stored_points(path, job)
        assert set(before) <= set(held) and len(held) < STEPS * KEYS
        line = next(r.getMessage() for r in caplog.records if "cannot grow" in r.getMessage())
        assert str(path) in line and "event(s) held, retrying" in line and "\n" not in line
        assert sum("cannot grow" in r.getMessage() for r in caplog.records) <= 3  # no flood

        fill_disk(None)  # space returns
        wait_for(lambda: store.job(job).status == "succeeded", timeout=60, what="the ending")
    finally:
        engine.request_stop()
        thread.join(30)
        engine_store.close()
    points = stored_points(path, job)
    assert len(points) == STEPS * KEYS == len(set(points))  # every point, once
    for key in range(KEYS):
        steps = [s for k, s, _ in points if k == f"count/k{key}"]
        assert steps == list(range(STEPS))
    assert set(before) <= set(points)
    messages = [e.message for e in store.logs(job_id=job)]
    assert len(messages) == len(set(messages))  # no log line written twice
    assert store.artifacts(job) and len(store.artifacts(job)) == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    store.close()
