"""Executors start one child per run and hand its events to the engine: ``local`` (a process on
this machine) and ``ray`` (a task on a Ray cluster, extra ``mesa-tui[ray]``)."""
