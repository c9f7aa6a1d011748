"""Executors start one child per run and hand its events to the engine (local; ray later)."""
