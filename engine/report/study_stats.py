"""A study's statistics from its finished repairs: the per-image outcomes each defend job wrote
(``outcomes.json`` in its repaired-model artifact) grouped into ``stats.summarize`` records.

Torch-free (the store's public API, json and numpy through ``stats``): ``study show``, the app's
study screen (in a worker) and anything else call ``study_statistics`` and get the same table.
One record per (trigger, seed): the attack's held-out outcomes are the repairs' ``before``, each
method's repair its ``after``; the point restarts of a trigger (jobs with a ``point_index``)
become the record's ``restarts``, in index order. Methods keep the study's labels (mesa,
mesa-0.9, ideal, finetune, ...). No job scores a trigger on the clean model, so ``floor`` is
None. A finished repair without outcomes (written before the file existed, or whose artifact is
gone) is left out and listed by job id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.report.stats import summarize

OUTCOMES_FILE = "outcomes.json"  # engine.tasks.defend.OUTCOMES_FILE (that module loads torch)
# The method the others are compared with, the first of these the study has (else its first
# method with one repair per trigger).
REFERENCES = ("mesa", "mesa-ensemble")


def study_statistics(store: Any, name: str) -> dict[str, Any] | None:
    """``stats.summarize``'s table for the study ``name`` (None when no finished repair has
    outcomes), plus ``records`` (triggers x seeds), ``repairs`` (the jobs used) and
    ``without_outcomes`` (job ids left out). A table the records cannot make (outcomes of
    different lengths in one trigger, say) is ``{"error": message}``."""
    info = store.study(name)
    records, methods, used, missing = study_records(
        store.study_repairs(name), info.params.get("methods") or []
    )
    if not records:
        return None
    reference = pick_reference(records, methods)
    extra = {"records": len(records), "repairs": used, "without_outcomes": missing}
    if reference is None:
        return {
            "error": "no method with one repair per trigger to compare the others with",
            **extra,
        }
    try:
        table = summarize(records, methods, reference=reference)
    except ValueError as error:
        return {"error": str(error), **extra}
    return {**table, **extra}


def study_records(
    repairs: Sequence[Any], order: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[str], int, list[int]]:
    """(records, methods, repairs used, job ids without outcomes) from a study's succeeded
    defend jobs (``Store.study_repairs``). ``methods``: those of ``order`` present, then the
    others in job order."""
    groups: dict[tuple[str, Any], list[tuple[Any, Mapping[str, Any]]]] = {}
    missing: list[int] = []
    for repair in repairs:
        outcomes = _outcomes(repair)
        if outcomes is None:
            missing.append(repair.job_id)
            continue
        key = (repair.trigger or str(repair.spec.get("trigger", "?")), repair.seed)
        groups.setdefault(key, []).append((repair, outcomes))
    seeds = {seed for _, seed in groups}
    records = [
        _record(trigger if len(seeds) == 1 else f"{trigger}/seed={seed}", seed, group)
        for (trigger, seed), group in groups.items()
    ]
    present = list(dict.fromkeys(m for r in records for m in r["repairs"]))
    methods = [m for m in order if m in present] + [m for m in present if m not in order]
    return records, methods, sum(len(g) for g in groups.values()), missing


def pick_reference(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str | None:
    """MESA where the study has it, else the first method with a single repair per trigger."""
    single = [m for m in methods if not any("restarts" in r["repairs"].get(m, {}) for r in records)]
    for name in (*REFERENCES, *(m for m in single if m.startswith("mesa")), *single):
        if name in single:
            return name
    return None


def _method(repair: Any) -> str:
    return repair.method or str(repair.spec.get("method", "defend"))


def _outcomes(repair: Any) -> dict[str, Any] | None:
    """The job's ``outcomes.json`` when it holds ASR and clean outcomes before and after."""
    artifact = (repair.result or {}).get("artifact")
    if not artifact:
        return None
    try:
        data = json.loads((Path(artifact) / OUTCOMES_FILE).read_text())
    except (OSError, ValueError):
        return None
    parts = [data.get(side) for side in ("before", "after")] if isinstance(data, dict) else []
    if not parts or not all(
        isinstance(p, dict) and all(isinstance(p.get(k), str) and p[k] for k in ("asr", "clean"))
        for p in parts
    ):
        return None
    return data


def _run(repair: Any, outcomes: Mapping[str, Any]) -> dict[str, Any]:
    metrics = (repair.result or {}).get("metrics", {})
    after = outcomes["after"]
    run = {
        "job_id": repair.job_id,
        "asr": metrics.get("eval/asr"),
        "acc_clean": metrics.get("eval/acc_clean"),
        "asr_outcomes": after["asr"],
        "clean_outcomes": after["clean"],
    }
    if repair.spec.get("point_index") is not None:
        run["point_index"] = repair.spec["point_index"]
    return run


def _record(name: str, seed: Any, group: list[tuple[Any, Mapping[str, Any]]]) -> dict[str, Any]:
    """One trigger and seed in ``stats.summarize``'s schema; the first repair gives the attack."""
    first, outcomes = group[0]
    before = outcomes["before"]
    by_method: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for repair, found in group:
        by_method.setdefault(_method(repair), []).append((repair, _run(repair, found)))
    repairs: dict[str, Any] = {}
    for method, runs in by_method.items():
        if len(runs) == 1 and runs[0][0].spec.get("point_index") is None:
            repairs[method] = runs[0][1]
            continue
        runs.sort(key=lambda r: (r[1].get("point_index", -1), r[1]["job_id"]))
        repairs[method] = {"restarts": [run for _, run in runs]}
    return {
        "schema": 1,
        "trigger": name,
        "seed": seed,
        "target": (first.result or {}).get("target", first.spec.get("target")),
        "rate": first.spec.get("stamp_rate"),
        "floor": None,
        "attack": {
            "asr": before["asr"].count("1") / len(before["asr"]),
            "asr_outcomes": before["asr"],
            "clean_outcomes": before["clean"],
        },
        "repairs": repairs,
    }
