"""The ML layer's configurations as a job gets them: from the spec, whose defaults they take."""

from __future__ import annotations

from engine.specs import DefendSpec


def repair_config(**values):  # noqa: ANN201
    """``engine.ml.repair.RepairConfig`` of a defend spec with these settings (a fine-tuning
    repair unless ``method`` is given: the default, mesa, would need a search)."""
    return DefendSpec(model="(unused)", **{"method": "finetune", **values}).repair_config()


def anp_config(**values):  # noqa: ANN201
    """``engine.ml.anp.ANPConfig`` of a defend spec with these ``anp_*`` settings (unprefixed)."""
    anp = {f"anp_{k}": v for k, v in values.items()}
    return DefendSpec(model="(unused)", method="anp", **anp).anp_config()
