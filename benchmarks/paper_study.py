"""The paper's figure on the CPU network: every trigger on the paper's protocol, paired.

The protocol is ``engine.paper_small`` (one clean `small` model fine-tuned with 1 % poisoning per
trigger, the 3-beta search at 620 steps, repairs by mesa, point x 3 restarts, ideal and finetune,
each paired with the others; on the subset also mesa-0.9, neural-cleanse and the recent defenses
anp, i-bau, clp and ft-sam). Each finished (trigger, rate) is written at once, whole, as
``RESULTS/rate-R/bw-ID.json`` with every repair's per-image held-out outcomes, the floor (the clean
model's ASR for the trigger), the machine, precision, thread count and commit; a rerun skips what
exists, so the study finishes across sittings on fresh machines. The clean model is kept in
``RESULTS/clean-model`` (committed, with its hash) so that every sitting attacks the same model.

Usage:
  python benchmarks/paper_study.py --triggers pilot --rates 0.01,0.1     # the pilot
  python benchmarks/paper_study.py --decide-rate                        # the rule -> rate.json
  python benchmarks/paper_study.py --triggers even --rates main         # the 26 of the first half
  python benchmarks/paper_study.py --triggers odd --rates main
  python benchmarks/paper_study.py --triggers subset --rates 0.01,0.1 --methods all
  python benchmarks/paper_study.py --triggers subset --rates 0.01,0.1 --methods anp,i-bau,clp,ft-sam
Options: --results DIR (docs/results/paper-small), --workdir DIR (kept between runs of a sitting:
a killed run resumes its tasks from their checkpoints), --threads N, --quick (a tiny smoke run on
a cut dataset, for tests). Progress goes to stderr; each written file's path to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._script import run_main  # noqa: E402
from engine import paper_small as protocol  # noqa: E402
from engine.errors import UserError  # noqa: E402

SCHEMA = 1
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
    return triggers


def rate_list(value: str, results: Path) -> list[float]:
    if value == "main":
        path = results / "rate.json"
        if not path.exists():
            raise UserError(f"no {path} yet: run the pilot, then --decide-rate")
        return [float(json.loads(path.read_text())["rate"])]
    try:
        return [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates {value!r}: give main or rates such as 0.01,0.1") from None


def method_list(value: str) -> list[str]:
    known = [*protocol.MAIN_METHODS, *protocol.SUBSET_METHODS, *protocol.RECENT_METHODS]
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


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a run killed while writing leaves the old file (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def run_task(kind: str, overrides: dict[str, Any], workdir: Path, preset: str | None = None):
    """(TaskResult, seconds): a result left in ``workdir`` by the same spec is reused."""
    import importlib

    from engine.reporter import MemoryReporter, TaskResult
    from engine.specs import build_spec

    spec = build_spec(kind, preset=preset, overrides=overrides)
    saved = workdir / "task-result.json"
    spec_json = spec.model_dump(mode="json")
    if saved.exists():
        data = json.loads(saved.read_text())
        if data["spec"] == spec_json and Path(data["artifact"]).exists():
            return TaskResult(data["artifact"], data["metrics"], data["extra"]), data["seconds"]
    started = time.perf_counter()
    result = importlib.import_module(f"engine.tasks.{kind}").run(
        spec, MemoryReporter(workdir, resume=True)
    )
    seconds = time.perf_counter() - started
    record = {"spec": spec_json, "artifact": result.artifact, "metrics": result.metrics}
    write_json(saved, {**record, "extra": result.extra, "seconds": seconds})
    return result, seconds


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
            "machine": machine(args),
            "commit": commit(),
            "sha256": sha256_of(kept / "model.safetensors"),
        },
    )
    return kept


def sha256_of(path: Path) -> str:
    from engine.ml.artifacts import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------------------------------------
# One trigger


def attack_and_search(args, trigger: str, clean: Path) -> dict[str, Any]:
    base = args.workdir / trigger.replace(":", "-")
    overrides = protocol.attack_overrides(trigger, str(clean.resolve()))
    if args.quick:
        overrides.update(QUICK["attack"], dataset=QUICK["dataset"])
    log(f"{trigger}: attack (fine-tuning the clean model, 1 % poisoning)")
    attack, attack_s = run_task("train", overrides, base / "attack", protocol.ATTACK["preset"])
    overrides = protocol.search_overrides(attack.artifact)
    if args.quick:
        overrides.update(QUICK["search"], samples=QUICK["search_samples"])
    log(f"{trigger}: search ({overrides['steps']} steps per beta)")
    search, search_s = run_task("mesa", overrides, base / "search")
    validity = {
        f"{b:g}": search.metrics.get(f"mesa/beta={b:g}/validity") for b in protocol.SEARCH["betas"]
    }
    return {
        "base": base,
        "model": attack.artifact,
        "search": search.artifact,
        "attack_metrics": {k: attack.metrics.get(f"eval/{k}") for k in ("acc_clean", "asr")},
        "search_validity": validity,
        "seconds": {"attack": attack_s, "search": search_s},
    }


def repair_entry(result, seconds: float) -> dict[str, Any]:
    outcomes = json.loads((Path(result.artifact) / "outcomes.json").read_text())["after"]
    m = result.metrics
    return {
        "acc_clean": m["eval/acc_clean"],
        "asr": m["eval/asr"],
        "asr_outcomes": outcomes["asr"],
        "clean_outcomes": outcomes["clean"],
        "seconds": seconds,
    }


def repairs(args, stage: dict[str, Any], trigger: str, rate: float, methods: list[str]):
    """Every method's repair of one model at one rate: (entries, the before outcomes)."""
    entries: dict[str, Any] = {}
    before = None
    for method in methods:
        restarts = []
        reversal = None
        for label, overrides in protocol.repair_overrides(
            method, stage["model"], stage["search"], rate
        ):
            if reversal is not None:
                overrides["reversal_from"] = reversal
            if args.quick:
                overrides.update(QUICK["repair"])
            log(f"{trigger}: repair {label} at rate {rate:g}")
            # A repair that stamps nothing is the same at every rate: one folder serves them all.
            at = f"rate-{rate:g}" if protocol.uses_rate(method) else "any-rate"
            folder = stage["base"] / at / label.replace("/", "-")
            result, seconds = run_task("defend", overrides, folder)
            if method == "point" and reversal is None:
                reversal = result.artifact
            entry = repair_entry(result, seconds)
            if method == "point":
                entry["reverse_s"] = result.metrics.get("time/reverse_s")
                entry["point_success"] = result.extra.get("point_success")
            restarts.append(entry)
            if before is None:
                outcomes = json.loads((Path(result.artifact) / "outcomes.json").read_text())
                before = outcomes["before"]
        entries[method] = {"restarts": restarts} if method == "point" else restarts[0]
    return entries, before


