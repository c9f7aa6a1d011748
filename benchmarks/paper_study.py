"""The paper's figure on the CPU network: every trigger on the paper's protocol, paired.

The protocol is ``engine.paper_small`` (one clean `small` model fine-tuned with 1 % poisoning per
trigger, the 3-beta search at 620 steps, repairs by mesa, point x 3 restarts, ideal and finetune,
each paired with the others; on the subset also mesa-0.9, neural-cleanse, the recent defenses
anp, i-bau, clp and ft-sam, and anp-acc10 and anp-bb10: ANP at the threshold the defender's
accuracy allows, with the paper's mask lr and with BackdoorBench's).
Each finished (trigger, rate) is written at once, whole, as ``RESULTS/rate-R/bw-ID.json`` with
every repair's per-image held-out outcomes, the floor (the clean model's ASR for the trigger),
the machine, precision, thread count and commit; a rerun skips what exists, so the study
finishes across sittings on fresh machines. The clean model is kept in ``RESULTS/clean-model``
(committed, with its hash) so that every sitting attacks the same model.

Usage:
  python benchmarks/paper_study.py --triggers pilot --rates 0.01,0.1     # the pilot
  python benchmarks/paper_study.py --decide-rate                        # the rule -> rate.json
  python benchmarks/paper_study.py --triggers even --rates main         # the 26 of the first half
  python benchmarks/paper_study.py --triggers odd --rates main
  python benchmarks/paper_study.py --triggers subset --rates 0.01,0.1 --methods all
  python benchmarks/paper_study.py --triggers subset --rates 0.01,0.1 --methods anp,i-bau,clp,ft-sam
  python benchmarks/paper_study.py --triggers subset --rates main --methods anp-acc10,anp-bb10
Options: --results DIR (docs/results/paper-small), --workdir DIR (kept between runs of a sitting:
a killed run resumes its tasks from their checkpoints), --threads N, --quick (a tiny smoke run on
a cut dataset, for tests). Progress goes to stderr; each written file's path to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._paper import (  # noqa: E402
    Setup,
    commit,
    log,
    machine,
    run_task,
    sha256_of,
    trigger_record,
    write_json,
)
from benchmarks._script import run_main  # noqa: E402
from engine import paper_small as protocol  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.triggerspec import pattern_array  # noqa: E402

RESULTS = ROOT / "docs/results/paper-small"
QUICK = {
    "dataset": "cifar10-quick",
    "clean": {"epochs": 1, "crop_epochs": 0, "batch_size": 128, "lr": 0.1},
    "attack": {"epochs": 1, "poison_rate": 0.2},
    "search": {"steps": 6, "sample_every": 3, "n_eval_triggers": 8, "eval_images": 16},
    "search_samples": 32,
    "repair": {
        "epochs": 1,
        "point_epochs": 1,
        "nc_epochs": 2,
        "nc_steps_per_epoch": 2,
        "anp_iterations": 2,
        "ibau_rounds": 1,
        "ibau_k": 2,
        "sam_epochs": 1,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triggers", default="pilot", help="pilot, even, odd, all, subset or bw:ID,..")
    p.add_argument("--rates", default="main", help="main (the rule's rate) or e.g. 0.01,0.1")
    p.add_argument("--methods", default="main", help="main, all, or a comma-separated list")
    p.add_argument("--decide-rate", action="store_true", help="apply the rule to the pilot")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--workdir", type=Path, default=ROOT / ".paper-work")
    p.add_argument("--threads", type=int, default=None, help="torch threads (MESA_TUI_THREADS)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run on a cut dataset")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# What to run


def trigger_list(name: str, results: Path) -> list[str]:
    named = {
        "pilot": lambda: list(protocol.PILOT_TRIGGERS),
        "even": protocol.even_triggers,
        "odd": protocol.odd_triggers,
        "all": lambda: protocol.even_triggers() + protocol.odd_triggers(),
        "subset": lambda: protocol.subset_triggers(point_asr_at_main_rate(results)),
    }
    if name in named:
        return named[name]()
    triggers = [t.strip() for t in name.split(",") if t.strip()]
    bad = [t for t in triggers if not t.startswith("bw:")]
    if bad or not triggers:
        raise UserError(f"--triggers {name!r}: give pilot, even, odd, all, subset or bw:ID,...")
    for trigger in triggers:  # before hours of work, not at the first attack
        try:
            pattern_array(trigger)
        except UserError as exc:
            raise UserError(f"--triggers {trigger!r}: {exc}") from None
    return triggers


def rate_list(value: str, results: Path) -> list[float]:
    if value == "main":
        path = results / "rate.json"
        if not path.exists():
            raise UserError(f"no {path} yet: run the pilot, then --decide-rate")
        return [float(json.loads(path.read_text())["rate"])]
    try:
        rates = [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates {value!r}: give main or rates such as 0.01,0.1") from None
    if not rates or not all(0 < r <= 1 for r in rates):
        raise UserError(f"--rates {value!r}: a stamping rate is in (0, 1]; give e.g. 0.01,0.1")
    return rates


def method_list(value: str) -> list[str]:
    known = [
        *protocol.MAIN_METHODS,
        *protocol.SUBSET_METHODS,
        *protocol.RECENT_METHODS,
        *protocol.RECENT_VARIANTS,
    ]
    methods = {"main": list(protocol.MAIN_METHODS), "all": known}.get(value)
    methods = methods or [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"--methods: {', '.join(unknown)} unknown; use {', '.join(known)}")
    return methods


def result_path(results: Path, trigger: str, rate: float) -> Path:
    return results / f"rate-{rate:g}" / f"{trigger.replace(':', '-')}.json"


def load_records(results: Path, rate: float) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((results / f"rate-{rate:g}").glob("*.json"))]


def point_asr_at_main_rate(results: Path) -> dict[str, float]:
    (rate,) = rate_list("main", results)
    out = {}
    for record in load_records(results, rate):
        restarts = record["repairs"]["point"]["restarts"]
        out[record["trigger"]] = sum(r["asr"] for r in restarts) / len(restarts)
    return out


def decide_rate(results: Path) -> dict[str, Any]:
    """The declared rule on the pilot's `ideal` repairs at the paper's rate, written down."""
    records = [
        r
        for r in load_records(results, protocol.PAPER_RATE)
        if r["trigger"] in protocol.PILOT_TRIGGERS
    ]
    ideal = {r["trigger"]: r["repairs"]["ideal"]["asr"] for r in records}
    if set(ideal) != set(protocol.PILOT_TRIGGERS):
        raise UserError(f"the pilot is not finished at rate {protocol.PAPER_RATE}: have {ideal}")
    rate = protocol.main_rate(list(ideal.values()))
    decision = {
        "rate": rate,
        "rule": f"{protocol.PAPER_RATE} unless ideal leaves more than "
        f"{protocol.IDEAL_CEILING:.0%} on average over the pilot triggers there; then "
        f"{protocol.FALLBACK_RATE}",
        "ideal_asr_at_paper_rate": ideal,
        "ideal_mean": sum(ideal.values()) / len(ideal),
        "decided": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(results / "rate.json", decision)
    return decision


# ---------------------------------------------------------------------------------------------
# Running tasks (each in its own folder of the workdir; a killed run resumes from checkpoints)


def setup_of(args: argparse.Namespace) -> Setup:
    return Setup(workdir=args.workdir, arch="small", quick=QUICK if args.quick else None)


def clean_model(args: argparse.Namespace) -> Path:
    """The committed clean model, trained once (cpu-quick recipe, no poisoning) when missing."""
    kept = args.results / "clean-model"
    if (kept / "manifest.json").exists():
        return kept
    log("training the clean model (cpu-quick recipe without poisoning)")
    overrides = {k: v for k, v in protocol.CLEAN.items() if k != "preset"}
    if args.quick:
        overrides.update(QUICK["clean"], dataset=QUICK["dataset"])
    result, seconds = run_task("train", overrides, args.workdir / "clean", protocol.CLEAN["preset"])
    shutil.copytree(
        result.artifact, kept, ignore=shutil.ignore_patterns("checkpoints", "task-result.json")
    )
    write_json(
        args.results / "clean-model.json",
        {
            "metrics": result.metrics,
            "seconds": seconds,
            "machine": machine(args.quick),
            "commit": commit(),
            "sha256": sha256_of(kept / "model.safetensors"),
        },
    )
    return kept


# ---------------------------------------------------------------------------------------------
# One trigger (benchmarks/_paper.py builds the record; here it is skipped, extended or written)


def run_trigger(args, trigger: str, rate: float, methods: list[str], clean: Path) -> Path:
    path = result_path(args.results, trigger, rate)
    existing = json.loads(path.read_text()) if path.exists() else None
    missing = [m for m in methods if existing is None or m not in existing["repairs"]]
    if not missing:
        log(f"{trigger} at {rate:g}: done already ({path})")
        return path
    record = trigger_record(setup_of(args), trigger, rate, missing, clean, existing)
    write_json(path, record)
    return path


def ensure_dataset(quick: bool) -> None:
    from benchmarks.defense import QUICK_DATASET
    from benchmarks.defense import ensure_dataset as ensure

    ensure(QUICK_DATASET if quick else "cifar10")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["MESA_TUI_THREADS"] = str(args.threads)
    if args.decide_rate:
        print(json.dumps(decide_rate(args.results), indent=1))
        return 0
    methods = method_list(args.methods)
    triggers = trigger_list(args.triggers, args.results)
    rates = rate_list(args.rates, args.results)
    ensure_dataset(args.quick)
    clean = clean_model(args)
    for trigger in triggers:
        for rate in rates:
            print(run_trigger(args, trigger, rate, methods, clean), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
