"""Key-press-to-screen latency of the terminal app, idle and under streaming load.

The app runs headless under Pilot with the run screen of a job open (Curves tab, its history
loaded: ``--points / --jobs`` points, 250,000 by default, read downsampled in one go). Each
measured key switches a tab; the latency is the time from the key press to the first frame that
shows the new tab. The reference is measured in the same run with nothing streaming; the load is
``--jobs`` jobs streaming ``--rate`` metric points per second each while the store holds
``--points`` points. At the end the open run's curves must stand for every point streamed to it
(batches are never dropped). Opening the run is timed too, with a reference from the same run:
reading every point of the run row by row, as the run screen did before it read a downsampled
history (the reads alone, without the UI's work on them).

    python benchmarks/tui_responsiveness.py            # FakeSource, 1,000,000 points
    python benchmarks/tui_responsiveness.py --source store --points 200000   # real SQLite store

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYS = ("2", "1", "3", "1", "5", "1", "4", "1", "6", "1")
TAB_OF_KEY = {
    "1": "curves",
    "2": "triggers",
    "3": "embedding",
    "4": "params",
    "5": "log",
    "6": "artifacts",
}


def build_fake(points: int, jobs: int):
    from mesa_tui.demo import FakeSource

    source = FakeSource()
    per_job = points // jobs
    job_ids = []
    for j in range(jobs):
        job_id = source.add_job(
            "train", "running", spec={"kind": "train", "trigger": f"bw:{j}"}, progress=0.5
        )
        run_id = source.run_ids(job_id)[0]
        steps = np.arange(per_job // 2, dtype=np.int64)
        source.bulk_metrics(run_id, "train/loss", steps, 1 / (1 + steps / 1000))
        source.bulk_metrics(run_id, "train/acc", steps, 1 - 1 / (1 + steps / 1000))
        job_ids.append(job_id)

    def stream(job_id: int, step: int) -> None:
        source.log_metrics(source.run_ids(job_id)[0], step, {"train/loss": 1 / (1 + step / 1000)})

    def sent_to(job_id: int) -> int:
        run_id = source.run_ids(job_id)[0]
        return len(source._metrics[run_id])

    return source, job_ids, stream, sent_to, per_job // 2


def build_store(points: int, jobs: int):
    from mesa_tui.source import StoreSource
    from store.repository import RunEvents, Store

    store = Store()
    per_job = points // jobs
    job_ids, runs = [], {}
    for j in range(jobs):
        job_id, run_id = store.start_foreground(
            "train",
            {"kind": "train", "trigger": f"bw:{j}"},
            "0" * 64,
            label=f"bw:{j}",
            host="bench",
            pid=os.getpid(),
            code_version="bench",
        )
        job_ids.append(job_id)
        runs[job_id] = run_id
        for start in range(0, per_job // 2, 20_000):
            events = RunEvents(run_id, job_id)
            now = time.time()
            for step in range(start, min(start + 20_000, per_job // 2)):
                events.metrics.append(("train/loss", step, 1 / (1 + step / 1000), now))
                events.metrics.append(("train/acc", step, 1 - 1 / (1 + step / 1000), now))
            store.record_events([events])

    def sent_to(job_id: int) -> int:
        return stored_points(store, [runs[job_id]])

    return StoreSource(store), job_ids, runs, sent_to, per_job // 2


def stored_points(store, run_ids: list[int]) -> int:
    """How many points these runs have in the store (a count, not a read of every row)."""
    from sqlalchemy import func, select

    from store.repository import metrics_t

    with store.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(metrics_t).where(metrics_t.c.run_id.in_(run_ids))
        ).scalar_one()


def engine_like_writer(url: str, runs: dict[int, int], first_step: int, rate: float) -> None:
    """Run in another process, as the engine is: one batch for all runs every 100 ms, until killed."""
    from store.repository import RunEvents, Store

    store = Store(url)
    step = first_step
    per_tick = max(1, round(rate / 10))
    next_at = time.perf_counter()
    while True:
        batches = []
        now = time.time()
        for job_id, run_id in runs.items():
            events = RunEvents(run_id, job_id)
            for s in range(step, step + per_tick):
                events.metrics.append(("train/loss", s, 1 / (1 + s / 1000), now))
            batches.append(events)
        store.record_events(batches)
        step += per_tick
        next_at += 0.1
        time.sleep(max(0.0, next_at - time.perf_counter()))


class StoreStreamer:
    """The writer process; ``sent`` counts the points it stored (read back from the store)."""

    def __init__(self, source, runs: dict[int, int], first_step: int, rate: float):
        self.source, self.runs = source, runs
        self.args = json.dumps(
            {"url": source.store.url, "runs": runs, "first_step": first_step, "rate": rate}
        )
        self.before = self._stored()
        self.sent = 0

    def _stored(self) -> int:
        return stored_points(self.source.store, list(self.runs.values()))

    def start(self) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, __file__, "--writer", self.args], stdin=subprocess.DEVNULL
        )

    def join(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.sent = self._stored() - self.before


class Streamer(threading.Thread):
    """``jobs`` streams of ``rate`` points per second each, in ticks of 20 ms."""

    def __init__(self, stream, job_ids, first_step: int, rate: float):
        super().__init__(daemon=True)
        self.stream, self.job_ids, self.step, self.rate = stream, job_ids, first_step, rate
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        tick = 1.0 / self.rate
        next_at = time.perf_counter()
        while not self.stop_event.is_set():
            for job_id in self.job_ids:
                self.stream(job_id, self.step)
                self.sent += 1
            self.step += 1
            next_at += tick
            time.sleep(max(0.0, next_at - time.perf_counter()))


def read_every_point(source, job_id: int, page: int = 10_000) -> float:
    """Seconds to read every point of the job's runs in id pages, grouped by key per page."""
    from mesa_tui.widgets.series import MetricColumns

    started = time.perf_counter()
    runs = source.job_detail(job_id).run_ids
    cursor = 0
    while True:
        points = source.metric_points(runs, cursor, page)
        if points:
            MetricColumns(points)
            cursor = points[-1].id
        if len(points) < page:
            return time.perf_counter() - started


