"""Starting many engines cheaply (the crash sweep starts about one per instant): a fork server
that imports the engine once and forks a fresh engine process for each start. Importing the
engine and the store costs about half a second of CPU here; a fork, milliseconds. The forked
process is a whole engine (``engine.daemon.main``) with its own pid, environment, log, store
connections and children; only the imported modules are shared, and the server never opens a
store, starts a thread or reads the environment the engine reads.

Protocol (JSON lines): the test writes ``{"args": [...], "env": {...}, "log": PATH}`` on stdin;
the server answers ``{"pid": N}`` once the engine runs and ``{"exit": CODE}`` (negative: killed
by that signal) once it has ended and been reaped. One engine at a time.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import engine.daemon  # noqa: F401  (imported once, before any fork)
import store.repository  # noqa: F401


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.clear()
                os.environ.update(request["env"])
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.close(log)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.close(devnull)
                from engine.daemon import main

                code = main(request["args"])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


class Forker:
    """The test's side: one server process, engines started and awaited one at a time."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.engine.engine_forker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=cwd,
            env=env,
            text=True,
        )
        self.pid: int | None = None
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._answers.put(json.loads(line))
        self._answers.put(None)

    def _read(self, timeout: float | None = None) -> dict[str, Any]:
        answer = self._answers.get(timeout=timeout)  # queue.Empty after the timeout
        if answer is None:
            raise RuntimeError("the engine fork server ended")
        return answer

    def start(self, args: list[str], env: dict[str, str], log: Path) -> int:
        assert self.process.stdin is not None and self.pid is None
        request = {"args": args, "env": env, "log": str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        self.pid = int(self._read()["pid"])
        return self.pid

    def wait(self, timeout: float | None = None) -> int:
        """Block until the engine ended (it is reaped by then); its exit code. Raises
        ``queue.Empty`` when it still runs after ``timeout`` seconds."""
        code = int(self._read(timeout)["exit"])
        self.pid = None
        return code

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (a clean stop), then SIGKILL if it is still there after ``timeout``."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.wait(timeout)
        except queue.Empty:
            os.kill(self.pid, signal.SIGKILL)
            return self.wait()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    serve()
