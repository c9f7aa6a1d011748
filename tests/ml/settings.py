"""The ML layer's configurations as a job gets them: from the spec, whose defaults they take."""

from __future__ import annotations

from engine.specs import DefendSpec


def repair_config(**values):  # noqa: ANN201
    """``engine.ml.repair.RepairConfig`` of a defend spec with these settings."""
    return DefendSpec(model="(unused)", **values).repair_config()


def anp_config(**values):  # noqa: ANN201
    """``engine.ml.anp.ANPConfig`` of a defend spec with these ``anp_*`` settings (unprefixed)."""
    return DefendSpec(model="(unused)", **{f"anp_{k}": v for k, v in values.items()}).anp_config()
