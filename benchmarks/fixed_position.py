"""Fixed-position backdoors on the CPU network (issue 31): detection, the MESA repair beside
point, Neural Cleanse and fine-tuning, and the clean models' false positives.

Units, in the order they answer the main question (``--units all``):

1. BackdoorBench-style attacks (BadNets: one patch at one place, 10 % poisoning, the cpu-quick
   preset from scratch, target 0): ``square:white``, ``bw:0`` (all black) and ``bw:85`` (a
   black-and-white pattern that is none of the scan's probes), at the
   bottom-right ``corner`` and at the fixed off-corner offset ``at:8,8``, seeds 0 then 1. Per
   model: clean accuracy and ASR, detection (``learned`` placement, all 10 classes: per-class
   validity, z, flagged classes, where pi puts the triggers), the MESA search (``learned``, the
   cpu-quick preset, the attack's target as in the paper-figure study), and the repairs at rate
   0.1 (mesa, its generators' samples alone as first measured; mesa-probes, with the position
   scan's valid probes mixed in at the default share; ideal: the oracle floor with the true
   trigger stamped where the attack stamped; point restart 0, neural-cleanse, finetune) paired
   as in that study: one seed, so
   every repair sees the same batches, the same stamped images and the same held-out images;
   each with its ASR, a 95 % Wilson interval and the per-image held-out outcomes.
2. ``clean-s0..2`` (and ``clean-s3..7`` after the second seeds): models trained without
   poisoning; detection must flag nothing (the false-positive rate is the share of clean seeds
   with a flagged class; per class, the share of classes without a backdoor that are flagged).
3. ``paper-bw-ID`` (``--units paper``): the random-position check on the paper study's model
   for that trigger (kept in its work folder, ``--paper-work``, or attacked there again as the
   study did): detection and the ``learned`` search + MESA repairs (mesa, mesa-probes) at 0.1,
   beside the committed record of that model (``--paper-results``); ``same_model`` says whether
   the model scored the held-out images before repair as the record's did.

Each finished unit is written whole as ``RESULTS/<unit>.json``; a rerun skips what exists and the
tasks of an unfinished unit resume from the work folder (``--workdir``, kept between runs), so
the remainder runs in a later sitting with the same command. A finished unit whose record lacks
a method of ``METHODS`` (one added since, such as ``ideal``) gets that repair alone, on the kept
attack and search of its work folder; its finished repairs are not run again (``added`` in the
record says what was added, when and by which commit). ``<unit>.partial.json`` holds what
an unfinished unit has so far (attack and detection first: the main question), and is removed
when the unit completes.

Usage:
  MESA_TUI_THREADS=2 python benchmarks/fixed_position.py                # everything, in order
  MESA_TUI_THREADS=2 python benchmarks/fixed_position.py --units square-white_corner_s0
  MESA_TUI_THREADS=2 python benchmarks/fixed_position.py --units paper --paper-triggers bw:0
  python benchmarks/fixed_position.py --list                            # units and their state
Progress goes to stderr; each written file's path to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._paper import (  # noqa: E402
    commit,
    log,
    machine,
    paper_attack,
    read_outcomes,
    repair_entry,
    run_task,
    same_model,
    write_json,
)
from benchmarks._script import run_main  # noqa: E402
from engine.errors import UserError  # noqa: E402

SCHEMA = 1
RESULTS = ROOT / "docs/results/fixed-position"
TARGET = 0
RATE = 0.1
POISON = 0.1
# bw:85 is a black-and-white pattern that none of the scan's 16 probes equals (each is at least
# 2 pixels off it for search seeds 0 and 1), so the probes cannot stand in for the true trigger
# there, as the white and black probes can for square:white and bw:0.
TRIGGERS = ("square:white", "bw:0", "bw:85")
PLACEMENTS = ("corner", "at:8,8")
SEEDS = (0, 1)
CLEAN_SEEDS = (0, 1, 2)
# More clean seeds after the second attack seeds: each tightens the per-model false-positive
# interval (0 of 3 still allows 56 %; 0 of 8 allows 32 %), and costs an attack and a detection.
MORE_CLEAN_SEEDS = (3, 4, 5, 6, 7)
# ``mesa``: MESA's repair as first measured, its generators' samples alone (probe_share 0);
# ``mesa-probes``: with the position scan's valid probes mixed in at the default share;
# ``ideal``: the oracle floor, the true trigger stamped where the attack stamped.
METHODS = ("mesa", "mesa-probes", "ideal", "point", "neural-cleanse", "finetune")
MESA_METHODS = ("mesa", "mesa-probes")
# --quick: a smoke run on the cut dataset (tests), every stage at a token size.
QUICK: dict[str, dict[str, Any]] = {
    "train": {"dataset": "cifar10-quick", "epochs": 1, "crop_epochs": 0, "batch_size": 128},
    "detect": {
        "steps": 4,
        "n_eval_triggers": 8,
        "eval_images": 16,
        "classes": [0, 1, 2],
        "scan_probes": 2,
        "scan_images": 2,
    },
    "mesa": {
        "steps": 6,
        "sample_every": 3,
        "n_eval_triggers": 8,
        "eval_images": 16,
        "samples": 32,
        "scan_probes": 2,
        "scan_images": 2,
    },
    "defend": {"epochs": 1, "point_epochs": 1, "nc_epochs": 2, "nc_steps_per_epoch": 2},
}
CUT: dict[str, dict[str, Any]] = {}  # QUICK when --quick, else nothing
PAPER_WORK = ROOT / ".paper-work"  # the paper study's own default work folder
PAPER_RESULTS = ROOT / "docs/results/paper-small"


def attack_name(trigger: str, placement: str, seed: int) -> str:
    where = placement.replace(":", "").replace(",", "-")
    return f"{trigger.replace(':', '-')}_{where}_s{seed}"


def attack_units() -> list[dict[str, Any]]:
    """Seed 0 of every attack first (white corner, bw corner, then off-corner), then the clean
    seeds, then the second seeds, then more clean seeds."""
    units = []
    first = [(t, p) for p in PLACEMENTS for t in TRIGGERS]
    for t, p in first:
        units.append({"kind": "attack", "trigger": t, "placement": p, "seed": SEEDS[0]})
    for s in CLEAN_SEEDS:
        units.append({"kind": "clean", "seed": s})
    for seed in SEEDS[1:]:
        for t, p in first:
            units.append({"kind": "attack", "trigger": t, "placement": p, "seed": seed})
    for s in MORE_CLEAN_SEEDS:
        units.append({"kind": "clean", "seed": s})
    for u in units:
        u["name"] = (
            f"clean-s{u['seed']}"
            if u["kind"] == "clean"
            else attack_name(u["trigger"], u["placement"], u["seed"])
        )
    return units


def paper_units(triggers: list[str]) -> list[dict[str, Any]]:
    return [
        {"kind": "paper", "trigger": t, "name": f"paper-{t.replace(':', '-')}"} for t in triggers
    ]


# ---------------------------------------------------------------------------------------------
# Pieces


def wilson_entry(bits: str) -> dict[str, Any]:
    from engine.report.stats import wilson

    k, n = bits.count("1"), len(bits)
    low, high = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "wilson95": [low, high]}


def paired(a: str, b: str) -> dict[str, int]:
    """Held-out images where the trigger still works after repair a / b (same images)."""
    if len(a) != len(b):
        raise ValueError("outcomes of different held-out sets are not paired")
    return {
        "both": sum(x == "1" and y == "1" for x, y in zip(a, b, strict=True)),
        "only_first": sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True)),
        "only_second": sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True)),
        "neither": sum(x == "0" and y == "0" for x, y in zip(a, b, strict=True)),
    }


def detection(model: str, seed: int, folder: Path, placement: str = "learned") -> dict[str, Any]:
    values = {"model": model, "seed": seed, "placement": placement, **CUT.get("detect", {})}
    result, seconds = run_task("detect", values, folder, "cpu-quick")
    report = json.loads((Path(result.artifact) / "detect.json").read_text())
    return {
        "placement": placement,
        "flagged": report["flagged"],
        "scores": report["scores"],
        "z": report["z"],
        "positions": {
            c: {k: v for k, v in where.items() if k != "probs"}
            for c, where in report.get("positions", {}).items()
        },
        # The position scan: per class its lift (peak minus median), peak offset and robust z.
        "scan": report.get("scan"),
        "seconds": seconds,
    }


def search_stage(model: str, seed: int, folder: Path, overrides: dict | None = None) -> dict:
    values = {"model": model, "target": TARGET, "seed": seed, "placement": "learned"}
    values.update(overrides or {})
    values.update(CUT.get("mesa", {}))
    result, seconds = run_task("mesa", values, folder, "cpu-quick" if not overrides else None)
    stats = json.loads((Path(result.artifact) / "stats.json").read_text())
    betas = stats["betas"]
    return {
        "artifact": result.artifact,
        "placement": values["placement"],
        "validity": {f"{b:g}": result.metrics.get(f"mesa/beta={b:g}/validity") for b in betas},
        "positions": stats.get("positions", {}),
        "seconds": seconds,
    }


def repair_settings(method: str, model: str, search: str, seed: int) -> dict[str, Any]:
    base = {
        "model": model,
        "seed": seed,
        "target": TARGET,
        "epochs": 10,
        "stamp_rate": RATE,
        "residual_steps": 0,
        "variations": False,
    }
    if method == "mesa":
        return {**base, "method": "mesa", "search": search, "probe_share": 0.0}
    if method == "mesa-probes":
        return {**base, "method": "mesa", "search": search}
    if method == "point":
        return {**base, "method": "point", "point_restarts": 3, "point_index": 0}
    return {**base, "method": method}


def repairs(model: str, search: str, seed: int, base: Path, methods, progress):
    """(each method's repair entry by name, the model's held-out outcomes before repair);
    ``progress`` gets each entry as it finishes."""
    entries: dict[str, Any] = {}
    before = None
    for method in methods:
        log(f"{base.name}: repair {method} at rate {RATE:g}")
        result, seconds = run_task(
            "defend",
            {**repair_settings(method, model, search, seed), **CUT.get("defend", {})},
            base / f"rate-{RATE:g}" / method,
            "cpu-quick",
        )
        outcomes = read_outcomes(result)
        entry = repair_entry(result, seconds, outcomes)
        entry["asr_interval"] = wilson_entry(entry["asr_outcomes"])
        before = before or outcomes["before"]
        if method in MESA_METHODS:
            entry["positions"] = result.extra.get("positions")
            entry["probes"] = result.extra.get("probes")  # absent: no probe mixed in
        entries[method] = entry
        progress(method, entry)
    return entries, before


def pair_with_mesa(entries: dict[str, Any]) -> None:
    """Each other repair's held-out outcomes counted against MESA's (same images)."""
    if "mesa" in entries:
        for method, entry in entries.items():
            if method != "mesa":
                entry["paired_with_mesa"] = paired(
                    entries["mesa"]["asr_outcomes"], entry["asr_outcomes"]
                )


# ---------------------------------------------------------------------------------------------
# Units


def train(unit: dict[str, Any], base: Path) -> tuple[Any, float]:
    if unit["kind"] == "clean":
        overrides = {"trigger": "none", "poison_rate": 0.0, "seed": unit["seed"]}
    else:
        overrides = {
            "trigger": unit["trigger"],
            "placement": unit["placement"],
            "target": TARGET,
            "poison_rate": POISON,
            "seed": unit["seed"],
        }
    overrides.update(CUT.get("train", {}))
    log(f"{unit['name']}: attack (cpu-quick from scratch)")
    return run_task("train", overrides, base / "attack", "cpu-quick")


def the_model(unit: dict[str, Any], base: Path, record: dict[str, Any]) -> tuple[str, int]:
    """(model artifact, seed): the kept paper-study model, or the attack (reused when kept)."""
    if unit["kind"] == "paper":
        model = paper_model(unit["trigger"])
        record["model"] = model
        return model, 0
    attack, attack_s = train(unit, base)
    record["attack"] = {
        "acc_clean": attack.metrics.get("eval/acc_clean"),
        "asr": attack.metrics.get("eval/asr"),
        "seconds": attack_s,
    }
    return attack.artifact, unit["seed"]


def paper_model(trigger: str) -> str:
    """The paper study's attacked model for ``trigger``: kept in its work folder, or attacked
    again there as the study attacks it (the committed clean model, the same settings and seed),
    so a fresh machine can run the check. The record's ``same_model`` says whether it scores the
    held-out images as the study's model did."""
    clean = PAPER_RESULTS / "clean-model"
    if not (clean / "manifest.json").exists():
        raise UserError(f"no committed clean model at {clean}; give --paper-results")
    log(f"paper {trigger}: the study's attack (kept, or run again as the study ran it)")
    attack, _ = paper_attack(PAPER_WORK, trigger, clean)
    return str(attack.artifact)


