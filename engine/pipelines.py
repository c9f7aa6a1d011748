"""Pipelines (train -> [detect] -> mesa -> defend per method) and study templates (torch-free).

A dependent job's spec names its upstream job instead of a path (``"model": "job:12"``); the
engine puts the upstream artifact's path there at launch. ``target`` can come from a detect job
(``"target": "job:13:flagged"``): the search then uses the class the detection flagged, as a real
defender must. Spec hashes treat such references as equal, so a finished job is reused only when
its spec, code version, dataset hash and upstream artifact hashes all match.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import UserError
from engine.paper_figures import PAPER_BW, PAPER_COLOR_CIFAR10, PAPER_COLOR_CIFAR100
from engine.spec_fields import option_name, split_list
from store.entities import NewJob

if TYPE_CHECKING:
    from engine.defense_bar import Plan

# The paper's 51 black/white triggers: the smallest id of each orbit of the 512 3x3 patterns under
# the square's symmetries and inversion (engine.ml.triggers.canonical_bw_ids computes the same;
# a test checks it), kept here so the CLI and the engine stay free of torch.
CANONICAL_BW_IDS = (
    0, 1, 2, 3, 5, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 23, 26, 27, 28, 29, 30, 40, 41,
    42, 43, 45, 56, 57, 58, 59, 61, 68, 69, 70, 78, 84, 85, 86, 94, 97, 98, 99, 101, 106, 108, 113,
    114, 170, 186,
)  # fmt: skip
CIFAR100_COLOR_TARGETS = (51, 90, 96, 79, 8, 50, 19, 7, 7, 91)

ALL_METHODS = (
    "mesa",
    "mesa-0.9",
    "mesa-0.8",
    "mesa-0.5",
    "mesa-ensemble",
    "ideal",
    "point",
    "neural-cleanse",
    "finetune",
    "random-patch",
    "anp",
    "i-bau",
    "clp",
    "ft-sam",
)
DEFAULT_METHODS = ("mesa", "ideal", "point", "finetune")
STAGES = ("train", "detect", "mesa", "defend")
REFERENCE = re.compile(r"^job:(#?\d+)(:flagged)?$")


def reference_hash(spec: dict[str, Any]) -> str:
    """The spec hash with job references blanked (they differ between equal pipelines); equal to
    ``SpecBase.spec_hash()`` for a spec without references."""
    normal = {
        k: ("job:*" if isinstance(v, str) and REFERENCE.match(v) else v) for k, v in spec.items()
    }
    return hashlib.sha256(
        json.dumps(normal, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def method_settings(method: str) -> dict[str, Any]:
    """DefendSpec values of a method name (``mesa`` and ``mesa-ensemble``: the round-robin
    ensemble of the search's generators; ``mesa-0.9``: the beta 0.9 generator alone)."""
    if method in ("mesa", "mesa-ensemble"):
        return {"method": "mesa", "ensemble": "round-robin"}
    if method.startswith("mesa-"):
        try:
            beta = float(method[5:])
        except ValueError:
            beta = -1.0
        if not 0 < beta < 1:
            raise UserError(
                f"method '{method}' is unknown; use mesa, mesa-ensemble or mesa-BETA like mesa-0.9"
            )
        return {"method": "mesa", "beta": beta}
    if method not in ALL_METHODS:
        raise UserError(f"method '{method}' is unknown; use one of {', '.join(ALL_METHODS)}")
    return {"method": method}


def parse_methods(value: str | None) -> list[str]:
    """``--methods`` as given: None (left out) is the defaults, ``all`` every method, else a
    comma list of known names, none of them twice (``check_distinct_methods``)."""
    if value is None:
        return list(DEFAULT_METHODS)
    if value.strip() == "all":
        return ["mesa-0.9", "mesa-0.8", "mesa-0.5", "mesa-ensemble", "ideal", "point",
                "neural-cleanse", "finetune", "random-patch", "anp", "i-bau", "clp",
                "ft-sam"]  # fmt: skip
    methods = split_list(value)
    if not methods:
        raise UserError(
            f"invalid --methods {value!r}: no method named; give e.g. mesa,point, or leave "
            f"--methods out for {','.join(DEFAULT_METHODS)}"
        )
    check_distinct_methods(methods, f"--methods {value!r}")
    return methods


def check_distinct_methods(methods: Sequence[str], given: str) -> None:
    """Each name known, and no repair named twice, under any spelling (mesa and mesa-ensemble,
    mesa-0.9 and mesa-.9): the copy would only queue the same jobs again. ``given``: the option
    and its value, for the message."""
    seen: dict[tuple[Any, ...], str] = {}
    for method in methods:
        key = tuple(sorted(method_settings(method).items()))
        if key in seen:
            same = "is named twice" if seen[key] == method else f"is the same repair as {seen[key]}"
            raise UserError(f"invalid {given}: {method} {same}; give each method once")
        seen[key] = method


def check_search_betas(methods: Sequence[str], betas: Sequence[float]) -> None:
    """A mesa-BETA repair uses that beta's generator, so the search must make it (the defend
    task would refuse it only after the attack and the search ran)."""
    for method in methods:
        beta = method_settings(method).get("beta")
        if beta is not None and not any(math.isclose(beta, b) for b in betas):
            raise UserError(
                f"invalid --methods {method}: beta {beta:g} is not among the search's betas "
                f"{','.join(f'{b:g}' for b in betas)}; add it with --mesa-betas or pick one"
            )


def _choice_takers(stages: list[str], key: str, value: Any) -> list[str]:
    """The stages whose ``key`` has a fixed set of choices that includes ``value`` (all of them
    when the field is not a choice): ``--placement corner`` is a choice of the attack only."""
    from typing import Literal, get_args, get_origin

    from engine.specs import SPEC_CLASSES
    from engine.triggerspec import check_placement_syntax

    takers = []
    for stage in stages:
        annotation = SPEC_CLASSES[stage].model_fields[key].annotation
        if stage == "train" and key == "placement":  # a choice or a fixed offset at:ROW,COL
            try:
                check_placement_syntax(str(value))
            except ValueError:
                continue
            takers.append(stage)
        elif get_origin(annotation) is not Literal or value in get_args(annotation):
            takers.append(stage)
    return takers


# The defend settings a method name sets (``method_settings``), with the --methods that asks for
# them: given as stage settings, --methods would silently override them.
SET_BY_METHODS = {
    "method": "--methods {value}",
    "beta": "--methods mesa-{value} (--detect-beta sets the detection's)",
    "ensemble": "--methods mesa (the round-robin ensemble), or submit defend for another",
}


def split_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route overrides to stages: ``train_epochs`` goes to train only; a plain ``epochs`` goes
    to every stage whose spec has that field (train and defend). A choice that only some of
    those stages offer goes to them (``--placement corner``: the attack's; ``routing_notes``
    says so); one that none offers is refused by the first stage's check."""
    from engine.specs import SPEC_CLASSES

    routed: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
    for key, value in overrides.items():
        if value is None:
            continue
        stage, _, field = key.partition("_")
        if key in SET_BY_METHODS or (stage == "defend" and field in SET_BY_METHODS):
            hint = SET_BY_METHODS[field if stage == "defend" else key].format(value=value)
            raise UserError(f"{option_name(key)} is set per defend job by --methods; use {hint}")
        if stage in STAGES and field in SPEC_CLASSES[stage].model_fields:
            routed[stage][field] = value
            continue
        targets = [s for s in STAGES if key in SPEC_CLASSES[s].model_fields]
        if not targets:
            raise UserError(
                f"unknown setting '{key}' for a pipeline; use a field of train, detect, mesa or "
                "defend (prefix it, e.g. --train-epochs, to set one stage only)"
            )
        targets = _choice_takers(targets, key, value) or targets
        for s in targets:
            routed[s][key] = value
    return routed


def given_flags(overrides: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per stage, each field given and the flag it was given as (``--train-placement`` or
    ``--placement``), for messages about the value."""
    from engine.specs import SPEC_CLASSES

    flags: dict[str, dict[str, str]] = {stage: {} for stage in STAGES}
    for key, value in overrides.items():
        stage, _, field = key.partition("_")
        if value is None:
            continue
        if stage in STAGES and field in SPEC_CLASSES[stage].model_fields:
            flags[stage][field] = option_name(key)
            continue
        for s in STAGES:
            if key in SPEC_CLASSES[s].model_fields:
                flags[s].setdefault(key, option_name(key))
    return flags


def routing_notes(overrides: dict[str, Any]) -> list[str]:
    """One line per plain setting that went to some of the stages having it only (a choice the
    others do not offer), naming where it went and what the others keep."""
    from typing import get_args

    from engine.specs import SPEC_CLASSES

    notes = []
    for key, value in overrides.items():
        if value is None or key.partition("_")[0] in STAGES:
            continue
        having = [s for s in STAGES if key in SPEC_CLASSES[s].model_fields]
        takers = _choice_takers(having, key, value)
        if takers and len(takers) < len(having):
            others = [s for s in having if s not in takers]
            choices = " or ".join(
                map(str, get_args(SPEC_CLASSES[others[0]].model_fields[key].annotation))
            ) or str(SPEC_CLASSES[others[0]].model_fields[key].description)
            flag = key.replace("_", "-")
            notes.append(
                f"note: --{flag} {value} applies to the {' and '.join(takers)} stage only; "
                f"{', '.join(others)} keep their default (they take {choices}; "
                f"--{others[0]}-{flag} sets one)"
            )
    return notes


def check_targets(target: str, overrides: dict[str, Any]) -> None:
    """--target is the class of the search and the repairs (or auto: the detection's), so a
    stage may not set another: an attack on 5 searched for 3 measures nothing."""
    for key in ("mesa_target", "defend_target"):
        if overrides.get(key) is not None:
            raise UserError(
                f"{option_name(key)} is set by the pipeline's --target; give the class there"
            )
    attacked = overrides.get("train_target")
    if target == "auto" or attacked is None:
        return
    try:
        differs = int(str(attacked)) != int(target)
    except ValueError:  # the attack's spec names the bad value
        return
    if differs:
        raise UserError(
            f"--train-target {attacked} and --target {target} differ: the search would be told "
            f"another class than the attacked one; give the class once, as --target {attacked}"
        )


def check_preset(preset: str | None) -> None:
    """A pipeline's preset goes to every stage that has it, so it must be some stage's (a stage
    without it keeps its defaults)."""
    from engine.specs import PRESETS

    names = list(dict.fromkeys(n for stage in STAGES for n in PRESETS.get(stage, {})))
    if preset and preset not in names:
        raise UserError(
            f"preset '{preset}' is unknown for a pipeline; use one of {', '.join(names)}"
        )


def _stage_spec(
    kind: str,
    preset: str | None,
    values: dict[str, Any],
    references: dict[str, str],
    flags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate a stage's spec (references stand in as valid placeholders; ``flags``: the
    options its values were given as) and return its JSON with the references in place."""
    from engine.specs import PRESETS, TrainSpec, build_spec, check_against_dataset

    placeholders = {k: (0 if k == "target" else "job") for k in references}
    stage_preset = preset if preset and preset in PRESETS.get(kind, {}) else None
    spec = build_spec(kind, stage_preset, None, {**values, **placeholders}, flags)
    if isinstance(spec, TrainSpec) and "target" not in references:  # as `submit train` checks
        check_against_dataset(spec)
    data = spec.to_json()
    data.update(references)
    return data


@dataclass
class PipelineJobs:
    """The jobs of one pipeline, in submission order (dependencies point backwards)."""

    jobs: list[NewJob]
    train_index: int


def build_pipeline(
    *,
    preset: str | None,
    trigger: str | None,
    target: str,
    methods: list[str],
    overrides: dict[str, Any],
    seed: int = 0,
    start: int = 0,
    train_from: tuple[int | str, str] | None = None,
    study_seed: int | None = None,
    split_point_restarts: bool = False,
) -> PipelineJobs:
    """train (the attack) -> [detect] -> mesa -> defend per method.

    ``target`` is a class number (the oracle shortcut: the search is told the attacked class) or
    ``auto`` (detect first; the search and the target-needing defenses use the flagged class).
    ``start`` is the index of this pipeline's first job in the whole submission. With
    ``split_point_restarts`` each point restart is its own job (studies report mean and worst
    over restarts); otherwise one job repairs with every restart in turn.
    """
    # isdigit() alone passes "²", which int() refuses
    if target != "auto" and not (target.isascii() and target.isdigit()):
        raise UserError(f"invalid --target {target!r}: give a class number or auto")
    from engine.specs import check_method_settings

    check_preset(preset)
    check_targets(target, overrides)
    defend_methods = [method_settings(m)["method"] for m in methods]
    check_method_settings(defend_methods, given_flags(overrides)["defend"])
    routed, flags = split_overrides(overrides), given_flags(overrides)
    build = _Pipeline(preset, trigger, target, routed, flags, seed, start, study_seed)
    train = build.attack(train_from)
    build.find_target()
    search = build.search() if any(m.startswith("mesa") for m in methods) else None
    if search is not None:
        check_search_betas(methods, build.jobs[search].spec["betas"])
    for method in methods:
        build.defend(method, search, split_point_restarts)
    return PipelineJobs(jobs=build.jobs, train_index=train)


Deps = list[tuple[int | str, str | None]]


@dataclass
class _Pipeline:
    """One pipeline's jobs as they are added, each stage validated against its spec."""

    preset: str | None
    trigger: str | None
    target: str
    routed: dict[str, dict[str, Any]]
    flags: dict[str, dict[str, str]]
    seed: int
    start: int
    study_seed: int | None
    jobs: list[NewJob] = field(default_factory=list)
    label: str = ""
    model: str = ""
    train_ref: str = ""
    target_refs: dict[str, str] = field(default_factory=dict)
    target_deps: Deps = field(default_factory=list)
    target_values: dict[str, Any] = field(default_factory=dict)
    detect_ref: str = ""

    @property
    def auto(self) -> bool:
        return self.target == "auto"

    def ref(self, index: int) -> str:
        return f"#{self.start + index}"

    def add(self, kind: str, spec: dict[str, Any], deps: Deps, **meta: Any) -> int:
        self.jobs.append(
            NewJob(
                kind=kind,
                spec=spec,
                spec_hash=reference_hash(spec),
                label=meta.pop("label", ""),
                depends_on=tuple(deps),
                role=kind,
                trigger=self.trigger,
                seed=self.study_seed,
                **meta,
            )
        )
        return len(self.jobs) - 1

    def attack(self, train_from: tuple[int | str, str] | None) -> int:
        values = {"seed": self.seed, **self.routed["train"]}
        if self.trigger is not None:
            values["trigger"] = self.trigger
        if not self.auto:
            values.setdefault("target", int(self.target))
        refs: dict[str, str] = {}
        deps: Deps = []
        if train_from is not None:
            refs["init_from"] = f"job:{train_from[0]}"
            deps.append((train_from[0], "init_from"))
        spec = _stage_spec("train", self.preset, values, refs, self.flags["train"])
        if self.auto and "target" not in self.routed["train"]:
            spec["target"] = 0
        self.label = f"{spec.get('trigger') or 'clean'} -> {spec['target']}"
        train = self.add("train", spec, deps, label=f"attack {self.label}")
        self.train_ref = self.ref(train)
        self.model = f"job:{self.train_ref}"
        return train

    def find_target(self) -> None:
        """The oracle's class, or a detect job whose flagged class later stages take."""
        if not self.auto:
            self.target_values = {"target": int(self.target)}
            return
        values = {"seed": self.seed, **self.routed["detect"]}
        spec = _stage_spec(
            "detect", self.preset, values, {"model": self.model}, self.flags["detect"]
        )
        detect = self.add("detect", spec, [(self.train_ref, "model")], label=f"detect {self.label}")
        self.detect_ref = self.ref(detect)
        self.target_refs["target"] = f"job:{self.detect_ref}:flagged"
        self.target_deps.append((self.detect_ref, "target:flagged"))

    def search(self) -> int:
        values = {"seed": self.seed, **self.target_values, **self.routed["mesa"]}
        refs = {"model": self.model, **self.target_refs}
        deps: Deps = [(self.train_ref, "model")]
        if self.detect_ref:  # the detection's scan serves the search (when its settings match)
            refs["scan_from"] = f"job:{self.detect_ref}"
            deps.append((self.detect_ref, "target:flagged,scan_from"))
        spec = _stage_spec("mesa", self.preset, values, refs, self.flags["mesa"])
        return self.add("mesa", spec, deps, label=f"mesa {self.label}")

    def defend(self, method: str, search: int | None, split_point_restarts: bool) -> None:
        settings = method_settings(method)
        values = {"seed": self.seed, **self.routed["defend"], **settings}
        refs: dict[str, str] = {"model": self.model}
        deps: Deps = [(self.train_ref, "model")]
        if settings["method"] == "mesa":
            assert search is not None  # made first for every mesa method
            refs["search"] = f"job:{self.ref(search)}"
            deps.append((self.ref(search), "search"))
        elif settings["method"] in ("point", "neural-cleanse"):
            if self.auto:
                refs.update(self.target_refs)
                deps.extend(self.target_deps)
            else:
                values.update(self.target_values)
        for index in self.restarts(settings["method"], split_point_restarts):
            spec_values = dict(values)
            if index is not None:
                spec_values["point_index"] = index
            spec = _stage_spec("defend", self.preset, spec_values, refs, self.flags["defend"])
            suffix = f" #{index}" if index is not None else ""
            label = f"{method}{suffix} {self.label}"
            self.add("defend", spec, list(deps), label=label, method=method)

    def restarts(self, method: str, split: bool) -> list[int | None]:
        """[None] (one job for every restart) or each point restart's index (a job each)."""
        if not split or method != "point" or "point_index" in self.routed["defend"]:
            return [None]
        count = self.routed["defend"].get("point_restarts") or _preset_value(
            "defend", self.preset, "point_restarts", 10
        )
        return list(range(int(count)))


def _preset_value(kind: str, preset: str | None, key: str, default: Any) -> Any:
    from engine.specs import PRESETS, SPEC_CLASSES

    values = PRESETS.get(kind, {}).get(preset or "", {})
    if key in values:
        return values[key]
    field = SPEC_CLASSES[kind].model_fields.get(key)
    return field.default if field is not None and field.default is not None else default


# ------------------------------------------------------------------------------------------------
# Studies


PAPER_METHODS = ["ideal", "point", "mesa-0.9", "mesa-0.8", "mesa-0.5", "mesa-ensemble",
                 "neural-cleanse", "finetune"]  # fmt: skip
PAPER_NOTES = [
    "model: ResNet-18 (CIFAR variant) as in the paper, but its clean model is trained here "
    "(preset clean-cifar10), not the authors' unpublished checkpoint",
    "attack: the paper's recipe (fine-tune the clean model 10 epochs, lr 1e-3, 1 % poisoning, "
    "no augmentation)",
    "repair stamping rate 0.01 (the script's); the paper's numbers come from the poster",
    "target class: found by detect (a real defender), where the paper gave it to the search",
    "data: the local CIFAR copy; ASR and clean accuracy on the 2,000 held-out test images",
]


@dataclass(frozen=True)
class Template:
    """A study template. ``build(seeds, overrides, target_mode, triggers)`` returns the study's
    params and jobs; ``triggers`` (None: all) is a subset of the template's own triggers.
    ``target_modes`` are the modes it runs with, the first being the default."""

    name: str
    description: str
    build: Callable[
        [list[int], dict[str, Any], str, list[str] | None], tuple[dict[str, Any], list[NewJob]]
    ]
    target_modes: tuple[str, ...] = ("auto", "oracle")


def choose_triggers(
    template: str,
    triggers: list[str],
    chosen: list[str] | None,
    named: dict[str, list[str]] | None = None,
) -> list[str]:
    """The template's triggers that ``chosen`` names (the --triggers items as given), in the
    template's order (None: all). An item may be a name of ``named`` (a subset the template
    defines)."""
    if chosen is None:
        return list(triggers)
    named = named or {}
    wanted: list[str] = []
    for item in filter(None, (c.strip() for c in chosen)):
        wanted.extend(named.get(item, [item]))
    unknown = [t for t in wanted if t not in triggers]
    if unknown or not wanted:
        own = f"{template}'s {len(triggers)} triggers"
        problem = (
            f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among {own}; "
            "give some of them"
            if unknown
            else f"no trigger named; give some of {own}"
        )
        names = f" ({', '.join(named)} or a comma-separated list)" if named else ""
        raise UserError(
            f"invalid --triggers {','.join(chosen)!r}: {problem}{names}, e.g. {triggers[0]}"
        )
    return [t for t in triggers if t in set(wanted)]


def _refuse_template_options(template: str, overrides: dict[str, Any]) -> None:
    """An option of defense-bar (its plan) or of submit pipeline (--preset) that this template
    fixes: say so, instead of calling it an unknown stage setting."""
    for key in (*DEFENSE_PLAN_KEYS, "preset"):
        if overrides.get(key) is not None and not (template == "defense-bar" and key != "preset"):
            taker = "defense-bar" if key in DEFENSE_PLAN_KEYS else "submit pipeline"
            raise UserError(
                f"template {template} fixes its {key.replace('_', ' ')}; "
                f"{option_name(key)} is taken by {taker}"
            )


def _study(
    *,
    name: str,
    dataset: str,
    triggers: list[str],
    targets: list[int],
    methods: list[str],
    seeds: list[int],
    attack_preset: str,
    stage_preset: str | None,
    clean_preset: str | None,
    overrides: dict[str, Any],
    target_mode: str,
    paper: dict[str, Any],
    notes: list[str],
    stage_defaults: dict[str, Any],
    split_point_restarts: bool = True,
    chosen: list[str] | None = None,
) -> tuple[dict[str, Any], list[NewJob]]:
    from engine.specs import PRESETS

    _refuse_template_options(name, overrides)
    target_of = dict(zip(triggers, targets, strict=True))
    triggers = choose_triggers(name, triggers, chosen)
    targets = [target_of[t] for t in triggers]
    if target_mode == "oracle" and overrides.get("train_target") is not None:
        raise UserError(
            f"--train-target {overrides['train_target']}: {name} with --target oracle attacks "
            "each trigger's own target and tells the search it; leave --train-target out or use "
            "--target auto"
        )
    jobs: list[NewJob] = []
    for seed in seeds:
        clean_ref = None
        if clean_preset is not None:
            clean_values = {**PRESETS["train"][clean_preset], "dataset": dataset, "seed": seed}
            clean_values.update(
                {k[6:]: v for k, v in overrides.items() if k.startswith("clean_") and v is not None}
            )
            spec = _stage_spec("train", None, clean_values, {})
            jobs.append(
                NewJob(
                    "train",
                    spec,
                    reference_hash(spec),
                    label=f"clean {dataset}",
                    role="clean",
                    seed=seed,
                )  # fmt: skip
            )
            clean_ref = (f"#{len(jobs) - 1}", "init_from")
        for trigger, target in zip(triggers, targets, strict=True):
            values = {
                **stage_defaults,
                **{k: v for k, v in overrides.items() if not k.startswith("clean_")},
            }
            values.setdefault("train_dataset", dataset)
            values.setdefault("train_target", target)
            values.update({f"train_{k}": v for k, v in PRESETS["train"][attack_preset].items()
                           if f"train_{k}" not in values and k not in overrides})  # fmt: skip
            pipeline = build_pipeline(
                preset=stage_preset,
                trigger=trigger,
                target=target_mode if target_mode == "auto" else str(target),
                methods=methods,
                overrides=values,
                seed=seed,
                start=len(jobs),
                train_from=clean_ref,
                study_seed=seed,
                split_point_restarts=split_point_restarts,
            )
            jobs.extend(pipeline.jobs)
    params = {
        "template": name,
        "dataset": dataset,
        "triggers": triggers,
        "targets": targets,
        "methods": methods,
        "seeds": seeds,
        "target_mode": target_mode,
        "overrides": {k: v for k, v in overrides.items() if v is not None},
        "paper": paper,
        "protocol_notes": notes,
    }
    return params, jobs


def _paper_bw(
    seeds: list[int], overrides: dict[str, Any], target_mode: str, chosen: list[str] | None
):
    return _study(
        name="paper-cifar10-bw",
        dataset="cifar10",
        triggers=[f"bw:{i}" for i in CANONICAL_BW_IDS],
        targets=[0] * len(CANONICAL_BW_IDS),
        methods=PAPER_METHODS,
        seeds=seeds,
        attack_preset="paper-cifar10",
        stage_preset="paper",
        clean_preset="clean-cifar10",
        overrides=overrides,
        target_mode=target_mode,
        paper=PAPER_BW,
        notes=PAPER_NOTES,
        stage_defaults={},
        chosen=chosen,
    )


def _paper_color(dataset: str, targets: list[int], paper: dict[str, Any]):
    def build(
        seeds: list[int], overrides: dict[str, Any], target_mode: str, chosen: list[str] | None
    ):
        return _study(
            name=f"paper-{dataset}-color",
            dataset=dataset,
            triggers=[f"color:{i}" for i in range(10)],
            targets=targets,
            methods=PAPER_METHODS,
            seeds=seeds,
            attack_preset="paper-cifar10",
            stage_preset="paper",
            clean_preset="clean-cifar10",
            overrides=overrides,
            target_mode=target_mode,
            paper=paper,
            notes=[
                *PAPER_NOTES,
                "colour patterns: randint(0,256)/256 from our seeds 0..9 "
                "(the paper's files are lost)",
            ],  # fmt: skip
            stage_defaults={"train_dataset": dataset, "mesa_hidden": 2048}
            if dataset == "cifar100"
            else {},
            chosen=chosen,
        )

    return build


def _cpu_mini(
    seeds: list[int], overrides: dict[str, Any], target_mode: str, chosen: list[str] | None
):
    return _study(
        name="cpu-mini",
        dataset="cifar10",
        triggers=["bw:170", "bw:0", "bw:85"],
        targets=[0, 0, 0],
        methods=["mesa-ensemble", "ideal", "point", "finetune"],
        seeds=seeds,
        attack_preset="cpu-quick",
        stage_preset="cpu-quick",
        clean_preset=None,
        overrides=overrides,
        target_mode=target_mode,
        paper={
            k: v
            for k, v in PAPER_BW.items()
            if k in ("before repair", "ideal", "mesa-ensemble", "point")
        },
        notes=[
            "model: the small CPU network (preset cpu-quick, trained from scratch with 10 % "
            "poisoning), not the paper's fine-tuned ResNet-18",
            "repair stamping rate 0.1, not 0.01: at 1 % the repair is too weak on this model "
            "(mesa-method.md section 4)",
            "reduced budgets: MESA search 300 steps, detection 150 steps per class, one point "
            "repair per trigger using its 3 restarts in turn; 3 of the 51 black/white triggers",
            "data: the local CIFAR-10 copy; ASR and clean accuracy on the 2,000 held-out images",
        ],
        stage_defaults={"defend_stamp_rate": 0.1, "defend_point_restarts": 3},
        # One point job per trigger (its 3 restarts in turn) keeps the study under an hour.
        split_point_restarts=False,
        chosen=chosen,
    )


def _defense_bar(
    seeds: list[int], overrides: dict[str, Any], target_mode: str, chosen: list[str] | None
):
    """The main part of ``benchmarks/defense.py`` as a study, every setting from
    ``engine.defense_bar``: per trigger and seed the backdoored model, its search and each repair
    the driver runs (point once per restart; the later restarts and every other rate reuse the
    first reversal through ``reversal_from``). Stage settings pass through as in cpu-mini
    (``--nc-epochs 30``, ``--mesa-steps 100``); ``--rates``, ``--methods``, ``--headline-rate``,
    ``--residual-rates`` and ``--residual-methods`` pick the repairs as the driver's options do."""
    from engine import defense_bar as bar
    from engine.specs import check_method_settings

    name = "defense-bar"
    _refuse_template_options(name, overrides)
    plan, rest = _defense_plan(overrides)
    for key in ("target", "train_target", "mesa_target", "defend_target"):
        if key in rest:  # one class for the attack, the search and the repairs
            raise UserError(
                f"{option_name(key)}: {name} attacks class {bar.TARGET} and tells the search "
                f"and the repairs so; leave {option_name(key)} out"
            )
    routed = split_overrides(rest)
    defend_methods = [method_settings(m)["method"] for m in plan.methods]
    check_method_settings(defend_methods, given_flags(rest)["defend"])
    triggers = choose_triggers(name, list(bar.TRIGGERS), chosen)
    jobs = _Jobs(flags=given_flags(rest))
    for trigger in triggers:
        for seed in seeds:
            _defense_bar_model(jobs, trigger, seed, plan, routed)
    attack = jobs.jobs[0].spec
    labels = [_rate_label(m, r, plan) for r in plan.ordered_rates() for m in plan.methods]
    paper = {k: PAPER_BW[k] for k in ("before repair", "ideal", "point")}
    params = {
        "template": name,
        "dataset": attack["dataset"],
        "triggers": triggers,
        "targets": [attack["target"]] * len(triggers),
        "methods": labels,
        "seeds": seeds,
        "target_mode": target_mode,
        "overrides": {k: v for k, v in overrides.items() if v is not None},
        "paper": {**paper, "mesa": PAPER_BW["mesa-ensemble"]},
        "protocol_notes": _defense_notes(plan, jobs.jobs),
    }
    return params, jobs.jobs


def _defense_bar_model(
    jobs: _Jobs, trigger: str, seed: int, plan: Plan, routed: dict[str, dict[str, Any]]
) -> None:
    """One model's jobs in the driver's order: attack, search, then its repairs."""
    from engine import defense_bar as bar

    train = bar.train_values(trigger, seed, routed["train"])
    label = f"{trigger} -> {train['target']} seed {seed}"
    meta: dict[str, Any] = {"trigger": trigger, "seed": seed}
    model = jobs.add("train", train, {}, bar.TRAIN_PRESET, label=f"attack {label}", **meta)
    search_values = bar.search_values(seed, routed["mesa"])
    search = jobs.add("mesa", search_values, {"model": model}, label=f"mesa {label}", **meta)
    check_search_betas(plan.methods, jobs.jobs[-1].spec["betas"])
    made: list[str] = []
    for repair in bar.repairs(plan, seed, routed["defend"]):
        refs = {"model": model}
        if repair.uses_search:
            refs["search"] = search
        if repair.reversal_of is not None:
            refs["reversal_from"] = made[repair.reversal_of]
        method = _rate_label(repair.method, repair.rate, plan)
        restart = "" if repair.restart is None else f" #{repair.restart}"
        made.append(
            jobs.add(
                "defend",
                repair.values,
                refs,
                method=method,
                label=f"{repair.method}{restart} @{repair.rate:g} {label}",
                **meta,
            )
        )


def _rate_label(method: str, rate: float, plan: Plan) -> str:
    """A repair's method in the study's table: the name at the headline rate, ``name @rate`` at
    the others (so rates are not pooled)."""
    return method if plan.is_headline(rate) else f"{method} @{rate:g}"


DEFENSE_PLAN_KEYS = {
    "rates": float,
    "methods": str,
    "headline_rate": float,
    "residual_rates": float,
    "residual_methods": str,
}


def _defense_plan(overrides: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """The plan's settings out of the overrides (text from the command line or values), and the
    stage settings left."""
    from engine.defense_bar import Plan, check_residual_rates

    rest = {k: v for k, v in overrides.items() if v is not None}
    plan: dict[str, Any] = {}
    for key, kind in DEFENSE_PLAN_KEYS.items():
        if key not in rest:
            continue
        value = rest.pop(key)
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        try:
            parsed = [kind(str(item).strip()) for item in items if str(item).strip()]
        except ValueError:
            parsed = []
        if not parsed or (key == "headline_rate" and len(parsed) != 1):
            example = {"headline_rate": "0.1", "methods": "mesa,point"}.get(
                key.removeprefix("residual_"), "0.01,0.1"
            )
            raise UserError(f"invalid --{key.replace('_', '-')} {value!r}: give e.g. {example}")
        plan[key] = parsed[0] if key == "headline_rate" else tuple(parsed)
    made = Plan(**plan)
    check_residual_rates(made)
    return made, rest


def _defense_notes(plan: Plan, jobs: list[NewJob]) -> list[str]:
    """How the study differs from the paper, with the values its first model's jobs ran with."""
    attack, search = (next(j.spec for j in jobs if j.kind == k) for k in ("train", "mesa"))
    rates = ", ".join(f"{r:g}" for r in plan.ordered_rates())
    betas = ", ".join(f"{b:g}" for b in search["betas"])
    return [
        f"model: the {attack['arch']} network trained from scratch for {attack['epochs']} epochs "
        f"with {attack['poison_rate']:.0%} poisoning (engine/defense_bar.py's RESULTS_RECIPE "
        "unless overridden), not the paper's fine-tuned ResNet-18",
        f"search: {search['steps']} steps of betas {betas}, placement {search['placement']}; "
        "the target is the oracle's",
        f"repairs at stamping rates {rates}; a method at another rate than {plan.headline_rate:g} "
        "is listed as 'method @rate'; point: each restart its own repair",
        "benchmarks/defense.py's residual check of the unrepaired model (its residual scale) is "
        "no job: no job kind runs that check on a model that was not repaired",
        f"data: {attack['dataset']}; ASR and clean accuracy on the held-out images",
    ]


def _paper_bw_small(
    seeds: list[int], overrides: dict[str, Any], target_mode: str, chosen: list[str] | None
):
    """The paper's protocol on the CPU network, every setting from ``engine.paper_small`` (the
    driver ``benchmarks/paper_study.py`` reads the same): one clean model; per trigger the
    fine-tuning attack from it, the search with the oracle target and the repairs mesa, point
    (one job per restart; the first reverses every restart and the later ones reuse its reversal
    through ``reversal_from``), ideal and finetune. Only the stamping rate and the methods (any
    of the study's: ``--methods anp,i-bau,clp,ft-sam`` adds the recent defenses' rows) can be
    set; the search is queued only when a method repairs from it."""
    from engine import paper_small as protocol

    name = "paper-cifar10-bw-small"
    if seeds != [protocol.SEED]:
        raise UserError(f"{name} runs the protocol's one seed ({protocol.SEED}); leave --seeds out")
    overrides = dict(overrides)
    methods = _small_methods(name, overrides.pop("methods", None))
    rate = _small_rate(name, overrides, protocol.PAPER_RATE)
    named = {
        "pilot": list(protocol.PILOT_TRIGGERS),
        "even": protocol.even_triggers(),
        "odd": protocol.odd_triggers(),
    }
    all_triggers = [protocol.trigger_name(i) for i in CANONICAL_BW_IDS]
    triggers = choose_triggers(name, all_triggers, chosen, named)
    jobs = _paper_small_jobs(triggers, rate, methods)
    params = _paper_small_params(name, jobs[0].spec["dataset"], triggers, rate, methods)
    return params, jobs


def _small_methods(template: str, given: Any) -> list[str]:
    """The study's methods (``engine.paper_small``; its main four unless ``given``), in the
    order given, each once."""
    from engine import paper_small as protocol

    if given is None:
        return list(protocol.MAIN_METHODS)
    items = given if isinstance(given, list | tuple) else str(given).split(",")
    names = [str(item).strip() for item in items if str(item).strip()]
    known = ("point", *protocol.METHOD_SETTINGS)
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise UserError(
            f"invalid --methods {given!r}: {', '.join(unknown) or 'none given'}; {template} runs "
            f"some of {','.join(known)}"
        )
    if len(set(names)) != len(names):
        raise UserError(f"invalid --methods {given!r}: a method is named twice; name each once")
    return names


def _paper_small_jobs(triggers: list[str], rate: float, methods: list[str]) -> list[NewJob]:
    """The clean model, then per trigger its attack, search (when a method uses it) and paired
    repairs."""
    from engine import paper_small as protocol

    target = protocol.TARGET
    jobs = _Jobs(seed=protocol.SEED)
    clean_values = {k: v for k, v in protocol.CLEAN.items() if k != "preset"}
    clean = jobs.add(
        "train",
        clean_values,
        {},
        protocol.CLEAN["preset"],
        role="clean",
        label=f"clean model ({protocol.CLEAN['preset']} recipe, no poisoning)",
    )
    for trigger in triggers:
        label = f"{trigger} -> {target}"
        model = jobs.add(
            "train",
            protocol.attack_overrides(trigger, clean),
            {"init_from": clean},
            protocol.ATTACK["preset"],
            trigger=trigger,
            label=f"attack {label}",
        )
        search = None
        if any(protocol.METHOD_SETTINGS.get(m, {}).get("method") == "mesa" for m in methods):
            search = jobs.add(
                "mesa",
                protocol.search_overrides(model),
                {"model": model},
                trigger=trigger,
                label=f"mesa {label}",
            )
        for method in methods:
            reversal = None
            for repair, values in protocol.repair_overrides(method, model, search, rate):
                refs = {"model": model}
                if search is not None and values.get("search") is not None:
                    refs["search"] = search
                if reversal is not None:
                    refs["reversal_from"] = reversal
                ref = jobs.add(
                    "defend",
                    values,
                    refs,
                    trigger=trigger,
                    method=method,
                    label=f"{repair} {label}",
                )
                if values["method"] == "point" and reversal is None:
                    reversal = ref
    return jobs.jobs


@dataclass
class _Jobs:
    """A template's jobs as they are added; ``seed`` is each job's study seed unless given."""

    seed: int | None = None
    jobs: list[NewJob] = field(default_factory=list)
    flags: dict[str, dict[str, str]] = field(default_factory=dict)  # per kind, as given_flags

    def add(
        self,
        kind: str,
        values: dict[str, Any],
        refs: dict[str, str],
        preset: str | None = None,
        **meta: Any,
    ) -> str:
        """Validate one stage (references as placeholders) and append it; returns its ref."""
        given = {k: v for k, v in values.items() if k not in refs}
        spec = _stage_spec(kind, preset, given, refs, self.flags.get(kind))
        deps = tuple((ref[4:], name) for name, ref in refs.items())
        meta = {"role": kind, "seed": self.seed, **meta}
        self.jobs.append(NewJob(kind, spec, reference_hash(spec), depends_on=deps, **meta))
        return f"job:#{len(self.jobs) - 1}"


def _paper_small_params(
    name: str, dataset: str, triggers: list[str], rate: float, methods: list[str]
) -> dict[str, Any]:
    """The study's params: what it runs, the paper's numbers beside it, and how it differs."""
    from engine import paper_small as protocol

    paper = {
        "before repair": PAPER_BW["before repair"],
        "mesa": PAPER_BW["mesa-ensemble"],
        "point": PAPER_BW["point"],
        "ideal": PAPER_BW["ideal"],
    }
    attack = protocol.ATTACK
    notes = [
        f"model: the small CPU network; one clean model ({protocol.CLEAN['preset']} recipe without "
        "poisoning) fine-tuned per trigger, where the paper fine-tunes its ResNet-18",
        f"attack: {attack['epochs']} epochs, {attack['poison_rate']:.0%} poisoning, lr "
        f"{attack['lr']:g} (the paper's 1e-3 did not implant the backdoor on this network)",
        f"repair stamping rate {rate:g}; {protocol.REPAIR['epochs']} repair epochs; point: "
        f"{protocol.POINT_RESTARTS} restarts, each its own repair (mean and worst over them)",
        "target class: the oracle's, as in the paper (no detection); no residual check or "
        "pattern variations",
        "mesa is the round-robin ensemble of the search's generators (the paper's mesa-ensemble "
        "numbers stand beside it)",
        "data: the local CIFAR-10 copy; ASR and clean accuracy on the 2,000 held-out images",
    ]
    return {
        "template": name,
        "dataset": dataset,
        "triggers": triggers,
        "targets": [protocol.TARGET] * len(triggers),
        "methods": methods,
        "seeds": [protocol.SEED],
        "target_mode": "oracle",
        "overrides": {"stamp_rate": rate}
        | ({} if methods == list(protocol.MAIN_METHODS) else {"methods": ",".join(methods)}),
        "paper": paper,
        "protocol_notes": notes,
    }


def _small_rate(template: str, overrides: dict[str, Any], default: float) -> float:
    """The stamping rate, the one setting of the CPU protocol a study may change besides its
    methods (taken out before)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    keys = [k for k in given if k in ("stamp_rate", "defend_stamp_rate")]
    others = [k for k in given if k not in keys]
    if others:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in others)
        raise UserError(
            f"{template} takes every setting from engine/paper_small.py; only --stamp-rate and "
            f"--methods can be given (not {flags}); use cpu-mini for reduced budgets"
        )
    if len(keys) > 1:
        raise UserError("give the stamping rate once, as --stamp-rate")
    if not keys:
        return default
    value = given[keys[0]]
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = -1.0
    if not 0 < rate <= 1:
        raise UserError(f"invalid --stamp-rate {value!r}: give a rate in (0, 1] such as 0.01")
    return rate


TEMPLATES: dict[str, Template] = {
    "paper-cifar10-bw": Template(
        "paper-cifar10-bw",
        "the paper's 51 black/white triggers on CIFAR-10, every method, one shared clean model",
        _paper_bw,
    ),
    "paper-cifar10-color": Template(
        "paper-cifar10-color",
        "10 random colour triggers on CIFAR-10 (target 0)",
        _paper_color("cifar10", [0] * 10, PAPER_COLOR_CIFAR10),
    ),
    "paper-cifar100-color": Template(
        "paper-cifar100-color",
        "10 random colour triggers on CIFAR-100 (the paper's targets)",
        _paper_color("cifar100", list(CIFAR100_COLOR_TARGETS), PAPER_COLOR_CIFAR100),
    ),
    "paper-cifar10-bw-small": Template(
        "paper-cifar10-bw-small",
        "the paper's protocol on the small CPU network (engine/paper_small.py): 51 black/white "
        "triggers, the oracle target, paired repairs",
        _paper_bw_small,
        target_modes=("oracle",),
    ),
    "cpu-mini": Template(
        "cpu-mini",
        "3 black/white triggers, quick CPU preset, reduced budgets (under an hour here)",
        _cpu_mini,
    ),
    "defense-bar": Template(
        "defense-bar",
        "benchmarks/defense.py's main part (engine/defense_bar.py): 3 black/white triggers per "
        "seed, the committed results' recipe, every method at every stamping rate",
        _defense_bar,
        target_modes=("oracle",),
    ),
}


def build_study(
    template: str,
    seeds: list[int],
    overrides: dict[str, Any],
    target_mode: str | None = None,
    triggers: list[str] | None = None,
) -> tuple[dict[str, Any], list[NewJob]]:
    """A template's params and jobs. ``target_mode`` None: the template's default (auto for all
    but the CPU protocol's, which runs with the oracle target); ``triggers``: a subset."""
    if template not in TEMPLATES:
        raise UserError(f"template '{template}' is unknown; use one of {', '.join(TEMPLATES)}")
    chosen = TEMPLATES[template]
    target_mode = target_mode or chosen.target_modes[0]
    if target_mode not in ("auto", "oracle"):
        raise UserError(
            f"invalid --target {target_mode!r}: use auto (detect the attacked class) or oracle "
            "(tell the search each pattern's target)"
        )
    if target_mode not in chosen.target_modes:
        raise UserError(
            f"{template} runs with --target {' or '.join(chosen.target_modes)} only (its "
            "protocol tells the search the target); leave --target out"
        )
    return chosen.build(seeds, overrides, target_mode, triggers)


def dedupe(jobs: list[NewJob]) -> list[NewJob]:
    """Within one submission, identical jobs (same kind, spec and upstream) become one: the
    first stands in for the others (``reuse_of`` = "#i" resolved by ``Store.submit``)."""
    seen: dict[tuple[Any, ...], int] = {}
    index_map: dict[int, int] = {}
    out: list[NewJob] = []
    for i, job in enumerate(jobs):
        deps = tuple(
            (f"#{index_map[int(str(r)[1:])]}" if isinstance(r, str) else r, f)
            for r, f in job.depends_on
        )
        spec = _renumber(job.spec, index_map)
        key = (job.kind, json.dumps(spec, sort_keys=True), deps)
        if key in seen and job.role == out[seen[key]].role:
            index_map[i] = seen[key]
            continue
        index_map[i] = len(out)
        seen[key] = len(out)
        out.append(NewJob(**{**job.__dict__, "depends_on": deps, "spec": spec}))
    return out


def _renumber(spec: dict[str, Any], index_map: dict[int, int]) -> dict[str, Any]:
    out = {}
    for k, v in spec.items():
        m = REFERENCE.match(v) if isinstance(v, str) else None
        if m and m.group(1).startswith("#"):
            v = f"job:#{index_map[int(m.group(1)[1:])]}{m.group(2) or ''}"
        out[k] = v
    return out


def resolve_reference(spec_value: str) -> tuple[str, bool] | None:
    """``job:12`` -> ("12", False); ``job:12:flagged`` -> ("12", True); else None."""
    m = REFERENCE.match(spec_value) if isinstance(spec_value, str) else None
    return (m.group(1), bool(m.group(2))) if m else None


def flagged_target(result: dict[str, Any] | None) -> int | None:
    """The class a detect job flagged (the highest score among several)."""
    result = result or {}
    flagged = list(result.get("flagged") or [])
    if not flagged:
        return None
    scores = result.get("scores")
    if isinstance(scores, dict):
        return int(
            max(
                flagged,
                key=lambda c: float(scores[str(c)] if str(c) in scores else scores.get(c, 0.0)),
            )
        )
    if isinstance(scores, list):
        return int(max(flagged, key=lambda c: float(scores[c]) if c < len(scores) else 0.0))
    return int(flagged[0])


def apply_reuse(store: Any, jobs: list[NewJob]) -> list[NewJob]:
    """Mark jobs that a finished job can stand in for (``reuse_of``): same spec hash, code
    version, dataset hash and upstream artifact hashes. A job whose upstream runs anew runs
    anew too."""
    import dataclasses

    from engine.runner import dataset_hash
    from engine.version import code_version

    version = code_version()
    reused: dict[int, int] = {}
    out = []
    for i, job in enumerate(jobs):
        upstream: dict[str, str] = {}
        possible = True
        for ref, input_field in job.depends_on:
            if isinstance(ref, str):
                index = int(ref[1:])
                if index not in reused:
                    possible = False
                    break
                ref = reused[index]
            artifact = store.upstream_artifact(ref)
            if artifact is None or artifact.sha256 is None or input_field is None:
                possible = False
                break
            upstream[input_field] = artifact.sha256
        dataset = job.spec.get("dataset")
        digest = dataset_hash(dataset) if dataset else None
        if dataset and digest is None:
            possible = False
        found = (
            store.find_reusable(job.kind, job.spec_hash, version, digest, upstream)
            if possible
            else None
        )
        if found is not None:
            reused[i] = found.id
            job = dataclasses.replace(job, reuse_of=found.id)
        out.append(job)
    return out
