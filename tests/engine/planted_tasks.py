"""The real ``mesa`` and ``defend`` tasks on the hand-built backdoored model of
tests/ml/planted.py, for engine tests that kill them: registered through ``MESA_TUI_TASK_MODULES``
(``mesa=tests.engine.planted_mesa,defend=tests.engine.planted_defend``), which the engine's child
imports instead of ``engine.tasks.mesa``/``defend``. Importing this module registers the
``planted`` architecture and makes searches checkpoint every 2 steps (the knob tests set), since
a child cannot be monkeypatched from the test."""

from __future__ import annotations

from engine.ml import models
from engine.tasks import mesa as mesa_task
from tests.ml.planted import PlantedBackdoor

models.ARCHITECTURES.setdefault("planted", lambda n, c: PlantedBackdoor(n, c, 1))
mesa_task.CHECKPOINT_EVERY_STEPS = 2
