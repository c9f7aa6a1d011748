"""The ML layer's configurations as a job gets them: from the spec, whose defaults they take."""

from __future__ import annotations

from engine.specs import DefendSpec


def repair_config(**values):  # noqa: ANN201
    """``engine.ml.repair.RepairConfig`` of a defend spec with these settings."""
    return DefendSpec(model="(unused)", **values).repair_config()
