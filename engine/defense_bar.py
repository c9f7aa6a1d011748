"""The defense quality bar of issue 3 on the CPU network: the one definition of its recipe.

Per trigger and seed: a backdoored `small` model trained from scratch (the cpu-quick preset with
the recipe every committed result was trained with, ``RESULTS_RECIPE``), a MESA search of three
betas at the paper's random per-image places, then a repair by every method at every stamping
rate. The study template ``defense-bar`` (engine/pipelines.py) and the main part of the driver
``benchmarks/defense.py`` build their train, mesa and defend specs from the functions here, so a
study's jobs are the driver's tasks field for field (tests/engine/test_defense_bar.py checks it).
Torch-free, like the rest of the templates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError
from engine.pipelines import check_distinct_methods, method_settings

TRIGGERS = ("bw:170", "bw:0", "bw:85")
TARGET = 0
SEEDS = 3
RATES = (0.01, 0.1, 0.2)
HEADLINE_RATE = 0.1
# Method names as the pipelines spell them (the driver's own are mesa:0.9 for mesa-0.9).
METHODS = ("mesa", "mesa-0.9", "mesa-0.8", "mesa-0.5", "ideal", "point", "neural-cleanse",
           "finetune", "random-patch")  # fmt: skip
REVERSING = ("point", "neural-cleanse")  # their first repair's reversal serves the later ones

TRAIN_PRESET = "cpu-quick"
# The recipe every committed defense result was trained with: the cpu-quick preset before it
# moved to batch 512, lr 0.8, crop epochs, reflect padding, a whitened stem and no weight decay on
# the BatchNorm parameters. Pinned, so a rerun reproduces those models.
RESULTS_RECIPE: dict[str, Any] = dict(
    arch="small",
    batch_size=256,
    lr=0.2,
    eval_every=2,
    crop_epochs=0,
    epochs=10,
    crop_padding=4,
    padding_mode="zeros",
    whiten_stem=False,
    norm_weight_decay=5e-4,  # = weight_decay: one group, as before the field existed
)
TRAIN: dict[str, Any] = {**RESULTS_RECIPE, "dataset": "cifar10", "target": TARGET}
# The paper's random places, with which every committed result was made (the search's default
# became `learned`, a position scan first, later). No preset: the spec's defaults.
SEARCH: dict[str, Any] = {
    "target": TARGET,
    "betas": [0.9, 0.8, 0.5],
    "alpha": 0.1,
    "steps": 620,
    "batch_size": 128,
    "hidden": 512,
    "placement": "per-image",
}
# The residual search after a repair has the main search's batch and width.
REPAIR: dict[str, Any] = {
    "target": TARGET,
    "epochs": 10,
    "point_restarts": 3,
    "point_epochs": 5,
    "nc_epochs": 100,
    "nc_steps_per_epoch": 31,
    "residual_steps": 200,
    "residual_hidden": SEARCH["hidden"],
    "residual_batch_size": SEARCH["batch_size"],
}


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """None means "not given": it must not hide the recipe's value."""
    return {k: v for k, v in values.items() if v is not None}


def train_values(trigger: str, seed: int, given: dict[str, Any]) -> dict[str, Any]:
    """The attack's values over the ``TRAIN_PRESET`` preset."""
    return {**TRAIN, "trigger": trigger, "seed": seed, **_given(given)}


def search_values(seed: int, given: dict[str, Any]) -> dict[str, Any]:
    """The search's values (no preset; ``model`` is the caller's)."""
    return {**SEARCH, "seed": seed, **_given(given)}


@dataclass(frozen=True)
class Plan:
    """Which repairs each model gets: the methods at the rates (the headline rate's first), the
    residual search after those at ``residual_rates`` (None: the headline rate) by
    ``residual_methods`` (None: every method; a defend method, so mesa covers mesa-0.9 too)."""

    rates: tuple[float, ...] = RATES
    methods: tuple[str, ...] = METHODS
    headline_rate: float = HEADLINE_RATE
    residual_rates: tuple[float, ...] | None = None
    residual_methods: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS and not _single_beta(m)]
        if unknown or not self.methods:
            raise UserError(
                f"invalid methods {','.join(unknown) or 'none given'}: use some of "
                f"{','.join(METHODS)} or mesa-BETA like mesa-0.9"
            )
        check_distinct_methods(self.methods, f"--methods {','.join(self.methods)}")
        _check_rates("--rates", self.rates)
        _check_rates("--headline-rate", (self.headline_rate,))
        if not any(self.is_headline(r) for r in self.rates):  # else no rate is reversed first
            raise UserError(
                f"invalid --headline-rate {self.headline_rate:g}: not among --rates "
                f"{_text(self.rates)}; add it to --rates or give --headline-rate one of them"
            )
        if self.residual_rates is not None:
            _check_rates("--residual-rates", self.residual_rates)
        if self.residual_methods is not None:
            _check_residual_methods(self.residual_methods)

    def is_headline(self, rate: float) -> bool:
        return math.isclose(rate, self.headline_rate)

    def ordered_rates(self) -> list[float]:
        """The headline rate first: its runs reverse the point and Neural Cleanse triggers and
        every other rate repairs with those (a rate added in a later sitting too)."""
        return sorted(self.rates, key=lambda r: not self.is_headline(r))

    def residual(self, method: str, rate: float) -> bool:
        rates = self.residual_rates or (self.headline_rate,)
        return any(math.isclose(rate, r) for r in rates) and (
            self.residual_methods is None or method in self.residual_methods
        )


