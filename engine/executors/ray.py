"""Ray executor: each run is one Ray task on a cluster (extra ``mesa-tui[ray]``).

The task runs the same child as the local executor (``python -m engine.runner``) on whichever
node Ray picks, with the resources the spec asks for: ``device=cpu`` takes no GPU, ``cuda`` takes
``gpus_per_run`` (1), ``auto`` takes one when the cluster has GPUs. The child's JSON event lines go
to one small actor (the hub) that the engine drains from a background thread, so ``events()``
never blocks and the engine stays the only writer of the store. The same hub carries cancel
requests back to the task: ``stop`` becomes the cooperative stop line on the child's stdin,
``term``/``kill`` signal the child's process group and go through ``ray.cancel`` (``force`` for
kill). Ray never retries (``max_retries=0``): a lost worker is a lost run in our runs table, and
the engine retries it there.

Artifacts: with a shared file system (the default; every node sees the engine's data home at the
same path) nothing moves. ``artifacts="copy"`` is for nodes without it: the run's work directory
(for a resume) and the upstream artifacts named in its spec travel to the node through the object
store, the child works in a temporary directory there, and everything it left in its work
directory comes back the same way when it ends (paths in its events are mapped back). ``auto``
probes every node once at start for a marker file in the artifact directory.

``ray`` is imported lazily: without it the engine says how to install the extra.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import paths
from engine.errors import UserError
from engine.executors.base import Executor, Handle, Launch, Slot

log = logging.getLogger("mesa.engine")

INSTALL_HINT = "install the ray extra: pip install -e '.[ray]'"
# How often a task sends its child's events to the hub (and learns of cancels), and how often the
# engine drains the hub.
PUMP_EVERY_S = 0.1
DRAIN_EVERY_S = 0.05
CONNECT_TIMEOUT_S = 5.0
ARTIFACT_MODES = ("auto", "shared", "copy")
# Environment a child needs from the engine's side: the data home, test task kinds, offline mode.
FORWARDED_ENV = ("XDG_DATA_HOME", "XDG_CACHE_HOME")
# A run's child never opens the store, so its URL (either name) stays on the engine's machine.
_STORE_URLS = ("MESA_TUI_DB", "MESA_DB")
ROOT = Path(__file__).resolve().parents[2]


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def check_address(address: str) -> None:
    """Fail fast (one line, exit 2) on a ``host:port`` nobody answers at; ``ray.init`` itself
    would wait for minutes."""
    if address in ("local", "auto"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"--ray-address '{address}' is not an address; use HOST:PORT of the Ray head "
            "(ray start --head prints it), auto, or local"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at --ray-address '{address}' ({exc.strerror or exc}); "
            "start the head with `ray start --head` or use --ray-address local"
        ) from None


def _use_token_if_present() -> None:
    """Ray 2.5x+ clusters started with ``ray start --head`` require the token in
    ``~/.ray/auth_token``; a driver given an explicit address only sends it in token mode."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        with contextlib.suppress(Exception):  # what ray.init does for address="auto"
            from ray._raylet import Config  # type: ignore[attr-defined]  # Cython, no stub

            Config.initialize("")


# ------------------------------------------------------------------------------------------------
# The hub: one actor between the tasks and the engine


class Hub:
    """Events per run (tasks put, the engine drains) and cancel requests (the engine sets, the
    task reads them in the answer to its next put)."""

    def __init__(self) -> None:
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.requests: dict[int, str] = {}
        self.workers: dict[int, dict[str, Any]] = {}

    def put(
        self, run_id: int, events: list[dict[str, Any]], worker: dict[str, Any] | None = None
    ) -> str:
        if events:
            self.events.setdefault(run_id, []).extend(events)
        if worker:
            self.workers[run_id] = worker
        return self.requests.get(run_id, "")

    def drain(self) -> dict[int, list[dict[str, Any]]]:
        out, self.events = self.events, {}
        return out

    def request(self, run_id: int, stage: str) -> None:
        order = ("", "stop", "term", "kill")
        if order.index(stage) > order.index(self.requests.get(run_id, "")):
            self.requests[run_id] = stage

    def worker(self, run_id: int) -> dict[str, Any] | None:
        return self.workers.get(run_id)

    def forget(self, run_id: int) -> None:
        self.events.pop(run_id, None)
        self.requests.pop(run_id, None)
        self.workers.pop(run_id, None)


