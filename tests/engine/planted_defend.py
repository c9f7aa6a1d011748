"""``defend`` with the planted model and 2-step checkpoints (see tests/engine/planted_tasks.py)."""

from __future__ import annotations

import tests.engine.planted_tasks  # noqa: F401  (registers the model, sets the knob)
from engine.specs import DefendSpec as Spec  # noqa: F401
from engine.tasks.defend import run  # noqa: F401
