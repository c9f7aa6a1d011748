"""Executor flags without a cluster: a missing ray extra and bad values are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

from tests.engine.helpers import ROOT, engine_env

NO_RAY = (
    "import sys; sys.modules['ray'] = None; sys.argv = ['mesa-tui', 'engine', 'start'] + "
    "sys.argv[1:]; from mesa_tui.cli import main; main()"
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, *args],
        env=engine_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ray_executor_without_ray_says_how_to_install_it():
    for args in (
        ["--executor", "ray"],
        ["--ray-address", "local"],
        ["--detach", "--executor", "ray"],
    ):
        out = run_cli(*args)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == "error: install the ray extra: pip install -e '.[ray]'"
    daemon = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['ray'] = None; from engine.daemon import "
         "main; sys.exit(main(['--executor', 'ray']))"],
        env=engine_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert daemon.returncode == 2 and "install the ray extra" in daemon.stderr


def test_bad_executor_values_are_named():
    for args, message in [
        (["--executor", "k8s"], "error: unknown --executor 'k8s'; use local or ray"),
        (["--executor", "local", "--ray-address", "h:1"], "error: --ray-address needs --executor ray"),
    ]:  # fmt: skip
        out = run_cli(*args)
        assert out.returncode == 2 and out.stderr.strip() == message, out.stderr