# ------------------------------------------------------------------------------------------------
# The task (runs on a worker node)


def _remap(value: Any, old: str, new: str) -> Any:
    """Replace the path prefix ``old`` by ``new`` in every string of a JSON-like value."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: _remap(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_remap(v, old, new) for v in value]
    return value


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when the Ray worker dies (a forced
    cancel or a crashed worker must not leave the child running)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_task(payload: dict[str, Any], hub: Any, staged: dict[str, bytes] | None) -> dict[str, Any]:
    """Run one attempt in a child process on this node; stream its events to the hub.

    Returns the child's exit code, the tail of its output and, in copy mode, the files of its
    work directory (relative to the engine's artifact directory)."""
    import ray

    place = _Workspace.prepare(payload, staged)
    if place.error:
        status = {"t": "status", "status": "failed", "result": None, "error": place.error}
        ray.get(hub.put.remote(payload["run_id"], [status]))
        return {"exit_code": 1, "tail": place.error}
    child = _Child.start(payload, place)
    child.stream(hub)
    code = child.finish()
    out: dict[str, Any] = {"exit_code": code, "tail": _tail(place.log_path)}
    if place.local_root is not None:
        out.update(place.collect())
    return out


@dataclass
class _Workspace:
    """Where an attempt works on this node: the engine's own directories (shared mode) or a
    temporary copy (copy mode, paths in the launch remapped)."""

    launch: dict[str, Any]
    log_path: Path
    engine_artifacts: str
    worker_artifacts: str
    local_root: Path | None = None
    error: str = ""

    @classmethod
    def prepare(cls, payload: dict[str, Any], staged: dict[str, bytes] | None) -> _Workspace:
        launch = dict(payload["launch"])
        engine_artifacts = payload["artifacts_dir"]
        if payload["mode"] == "shared":
            place = cls(launch, Path(payload["log"]), engine_artifacts, engine_artifacts)
            if not _marker_visible(payload):
                place.error = (
                    f"the artifact directory {engine_artifacts} is not shared with node "
                    f"{socket.gethostname()}; mount it at the same path there, or start the "
                    "engine with --ray-artifacts copy"
                )
            return place
        local_root = Path(tempfile.mkdtemp(prefix=f"mesa-run-{payload['run_id']}-"))
        worker_artifacts = str(local_root / "artifacts")
        for rel, data in (staged or {}).items():
            target = Path(worker_artifacts) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        launch = _remap(launch, engine_artifacts, worker_artifacts)
        return cls(launch, local_root / "run.log", engine_artifacts, worker_artifacts, local_root)

    def to_engine(self, value: Any) -> Any:
        """Paths in the child's events as the engine sees them."""
        if self.local_root is None:
            return value
        return _remap(value, self.worker_artifacts, self.engine_artifacts)

    def collect(self) -> dict[str, Any]:
        """Copy mode: the work directory's files and the log travel back; the copy goes."""
        assert self.local_root is not None
        workdir = Path(self.launch["workdir"])
        files = {}
        if workdir.is_dir():
            for path in sorted(workdir.rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(self.worker_artifacts))] = path.read_bytes()
        log = self.log_path.read_bytes() if self.log_path.exists() else b""
        shutil.rmtree(self.local_root, ignore_errors=True)
        return {"files": files, "log": log}


def _marker_visible(payload: dict[str, Any]) -> bool:
    try:
        return Path(payload["marker"]).read_text() == payload["token"]
    except OSError:
        return False