def _text(rates: tuple[float, ...]) -> str:
    return ",".join(f"{r:g}" for r in rates)


def _check_rates(flag: str, rates: tuple[float, ...]) -> None:
    """Stamping rates in (0, 1], none twice (a copy would queue the same repairs again)."""
    bad = [r for r in rates if not 0 < r <= 1]
    if bad or not rates:
        shown = f"{bad[0]:g}" if bad else "(none)"
        raise UserError(f"invalid {flag} {shown}: give stamping rates in (0, 1] like 0.1")
    for i, rate in enumerate(rates):
        if any(math.isclose(rate, r) for r in rates[:i]):
            raise UserError(
                f"invalid {flag} {_text(rates)}: {rate:g} is named twice; give each rate once"
            )


def _check_residual_methods(methods: tuple[str, ...]) -> None:
    """Defend methods (mesa covers mesa-0.9 too), none twice."""
    from engine.specs import DEFEND_METHODS

    for i, method in enumerate(methods):
        if method not in DEFEND_METHODS:
            raise UserError(
                f"invalid --residual-methods {method}: use defend methods such as mesa,point "
                f"(one of {', '.join(DEFEND_METHODS)})"
            )
        if method in methods[:i]:
            raise UserError(
                f"invalid --residual-methods {','.join(methods)}: {method} is named twice; "
                "give each method once"
            )


def check_residual_rates(plan: Plan) -> None:
    """A study's residual rates must be among its rates, or that residual search never runs.
    (Plan cannot insist: the driver's paper part repairs at the headline rate alone with the
    main part's residual rates.)"""
    for rate in plan.residual_rates or ():
        if not any(math.isclose(rate, r) for r in plan.rates):
            raise UserError(
                f"invalid --residual-rates {_text(plan.residual_rates or ())}: {rate:g} is not "
                f"among --rates {_text(plan.rates)}; add it there or leave it out"
            )


def _single_beta(method: str) -> bool:
    if not method.startswith("mesa-"):
        return False
    method_settings(method)  # a bad beta is one line naming it
    return True


@dataclass(frozen=True)
class Repair:
    """One defend task of a model: its method name, point restart, rate and spec values
    (``model`` and ``search`` are the caller's); ``reversal_of``: the index of the earlier
    repair whose reversed trigger it reuses (``reversal_from``)."""

    method: str
    restart: int | None
    rate: float
    values: dict[str, Any]
    reversal_of: int | None

    @property
    def uses_search(self) -> bool:
        return self.values["method"] == "mesa"


def repairs(plan: Plan, seed: int, given: dict[str, Any]) -> list[Repair]:
    """Every repair of one model in the order they run: per rate, per method, point once per
    restart. The search's own target is the mesa repairs' belief, so they carry none."""
    out: list[Repair] = []
    first: dict[str, int] = {}
    restarts = int(given.get("point_restarts") or REPAIR["point_restarts"])
    for rate in plan.ordered_rates():
        for method in plan.methods:
            settings = method_settings(method)
            base = {**REPAIR, **_given(given), **settings, "stamp_rate": rate, "seed": seed}
            if not plan.residual(settings["method"], rate):
                base["residual_steps"] = 0
            if settings["method"] == "mesa":
                base.pop("target")
            indices: list[int | None] = list(range(restarts)) if method == "point" else [None]
            for index in indices:
                values = base if index is None else {**base, "point_index": index}
                out.append(Repair(method, index, rate, values, first.get(settings["method"])))
                if settings["method"] in REVERSING:
                    first.setdefault(settings["method"], len(out) - 1)
    return out