async def measure(
    app, pilot, presses: int, by_tab: dict[str, list[float]] | None = None
) -> list[float]:
    """Milliseconds from each key press to the first frame showing the tab it asked for."""
    from textual.widgets import TabbedContent

    tabs = app.screen.query_one("#tabs", TabbedContent)
    shown: dict[str, float] = {}
    original = app._display

    def display(screen, renderable) -> None:
        original(screen, renderable)
        expected = shown.get("want")
        if expected is not None and "at" not in shown and tabs.active == expected:
            shown["at"] = time.perf_counter()
            shown["cpu"] = time.process_time()

    app._display = display
    out: list[float] = []
    cpu: list[float] = []
    for i in range(presses):
        key = KEYS[i % len(KEYS)]
        shown.clear()
        shown["want"] = TAB_OF_KEY[key]
        start = time.perf_counter()
        cpu_start = time.process_time()
        await pilot.press(key)
        while "at" not in shown:
            await asyncio.sleep(0.001)
            if time.perf_counter() - start > 10:
                raise RuntimeError(f"key {key} did not change the screen within 10 s")
        out.append(1000 * (shown["at"] - start))
        cpu.append(1000 * (shown["cpu"] - cpu_start))
        if by_tab is not None:
            by_tab.setdefault(TAB_OF_KEY[key], []).append(out[-1])
        await asyncio.sleep(0.15)  # let polls and redraws interleave with the presses
    app._display = original
    measure.cpu_ms = cpu  # type: ignore[attr-defined]  # CPU time of this process per press
    slowest = sorted(range(len(out)), key=lambda i: -out[i])[:3]
    measure.slowest = [  # type: ignore[attr-defined]
        {"press": i, "tab": TAB_OF_KEY[KEYS[i % len(KEYS)]], "ms": round(out[i], 1),
         "cpu_ms": round(cpu[i], 1)}
        for i in slowest
    ]  # fmt: skip
    return out