def _child_env(payload: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(payload["env"])
    env["PYTHONUNBUFFERED"] = "1"
    if Path(payload["root"], "engine", "runner.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (payload["root"], env.get("PYTHONPATH", "")) if p
        )
    if not payload["num_gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run cannot wander onto a GPU
    return env


class _Child:
    """The runner child of one attempt: its events read on a thread and pumped to the hub,
    the hub's cancel stages acted on."""

    def __init__(self, run_id: int, process: subprocess.Popen, read_fd: int, place: _Workspace):
        self.run_id = run_id
        self.process = process
        self.place = place
        self.buffer: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.handled = ""
        self.worker: dict[str, Any] | None = {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "child": process.pid,
        }
        self.reader = threading.Thread(
            target=self._read, args=(read_fd,), name=f"events-{run_id}", daemon=True
        )
        self.reader.start()

    @classmethod
    def start(cls, payload: dict[str, Any], place: _Workspace) -> _Child:
        place.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        with open(place.log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "engine.runner", "--events-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=_child_env(payload),
                close_fds=True,
                preexec_fn=_die_with_parent(),
            )
        os.close(write_fd)
        assert process.stdin is not None
        process.stdin.write((json.dumps(place.launch) + "\n").encode())
        process.stdin.flush()
        return cls(payload["run_id"], process, read_fd, place)

    def _read(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=1 << 20) as pipe:
            for line in pipe:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = {"t": "log", "level": "warning", "msg": line.decode(errors="replace")}
                with self.lock:
                    self.buffer.append(event)

    def act(self, stage: str) -> None:
        if stage == self.handled or not stage:
            return
        self.handled = stage
        if stage == "stop":
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.process.stdin.write(b"stop\n")
                self.process.stdin.flush()
        else:
            _kill_group(self.process.pid, signal.SIGTERM if stage == "term" else signal.SIGKILL)

    def pump(self, hub: Any) -> None:
        import ray

        with self.lock:
            batch = self.buffer[:]
            self.buffer.clear()
        self.act(ray.get(hub.put.remote(self.run_id, self.place.to_engine(batch), self.worker)))
        self.worker = None

    def stream(self, hub: Any) -> None:
        """Pump events until the child has ended and its pipe is drained."""
        import ray

        while True:
            try:
                done = self.process.poll() is not None and not self.reader.is_alive()
                self.pump(hub)
                if done:
                    return
                time.sleep(PUMP_EVERY_S)
            except KeyboardInterrupt:  # ray.cancel(force=False): the "term" stage
                self.act("term")
            except ray.exceptions.RayActorError:
                # The engine (and its hub) went away: the child sees its stdin close and stops.
                return

    def finish(self) -> int:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        return self.process.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no output"
    return " | ".join(text) if text else "no output"


def probe(marker: str, token: str) -> tuple[str, bool]:
    """Whether this node sees the engine's artifact directory (the marker file with its token)."""
    try:
        return socket.gethostname(), Path(marker).read_text() == token
    except OSError:
        return socket.gethostname(), False


# ------------------------------------------------------------------------------------------------
# The executor (in the engine)


class RayExecutor(Executor):
    name = "ray"

    def __init__(
        self,
        address: str = "auto",
        log_dir: Path | None = None,
        *,
        gpus_per_run: float = 1.0,
        cpus_per_run: float = 1.0,
        artifacts: str = "auto",
        num_cpus: int | None = None,
    ):
        if artifacts not in ARTIFACT_MODES:
            raise UserError(
                f"--ray-artifacts '{artifacts}' is unknown; use {', '.join(ARTIFACT_MODES)}"
            )
        self.ray = ray = import_ray()
        self.address = address
        self.log_dir = Path(log_dir or paths.data_home() / "logs")
        self.gpus_per_run = gpus_per_run
        self.cpus_per_run = cpus_per_run
        self._started_ray = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
                self._started_ray = True
            else:
                check_address(address)
                _use_token_if_present()
                try:
                    ray.init(address=address, log_to_driver=False)
                except ConnectionError as exc:
                    raise UserError(
                        f"no Ray cluster at --ray-address '{address}' ({exc}); start the head "
                        "with `ray start --head` or use --ray-address local"
                    ) from None
        resources = ray.cluster_resources()
        self.cluster_gpus = float(resources.get("GPU", 0))
        self.cluster_cpus = float(resources.get("CPU", 0))
        self.hub = ray.remote(num_cpus=0, max_restarts=0)(Hub).remote()
        self._task = ray.remote(run_task)
        self.artifacts_dir = paths.artifacts_dir()
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.marker = self.artifacts_dir / f".engine-{os.getpid()}-{self.token[:8]}"
        self.marker.write_text(self.token)
        self.mode = self._probe() if artifacts == "auto" else artifacts
        self._queues: dict[int, collections.deque] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="ray-hub", daemon=True)
        self._drainer.start()
        log.info(
            "ray: %s, %g CPU, %g GPU; artifacts %s",
            "local instance" if self._started_ray else f"cluster at {address}",
            self.cluster_cpus,
            self.cluster_gpus,
            "on a shared file system" if self.mode == "shared" else "copied through Ray",
        )

    # ---------------------------------------------------------------------------- setup

    def _probe(self) -> str:
        """``shared`` when every alive node sees the marker file, else ``copy``."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(probe)
        refs = [
            task.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(str(self.marker), self.token)
            for node in ray.nodes()
            if node.get("Alive")
        ]
        try:
            seen = ray.get(refs, timeout=120)
        except Exception as exc:
            log.warning("ray: could not probe the nodes (%s); copying artifacts", exc)
            return "copy"
        blind = sorted({host for host, ok in seen if not ok})
        if blind:
            log.info("ray: %s cannot see %s; artifacts are copied", blind, self.artifacts_dir)
            return "copy"
        return "shared"

    def slots(self, requested: int | None = None) -> list[Slot]:
        """Runs in flight at once: ``requested``, else what the cluster holds (its GPUs, or its
        CPUs when it has none)."""
        if requested:
            count = requested
        elif self.cluster_gpus >= 1 and self.gpus_per_run:
            count = int(self.cluster_gpus // self.gpus_per_run)
        else:
            count = int(self.cluster_cpus // max(self.cpus_per_run, 1e-9))
        return [Slot(name=f"ray{k}") for k in range(max(1, count))]

    def gpus_for(self, spec: dict[str, Any]) -> float:
        device = str(spec.get("device", "auto"))
        if device == "cpu":
            return 0.0
        if device.startswith("cuda") or self.cluster_gpus > 0:
            return float(self.gpus_per_run)
        return 0.0

    def _stage_in(self, launch: Launch) -> dict[str, bytes]:
        """Copy mode: the files the task needs from this side (its work directory for a resume,
        the upstream artifacts in its spec), relative to the artifact directory."""
        root = self.artifacts_dir.resolve()
        dirs = [Path(launch.workdir)] if launch.resume else []
        dirs += [Path(v) for v in launch.spec.values() if isinstance(v, str) and v.startswith("/")]
        files: dict[str, bytes] = {}
        for d in dirs:
            d = d.resolve()
            if not d.is_relative_to(root) or not d.exists():
                continue
            for path in [d] if d.is_file() else sorted(d.rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(root))] = path.read_bytes()
        return files

    # ---------------------------------------------------------------------------- interface

    def launch(self, launch: Launch, slot: Slot) -> Handle:
        ray = self.ray
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"run-{launch.run_id}.log"
        num_gpus = self.gpus_for(launch.spec)
        env = {
            k: v for k, v in os.environ.items() if k.startswith("MESA_") and k not in _STORE_URLS
        }
        env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
        payload = {
            "run_id": launch.run_id,
            "launch": launch.to_json(),
            "log": str(log_path),
            "env": env,
            "root": str(ROOT),
            "mode": self.mode,
            "artifacts_dir": str(self.artifacts_dir),
            "marker": str(self.marker),
            "token": self.token,
            "num_gpus": num_gpus,
        }
        staged = self._stage_in(launch) if self.mode == "copy" else None
        queue: collections.deque[dict[str, Any]] = collections.deque()
        with self._lock:
            self._queues[launch.run_id] = queue
        ref = self._task.options(
            num_cpus=self.cpus_per_run,
            num_gpus=num_gpus,
            max_retries=0,
            retry_exceptions=False,
            name=f"mesa-run-{launch.run_id}",
        ).remote(payload, self.hub, ray.put(staged) if staged else None)
        return Handle(
            launch=launch,
            slot=slot,
            external_id=ref.task_id().hex(),
            state={"ref": ref, "queue": queue, "log": str(log_path), "num_gpus": num_gpus},
        )

    def events(self, handle: Handle) -> list[dict[str, Any]]:
        queue = handle.state["queue"]
        out = []
        while queue:
            out.append(queue.popleft())
        return out

    def poll(self, handle: Handle) -> int | None:
        state = handle.state
        if "code" not in state:
            ready, _ = self.ray.wait([state["ref"]], timeout=0)
            if not ready:
                return None
            state["code"] = self._outcome(handle)
            state["seen_at"] = self._generation
        # Every event the task sent is in the hub before its result is ready: wait for one drain
        # that started after that, then for the queue to empty.
        if self._generation < state["seen_at"] + 2 or state["queue"]:
            return None
        return state["code"]

    def _outcome(self, handle: Handle) -> int:
        ray = self.ray
        state = handle.state
        try:
            out = ray.get(state["ref"])
        except ray.exceptions.TaskCancelledError:
            return -signal.SIGKILL if state.get("stage") == "kill" else -signal.SIGTERM
        except ray.exceptions.RayTaskError as exc:
            self._write_log(state, f"the ray task failed: {exc}\n".encode())
            return 1
        except ray.exceptions.RayError as exc:  # worker, node or object lost
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            state["lost_reason"] = f"ray worker lost ({type(exc).__name__}: {first})"
            return -signal.SIGKILL
        if "files" in out:
            self._write_log(state, out.get("log") or b"")
            self._stage_out(out["files"])
        return int(out["exit_code"])

    def _write_log(self, state: dict[str, Any], data: bytes) -> None:
        path = Path(state["log"])
        with contextlib.suppress(OSError), open(path, "ab") as f:
            f.write(data)

    def _stage_out(self, files: dict[str, bytes]) -> None:
        """Copy mode: write what the task left, manifests last (a manifest means complete)."""
        root = self.artifacts_dir.resolve()
        for rel in sorted(files, key=lambda r: (Path(r).name == "manifest.json", r)):
            target = (root / rel).resolve()
            if not target.is_relative_to(root):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(files[rel])
            tmp.replace(target)

    def cancel(self, handle: Handle, stage: str) -> None:
        handle.state["stage"] = stage
        self.hub.request.remote(handle.launch.run_id, stage)
        if stage in ("term", "kill"):
            with contextlib.suppress(Exception):
                self.ray.cancel(handle.state["ref"], force=stage == "kill", recursive=True)

    def close(self, handle: Handle) -> None:
        with self._lock:
            self._queues.pop(handle.launch.run_id, None)
        with contextlib.suppress(Exception):
            self.hub.forget.remote(handle.launch.run_id)

    def worker(self, handle: Handle) -> dict[str, Any] | None:
        """Where the run's task runs: node, worker pid, child pid (once it has reported)."""
        return self.ray.get(self.hub.worker.remote(handle.launch.run_id), timeout=30)

    def shutdown(self) -> None:
        self._closed.set()
        self._drainer.join(timeout=5)
        with contextlib.suppress(OSError):
            self.marker.unlink()
        with contextlib.suppress(Exception):
            self.ray.kill(self.hub)
        if self._started_ray:
            self.ray.shutdown()

    # ---------------------------------------------------------------------------- draining

    def _drain_loop(self) -> None:
        while not self._closed.is_set():
            try:
                drained = self.ray.get(self.hub.drain.remote(), timeout=60)
            except Exception as exc:
                if self._closed.is_set():
                    return
                log.warning("ray: could not read events (will retry): %s", exc)
                time.sleep(1.0)
                continue
            with self._lock:
                for run_id, events in drained.items():
                    queue = self._queues.get(run_id)
                    if queue is not None:
                        queue.extend(events)
                self._generation += 1
            self._closed.wait(DRAIN_EVERY_S)
