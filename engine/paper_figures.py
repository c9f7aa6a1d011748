"""The MESA paper's reported figures (section 5 of the method notes), the one copy that study
templates, the study report and the app compare against. Torch-free, so every face may read it.
"""

from __future__ import annotations

# CIFAR-10, ResNet-18, 51 black/white triggers: ASR after repair per method (mean and worst).
PAPER_BW: dict[str, dict[str, float]] = {
    "before repair": {"mean": 0.987, "worst": 0.924},
    "ideal": {"mean": 0.024, "worst": 0.037},
    "mesa-0.9": {"mean": 0.034, "worst": 0.059},
    "mesa-0.8": {"mean": 0.036, "worst": 0.091},
    "mesa-0.5": {"mean": 0.042, "worst": 0.090},
    "mesa-ensemble": {"mean": 0.036, "worst": 0.082},
    "point": {"mean": 0.105, "worst": 0.514},
}
# Colour triggers: the mean ASR after repair only.
PAPER_COLOR_CIFAR10: dict[str, dict[str, float]] = {
    "mesa-0.9": {"mean": 0.0204},
    "mesa-0.8": {"mean": 0.0193},
    "mesa-0.5": {"mean": 0.0177},
    "mesa-ensemble": {"mean": 0.0191},
    "point": {"mean": 0.2275},
}
PAPER_COLOR_CIFAR100: dict[str, dict[str, float]] = {
    "mesa-0.9": {"mean": 0.0142},
    "mesa-0.8": {"mean": 0.0141},
    "mesa-0.5": {"mean": 0.0156},
    "mesa-ensemble": {"mean": 0.0114},
    "point": {"mean": 0.2741},
}

# Method names as studies and the app write them, mapped to the paper's rows (by prefix).
_ALIASES = (("mesa-ens", "mesa-ensemble"), ("before-repair", "before repair"))


def paper_bw_numbers(method: str) -> tuple[float, float] | None:
    """The paper's (mean, worst) black/white ASR after repair for a method name, when it reports
    one: ``mesa-0.9``, ``mesa_beta=0.9``, ``mesa-ensemble``, ``before`` (repair), ``point``..."""
    name = method.lower().replace("beta=", "").replace("_", "-")
    if name == "before":
        name = "before repair"
    for alias, key in _ALIASES:
        if name.startswith(alias):
            name = key
    row = PAPER_BW.get(name)
    return (row["mean"], row["worst"]) if row else None