def floor(clean: Path, trigger: str, args) -> dict[str, Any]:
    """The clean model's ASR for the trigger on the held-out split (same placements)."""
    from engine.ml.data import defender_split
    from engine.ml.metrics import outcome_bits, outcomes
    from engine.ml.runtime import pick_device, resolve_precision
    from engine.ml.triggers import PatchTrigger, Placement, parse_trigger
    from engine.tasks.mesa import load_defender_data

    device = pick_device("auto")
    model, _, normalizer, _, _, data = load_defender_data(str(clean), device, 0.8, 0)
    _, held = defender_split(data.test_x.shape[0], 0.8, 0)
    found = outcomes(
        model,
        data.test_x[held],
        data.test_y[held],
        normalizer,
        trigger=PatchTrigger(parse_trigger(trigger), Placement("per-image")),
        target=protocol.TARGET,
        precision=resolve_precision("auto", device),
        channels_last=True,
    )
    return {"asr": float(found["asr"].float().mean()), "asr_outcomes": outcome_bits(found["asr"])}


def run_trigger(args, trigger: str, rate: float, methods: list[str], clean: Path) -> Path:
    path = result_path(args.results, trigger, rate)
    existing = json.loads(path.read_text()) if path.exists() else None
    missing = [m for m in methods if existing is None or m not in existing["repairs"]]
    if not missing:
        log(f"{trigger} at {rate:g}: done already ({path})")
        return path
    started = time.perf_counter()
    stage = attack_and_search(args, trigger, clean)
    entries, before = repairs(args, stage, trigger, rate, missing)
    record = existing or {
        "schema": SCHEMA,
        "trigger": trigger,
        "target": protocol.TARGET,
        "rate": rate,
        "protocol": protocol_settings(),
        "floor": floor(clean, trigger, args),
        "attack": {
            **stage["attack_metrics"],
            "held_out_asr": before["asr"].count("1") / len(before["asr"]),
            "held_out_acc_clean": before["clean"].count("1") / len(before["clean"]),
            "asr_outcomes": before["asr"],
            "clean_outcomes": before["clean"],
        },
        "search": {"validity": stage["search_validity"]},
        "clean_model_sha256": sha256_of(clean / "model.safetensors"),
        "repairs": {},
        "runs": [],
    }
    record["repairs"].update(entries)
    record["runs"].append(
        {
            "methods": missing,
            "machine": machine(args),
            "commit": commit(),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": {**stage["seconds"], "wall": time.perf_counter() - started},
        }
    )
    write_json(path, record)
    return path


def protocol_settings() -> dict[str, Any]:
    return {
        "clean": protocol.CLEAN,
        "attack": protocol.ATTACK,
        "search": protocol.SEARCH,
        "repair": protocol.REPAIR,
        "methods": protocol.METHOD_SETTINGS,
    }


def machine(args) -> dict[str, Any]:
    import torch

    from engine.ml.runtime import cpu_has_native_bf16, cpu_name, resolve_precision

    return {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "precision": resolve_precision("auto", torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": bool(args.quick),
    }


def commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


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