class StallSampler(threading.Thread):
    """What the event loop is doing while it is blocked: the loop stamps a heartbeat every 5 ms;
    when the stamp is older than ``stall_ms`` this thread samples the loop thread's stack every
    2 ms and counts the innermost frames of our code and of the libraries under it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_ms: float = 30.0):
        super().__init__(daemon=True)
        self.loop, self.stall_s = loop, stall_ms / 1000
        self.loop_thread = threading.get_ident()
        self.beat = time.perf_counter()
        self.stop_event = threading.Event()
        self.samples: dict[str, int] = {}
        self.total = 0

    def tick(self) -> None:
        self.beat = time.perf_counter()
        if not self.stop_event.is_set():
            self.loop.call_later(0.005, self.tick)

    def run(self) -> None:
        while not self.stop_event.wait(0.002):
            if time.perf_counter() - self.beat < self.stall_s:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                continue
            self.total += 1
            self.samples[self._where(frame)] = self.samples.get(self._where(frame), 0) + 1

    @staticmethod
    def _where(frame) -> str:
        """The innermost frame in mesa_tui, plus the innermost frame of all (file:function)."""
        inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        ours = None
        while frame is not None:
            if "mesa_tui" in frame.f_code.co_filename:
                ours = (
                    f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
                )
                break
            frame = frame.f_back
        return f"{ours or '-'} <- {inner}"

    def watch_gc(self) -> None:
        """Time every garbage collection (a full one walks every live object: a stall)."""
        import gc

        self.gc_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        started: list[float] = []

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started:
                self.gc_ms[info["generation"]].append(1000 * (time.perf_counter() - started[0]))

        gc.callbacks.append(callback)

    def gc_summary(self) -> dict[str, object]:
        return {
            f"gen{g}": {"n": len(ms), "max_ms": round(max(ms, default=0), 1),
                        "total_ms": round(sum(ms), 1)}
            for g, ms in self.gc_ms.items()
        }  # fmt: skip

    def top(self, n: int = 12) -> dict[str, float]:
        """Share of the blocked samples per place (ms at one sample per 2 ms)."""
        ranked = sorted(self.samples.items(), key=lambda kv: -kv[1])[:n]
        return {where: 2 * count for where, count in ranked}


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
    }


class Opened(NamedTuple):
    """Opening the run screen: the history it loaded, how long that took, and the reference."""

    target: int  # points in the run's history when it was opened
    load_s: float
    shown_points: int  # the most points any one series kept (downsampled)
    full_read_s: float  # reading every point row by row, the old way


class Presses(NamedTuple):
    """One round of tab-switching key presses (``measure``'s results)."""

    ms: list[float]
    cpu_ms: list[float]
    slowest: list[dict]
    by_tab: dict[str, list[float]] | None


def start_sampler() -> StallSampler:
    sampler = StallSampler(asyncio.get_running_loop())
    sampler.tick()
    sampler.watch_gc()
    sampler.start()
    return sampler


async def open_run(app, pilot, source, job_id: int, sent_to) -> Opened:
    """Open the job's run screen before anything streams, wait until its history is shown, then
    time the reference read of every point (the reads alone)."""
    target = sent_to(job_id)  # nothing streams yet
    app.open_job(job_id)
    t_open = time.perf_counter()
    while app.screen.series.cursor == 0 or app.screen.series.received < target:
        await asyncio.sleep(0.01)
        if time.perf_counter() - t_open > 120:
            raise RuntimeError("the run's history did not load within 120 s")
    load_s = time.perf_counter() - t_open
    shown_points = max(s.n for s in app.screen.series.series.values())
    await pilot.pause(1.0)
    full_read_s = await asyncio.to_thread(read_every_point, source, job_id)
    return Opened(target, load_s, shown_points, full_read_s)


async def press_round(app, pilot, presses: int, by_tab: bool = False) -> Presses:
    tabs: dict[str, list[float]] | None = {} if by_tab else None
    ms = await measure(app, pilot, presses, tabs)
    return Presses(ms, measure.cpu_ms, measure.slowest, tabs)  # type: ignore[attr-defined]


def start_streamer(args, source, feed, job_ids: list[int], history: int):
    """The load: a writer process on the store, or a thread writing into the fake."""
    if args.source == "store":
        streamer = StoreStreamer(source, feed, history, args.rate)
    else:
        streamer = Streamer(feed, job_ids, history, args.rate)
    streamer.start()
    return streamer


async def stop_and_count(app, streamer, sent_to, job_id: int) -> tuple[int, int]:
    """Stop the load, then wait (20 s at most) until the open run shows every point streamed to
    it: (points expected, points received)."""
    if isinstance(streamer, Streamer):
        streamer.stop_event.set()
    streamer.join()
    expected = sent_to(job_id)
    deadline = time.perf_counter() + 20
    received = 0
    while time.perf_counter() < deadline:
        received = app.screen.series.received
        if received >= expected:
            break
        await asyncio.sleep(0.1)
    return expected, received


async def main_async(args) -> dict:
    from mesa_tui.app import create_app
    from mesa_tui.source import utc_now

    load_start = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    # feed: a function writing one point (fake), or the run of each job (store, written by a process)
    source, job_ids, feed, sent_to, history = (
        build_store if args.source == "store" else build_fake
    )(args.points, args.jobs)
    build_s = time.perf_counter() - t0
    app = create_app(source, utc_now, quiet_gc=not args.default_gc)
    sampler = start_sampler() if args.profile else None
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        opened = await open_run(app, pilot, source, job_ids[0], sent_to)
        idle = await press_round(app, pilot, args.presses)
        streamer = start_streamer(args, source, feed, job_ids, history)
        await asyncio.sleep(2.0)  # let the load settle before measuring under it
        loaded = await press_round(app, pilot, args.presses, by_tab=True)
        expected, received = await stop_and_count(app, streamer, sent_to, job_ids[0])
    if sampler is not None:
        sampler.stop_event.set()
    return {
        **(
            {"blocked_ms_by_place": sampler.top(), "garbage_collections": sampler.gc_summary()}
            if sampler is not None
            else {}
        ),
        **report(args, build_s, opened, idle, loaded),
        "points_streamed": streamer.sent,
        "open_run_points_expected": expected,
        "open_run_points_received": received,
        "budget_ms": 100,
        "within_budget": summary(loaded.ms)["p95_ms"] <= 100,
        "loadavg_start": load_start,
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
    }


def report(args, build_s: float, opened: Opened, idle: Presses, loaded: Presses) -> dict:
    """The settings, the opening of the run and both rounds of presses, in the output's order."""
    return {
        "benchmark": "tui_responsiveness",
        "source": args.source,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "store_points": args.points,
        "streaming_jobs": args.jobs,
        "points_per_s_per_job": args.rate,
        "setup_s": round(build_s, 1),
        "open_run_history_points": opened.target,
        "open_run_load_s": round(opened.load_s, 2),
        "open_run_points_kept_per_series": opened.shown_points,
        "open_run_read_every_point_s_reference": round(opened.full_read_s, 2),
        "idle_reference": summary(idle.ms),
        "idle_cpu_ms_per_press_p50": round(statistics.median(idle.cpu_ms), 1),
        "idle_slowest_presses": idle.slowest,
        "under_load_slowest_presses": loaded.slowest,
        "under_load_cpu_ms_per_press_p50": round(statistics.median(loaded.cpu_ms), 1),
        "under_load": summary(loaded.ms),
        "under_load_p50_ms_by_tab": {
            t: round(statistics.median(v), 1) for t, v in (loaded.by_tab or {}).items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("fake", "store"), default="fake")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rate", type=float, default=50.0, help="points per second per job")
    parser.add_argument("--presses", type=int, default=30)
    parser.add_argument(
        "--default-gc", action="store_true", help="the app without its quiet collector"
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample what the event loop does while blocked"
    )
    parser.add_argument("--writer", help=argparse.SUPPRESS)  # internal: the engine-like writer
    args = parser.parse_args()
    if args.writer:
        spec = json.loads(args.writer)
        runs = {int(k): int(v) for k, v in spec["runs"].items()}
        engine_like_writer(spec["url"], runs, spec["first_step"], spec["rate"])
        return
    if args.source == "store" and "MESA_TUI_HOME" not in os.environ:
        os.environ["MESA_TUI_HOME"] = tempfile.mkdtemp(prefix="mesa-bench-")
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
