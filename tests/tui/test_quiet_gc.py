"""The app's quiet collector: full garbage collections only between key presses."""

from __future__ import annotations

import gc
import time

from mesa_tui.app import QUIET_S, QuietCollector


def test_full_collections_wait_for_a_pause_in_typing(monkeypatch):
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    before = gc.get_threshold()
    quiet = QuietCollector()
    try:
        quiet.start()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[2] > 10**8
        quiet.last_input = time.monotonic()  # a key just now: no full collection
        quiet.collect_if_idle()
        assert collected == [1]  # only start's own
        quiet.last_input = time.monotonic() - QUIET_S - 0.1
        quiet.collect_if_idle()
        assert collected == [1, 1]
    finally:
        quiet.stop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