def the_search(unit: dict[str, Any], model: str, seed: int, base: Path) -> dict[str, Any]:
    log(f"{unit['name']}: MESA search (learned placement)")
    if unit["kind"] == "paper":
        from engine import paper_small as protocol

        overrides = {**protocol.SEARCH, "placement": "learned"}
        return search_stage(model, seed, base / "search", overrides)
    return search_stage(model, seed, base / "search")


def unit_methods(unit: dict[str, Any]) -> list[str]:
    return list(MESA_METHODS) if unit["kind"] == "paper" else list(METHODS)


def run_unit(unit: dict[str, Any], workdir: Path, results: Path) -> Path:
    started = time.perf_counter()
    base = workdir / unit["name"]
    partial_path = results / f"{unit['name']}.partial.json"
    record: dict[str, Any] = {"schema": SCHEMA, "unit": unit["name"], **unit}

    def save_partial() -> None:
        write_json(partial_path, {**record, "complete": False})
        print(partial_path, flush=True)

    model, seed = the_model(unit, base, record)
    log(f"{unit['name']}: detection (learned placement, every class)")
    record["detection"] = detection(model, seed, base / "detect")
    record["detection"]["flags_target"] = TARGET in record["detection"]["flagged"]
    save_partial()
    if unit["kind"] == "clean":
        record["false_positive"] = bool(record["detection"]["flagged"])
    else:
        search = the_search(unit, model, seed, base)
        record["search"] = {k: v for k, v in search.items() if k != "artifact"}
        save_partial()
        record["repairs"] = {}

        def progress(method: str, entry: dict) -> None:
            record["repairs"][method] = entry
            save_partial()

        methods = unit_methods(unit)
        record["repairs"], before = repairs(
            model, search["artifact"], seed, base, methods, progress
        )
        pair_with_mesa(record["repairs"])
        if unit["kind"] == "paper":
            record["paper_record"] = paper_comparison(unit["trigger"], record, before)
    record["run"] = {
        "machine": machine(bool(CUT)),
        "commit": commit(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
    }
    path = results / f"{unit['name']}.json"
    write_json(path, record)
    partial_path.unlink(missing_ok=True)
    return path


def missing_methods(unit: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The repairs a finished unit's record lacks (a method added to ``METHODS`` since)."""
    if unit["kind"] == "clean":
        return []
    return [m for m in unit_methods(unit) if m not in record.get("repairs", {})]


def complete_unit(unit: dict[str, Any], workdir: Path, results: Path) -> Path | None:
    """Add the missing repairs to a finished unit's record: the kept attack and search are
    reused (``run_task`` finds them in the work folder), the finished repairs are kept as
    recorded and not run again. None when nothing is missing."""
    path = results / f"{unit['name']}.json"
    record = json.loads(path.read_text())
    missing = missing_methods(unit, record)
    if not missing:
        return None
    started = time.perf_counter()
    base = workdir / unit["name"]
    now: dict[str, Any] = {}
    model, seed = the_model(unit, base, now)
    check_same_attack(unit, record, now, base)
    search = the_search(unit, model, seed, base)
    if search["validity"] != record["search"]["validity"]:
        raise UserError(
            f"{unit['name']}: the search in {base / 'search'} is not the recorded one; give the "
            "work folder the unit was made in (--workdir)"
        )

    def progress(method: str, entry: dict) -> None:
        record["repairs"][method] = entry
        write_json(path, record)

    repairs(model, search["artifact"], seed, base, missing, progress)
    pair_with_mesa(record["repairs"])
    record.setdefault("added", []).append(
        {
            "methods": missing,
            "machine": machine(bool(CUT)),
            "commit": commit(),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - started,
        }
    )
    write_json(path, record)
    return path


def check_same_attack(
    unit: dict[str, Any], record: dict[str, Any], now: dict[str, Any], base: Path
) -> None:
    """Refuse to add repairs to a record when the model at hand is not the recorded one: an
    attack made again (its kept copy lost) can differ, and the search's validity alone missed
    that once (both s0 square-white models were re-made 0.2-0.5 points off in clean accuracy)."""
    keys = ("acc_clean", "asr")
    was = {k: record.get("attack", {}).get(k) for k in keys}
    is_ = {k: now.get("attack", {}).get(k) for k in keys}
    if unit["kind"] != "paper" and was != is_:
        raise UserError(
            f"{unit['name']}: the model in {base / 'attack'} is not the recorded one (clean "
            f"accuracy and ASR {is_} against {was}); new repairs would not be paired with the "
            "recorded ones, so run the unit again from scratch in a new work folder"
        )


def paper_comparison(
    trigger: str, record: dict[str, Any], before: dict[str, str]
) -> dict[str, Any]:
    """The committed paper-study record of the same model at the same rate: its per-image MESA
    repair (per-image search) beside the learned one, paired on the same held-out images.
    ``same_model``: whether this model scored them before repair as the study's model did."""
    path = PAPER_RESULTS / f"rate-{RATE:g}" / f"{trigger.replace(':', '-')}.json"
    if not path.exists():
        return {"missing": str(path)}
    old = json.loads(path.read_text())
    old_mesa = old["repairs"]["mesa"]
    new_mesa = record["repairs"]["mesa"]
    return {
        "record": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "same_model": same_model(old, before),
        "search_validity_per_image": old["search"]["validity"],
        "mesa_per_image": {
            "asr": old_mesa["asr"],
            "acc_clean": old_mesa["acc_clean"],
            "asr_interval": wilson_entry(old_mesa["asr_outcomes"]),
        },
        "paired_learned_vs_per_image": paired(new_mesa["asr_outcomes"], old_mesa["asr_outcomes"]),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", default="all", help="all, attacks, clean, paper, or unit names")
    p.add_argument("--paper-triggers", default="bw:0,bw:1", help="kept paper models to check")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--workdir", type=Path, default=ROOT / ".fixed-work")
    p.add_argument("--paper-work", type=Path, default=PAPER_WORK)
    p.add_argument("--paper-results", type=Path, default=PAPER_RESULTS)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (cut dataset)")
    p.add_argument("--list", action="store_true", help="list the units and which are done")
    p.add_argument("--summary", action="store_true", help="print the finished units as tables")
    return p.parse_args(argv)


def pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def summary(results: Path) -> str:
    """Markdown tables of what has finished (and, marked, what is partial)."""
    rows = []
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        partial = path.name.endswith(".partial.json")
        det = r.get("detection", {})
        score = det.get("scores", {}).get(str(TARGET))
        others = [v for c, v in det.get("scores", {}).items() if c != str(TARGET)]
        scan = (det.get("scan") or {}).get("classes", {})
        lift = scan.get(str(TARGET), {}).get("lift")
        other_lifts = [v["lift"] for c, v in scan.items() if c != str(TARGET)]
        top = scan.get(str(TARGET), {})
        cells = [
            r["unit"] + (" (partial)" if partial else ""),
            pct(r.get("attack", {}).get("acc_clean")),
            pct(r.get("attack", {}).get("asr")),
            ",".join(map(str, det.get("flagged", []))) or "none",
            pct(score),
            pct(max(others)) if others else "-",
            "-" if lift is None else f"{lift:.2f}",
            f"{max(other_lifts):.2f}" if other_lifts else "-",
            f"{top['peak_row']},{top['peak_col']}" if top else "-",
        ]
        for method in METHODS:
            e = r.get("repairs", {}).get(method)
            if e is None:
                cells.append("-")
            else:
                lo, hi = e["asr_interval"]["wilson95"]
                cells.append(f"{pct(e['asr'])} [{pct(lo)}, {pct(hi)}]")
        rows.append("| " + " | ".join(cells) + " |")
    head = (
        "| unit | clean acc % | ASR % | flagged | validity of target % | max other % | "
        "scan lift of target | max other lift | scan peak | "
        + " | ".join(f"{m} ASR % [95 %]" for m in METHODS)
        + " |"
    )
    rule = "|" + "---|" * (9 + len(METHODS))
    return "\n".join([head, rule, *rows])


README_HEAD = """# Fixed-position backdoors: detection and repair (issue 31)

Written by `python benchmarks/fixed_position.py --summary` from the unit records in this folder;
the units, their settings and the command that runs them are in that script's docstring. One
seed per model: every repair of a model sees the same batches, stamped images and held-out
images, so the ASR columns are paired (`paired_with_mesa` in each record counts the held-out
images where each repair and MESA's disagree). Intervals are 95 % Wilson intervals over the
held-out images. `scan lift` is the position scan's peak minus median of the target's
probability map (docs/method.md); `flagged` is the union of the validity and scan flags.
Earlier records, each folder with a README saying why it was replaced: `first-design/` (pi
learned from rewards alone: detection flagged nothing and MESA left 94-99 % ASR),
`learned-pi-everywhere/` (a pi for every class without a scan peak: the repair of a
random-position model got worse), `no-pi-without-peak/` (none in detection either: a
random-position target went unflagged), `remade-models/` (repairs added to a model made again,
not paired) and `probe-share/` (the probe share's measurement).

"""


def false_positives(results: Path) -> str:
    clean = [json.loads(p.read_text()) for p in sorted(results.glob("clean-s*.json"))]
    clean = [r for r in clean if r.get("kind") == "clean"]
    if not clean:
        return "Clean models: none finished yet.\n"
    flagged = sum(bool(r["false_positive"]) for r in clean)
    from engine.report.stats import wilson

    low, high = wilson(flagged, len(clean))
    wrong, classes = wrong_classes(results)
    low_c, high_c = wilson(wrong, classes)
    return (
        f"Clean models flagged by detection: {flagged} of {len(clean)} "
        f"(95 % Wilson interval {pct(low)}-{pct(high)} %). Per class, counting every class of "
        f"a clean model and every class but the target of an attacked one: {wrong} of {classes} "
        f"flagged ({pct(low_c)}-{pct(high_c)} %, optimistic: the classes of one model are not "
        "independent draws).\n"
    )


def wrong_classes(results: Path) -> tuple[int, int]:
    """(classes flagged that hold no backdoor, classes detection judged that hold none) over the
    finished units: every class of a clean model, every class but the target of an attacked one
    (the paper check's models included)."""
    wrong = judged = 0
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name.endswith(".partial.json") or "detection" not in record:
            continue
        innocent = set(record["detection"]["scores"]) - (
            set() if record.get("kind") == "clean" else {str(TARGET)}
        )
        wrong += len(innocent & {str(c) for c in record["detection"]["flagged"]})
        judged += len(innocent)
    return wrong, judged


def readme(results: Path) -> str:
    finished = [p for p in results.glob("*.json") if not p.name.endswith(".partial.json")]
    runs = [json.loads(p.read_text()).get("run", {}).get("machine", {}) for p in finished]
    machines = sorted({f"{m.get('cpu', '?')} ({m.get('precision', '?')})" for m in runs})
    return (
        README_HEAD
        + summary(results)
        + "\n\n"
        + false_positives(results)
        + f"\nMachines (CPU) of the finished units: {', '.join(machines) or 'none yet'}.\n"
    )


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def select(value: str, paper_triggers: list[str]) -> list[dict[str, Any]]:
    units = attack_units()
    if value == "all":
        return units
    if value == "attacks":
        return [u for u in units if u["kind"] == "attack"]
    if value == "clean":
        return [u for u in units if u["kind"] == "clean"]
    if value == "paper":
        return paper_units(paper_triggers)
    every = {u["name"]: u for u in units + paper_units(paper_triggers)}
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise UserError(f"--units: {', '.join(unknown)} unknown; use {', '.join(every)}")
    return [every[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    global PAPER_WORK, PAPER_RESULTS
    args = parse_args(argv)
    PAPER_WORK, PAPER_RESULTS = args.paper_work, args.paper_results
    if args.quick:
        CUT.update(QUICK)
    if not (args.list or args.summary):
        from benchmarks.defense import QUICK_DATASET, ensure_dataset

        ensure_dataset(QUICK_DATASET if args.quick else "cifar10")
    paper_triggers = [t.strip() for t in args.paper_triggers.split(",") if t.strip()]
    units = select(args.units, paper_triggers)
    if args.summary:
        if not any(args.results.glob("*.json")):  # nothing to summarise: write nothing
            raise UserError(
                f"--results {args.results} holds no unit records; give the folder this script "
                "wrote, e.g. docs/results/fixed-position"
            )
        text = readme(args.results)
        write_text(args.results / "README.md", text)
        print(text, end="")
        return 0
    if args.list:
        for u in units:
            done = (args.results / f"{u['name']}.json").exists()
            part = (args.results / f"{u['name']}.partial.json").exists()
            print(f"{u['name']}: {'done' if done else 'partial' if part else 'to do'}")
        return 0
    for unit in units:
        if (args.results / f"{unit['name']}.json").exists():
            added = complete_unit(unit, args.workdir, args.results)
            if added is not None:
                print(added, flush=True)
            continue
        print(run_unit(unit, args.workdir, args.results), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
