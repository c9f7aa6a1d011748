"""The terminal app never imports torch (and so never touches CUDA), even over every screen."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, tempfile
    from pathlib import Path
    from mesa_tui.app import create_app
    from mesa_tui.demo import demo_source
    import store.repository  # what run_app opens

    async def main():
        source = demo_source(Path(tempfile.mkdtemp()))
        app = create_app(source, poll_s=0.1, metrics_poll_s=0.1, redraw_s=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            for keys in (["n"], ["escape", "s"], ["j", "m"], ["j"]):
                await pilot.press(*keys)
                await pilot.pause(0.1)
            app.open_job(2)
            for key in "123456":
                await pilot.press(key)
                await pilot.pause(0.1)

    asyncio.run(main())
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("TORCH" if loaded else "CLEAN", loaded[:3])
    """
)


def test_the_app_never_imports_torch(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLEAN" in out.stdout, out.stdout
