"""One trigger of the paper's protocol (``engine.paper_small``), shared by its two drivers: the
CPU study (``benchmarks/paper_study.py``, the `small` network) and the GPU run
(``benchmarks/gpu_bench.py``, ResNet-18). Both build the same record per trigger and rate (schema
1): the floor (the clean model's ASR), the attack with its held-out outcomes, every repair's
per-image outcomes (point: its restarts) and the runs (machine, commit, seconds), which
``engine.report.paper`` and ``engine.report.stats.summarize`` read.

It imports torch, the engine's tasks and ``engine.specs`` (pydantic), never SQLAlchemy or
textual, so it runs on a lent GPU machine with pydantic carried as wheels (benchmarks/gpu.sh).
The scripts put the repository on the import path before they import this.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine import paper_small as protocol
from store.environment import setting

SCHEMA = 1
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setup:
    """How a sitting runs the protocol.

    ``arch``: the protocol's variant (``engine.paper_small.settings``). ``quick``: cuts for a smoke
    run (keys dataset, attack, search, search_samples, repair; None: the protocol as declared).
    ``should_stop``: asked between the steps of every task (a budget's deadline); True stops the
    task with ``engine.errors.Cancelled``. ``on_task``: told ("start" or "done", label) around
    each task of a trigger (labels: attack, search, then the repairs' labels)."""

    workdir: Path
    arch: str = "small"
    quick: dict[str, Any] | None = None
    should_stop: Callable[[], bool] | None = None
    on_task: Callable[[str, str], None] | None = None

    def task(self, event: str, label: str) -> None:
        if self.on_task is not None:
            self.on_task(event, label)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a run killed while writing leaves the old file (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def same_spec(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved task's spec is the current one. An optional setting added since (absent
    from the saved spec) matches when it is unset (None): unset, it is the behaviour from before
    it existed, so a kept attack or search is still reused; any other new value runs anew."""
    added = {k: v for k, v in current.items() if k not in saved}
    return all(v is None for v in added.values()) and saved == {
        k: v for k, v in current.items() if k not in added
    }


def run_task(
    kind: str,
    overrides: dict[str, Any],
    workdir: Path,
    preset: str | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """(TaskResult, seconds): a result left in ``workdir`` by the same spec is reused."""
    import importlib

    from engine.reporter import MemoryReporter, TaskResult
    from engine.specs import build_spec

    spec = build_spec(kind, preset=preset, overrides=overrides)
    saved = workdir / "task-result.json"
    spec_json = spec.model_dump(mode="json")
    if saved.exists():
        data = json.loads(saved.read_text())
        if same_spec(data["spec"], spec_json) and Path(data["artifact"]).exists():
            return TaskResult(data["artifact"], data["metrics"], data["extra"]), data["seconds"]
    reporter = MemoryReporter(workdir, resume=True)
    if should_stop is not None:
        reporter.should_stop = should_stop  # type: ignore[method-assign]
    started = time.perf_counter()
    result = importlib.import_module(f"engine.tasks.{kind}").run(spec, reporter)
    seconds = time.perf_counter() - started
    record = {"spec": spec_json, "artifact": result.artifact, "metrics": result.metrics}
    write_json(saved, {**record, "extra": result.extra, "seconds": seconds})
    return result, seconds


def sha256_of(path: Path) -> str:
    from engine.ml.artifacts import sha256_file

    return sha256_file(path)


def work_folder(workdir: Path, trigger: str) -> Path:
    """One trigger's folder in the study's work folder (its attack, search and repairs)."""
    return workdir / trigger.replace(":", "-")


def paper_attack(
    workdir: Path,
    trigger: str,
    clean: Path,
    arch: str = "small",
    quick: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """The study's attack on ``trigger``: the committed clean model fine-tuned with 1 % poisoning,
    kept in ``workdir`` (a later call with the same settings reuses it). Returns the task's result
    and its seconds."""
    overrides = protocol.attack_overrides(trigger, str(clean.resolve()), arch)
    overrides.update(quick or {})
    preset = protocol.settings(arch)[1]["preset"]
    return run_task(
        "train", overrides, work_folder(workdir, trigger) / "attack", preset, should_stop
    )


def attack_and_search(
    setup: Setup, trigger: str, clean: Path, partial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The attack (the clean model fine-tuned with 1 % poisoning) and the 3-beta search."""
    base = work_folder(setup.workdir, trigger)
    partial = {} if partial is None else partial
    log(f"{trigger}: attack (fine-tuning the clean {setup.arch} model, 1 % poisoning)")
    setup.task("start", "attack")
    quick = setup.quick["attack"] | {"dataset": setup.quick["dataset"]} if setup.quick else None
    attack, attack_s = paper_attack(
        setup.workdir, trigger, clean, setup.arch, quick, setup.should_stop
    )
    attack_metrics = {k: attack.metrics.get(f"eval/{k}") for k in ("acc_clean", "asr")}
    partial["attack"] = {**attack_metrics, "seconds": attack_s}
    setup.task("done", "attack")
    overrides = protocol.search_overrides(attack.artifact)
    if setup.quick:
        overrides.update(setup.quick["search"], samples=setup.quick["search_samples"])
    log(f"{trigger}: search ({overrides['steps']} steps per beta)")
    setup.task("start", "search")
    search, search_s = run_task("mesa", overrides, base / "search", None, setup.should_stop)
    validity = {
        f"{b:g}": search.metrics.get(f"mesa/beta={b:g}/validity") for b in protocol.SEARCH["betas"]
    }
    partial["search"] = {"validity": validity, "seconds": search_s}
    setup.task("done", "search")
    return {
        "base": base,
        "model": attack.artifact,
        "search": search.artifact,
        "attack_metrics": attack_metrics,
        "search_validity": validity,
        "seconds": {"attack": attack_s, "search": search_s},
    }


def read_outcomes(result) -> dict[str, Any]:
    """A repair's per-image held-out outcomes, ``before`` and ``after`` it."""
    return json.loads((Path(result.artifact) / "outcomes.json").read_text())


def repair_entry(result, seconds: float, outcomes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A repair's record entry; ``outcomes``: its ``read_outcomes`` when the caller has them."""
    outcomes = (outcomes or read_outcomes(result))["after"]
    m = result.metrics
    return {
        "acc_clean": m["eval/acc_clean"],
        "asr": m["eval/asr"],
        "asr_outcomes": outcomes["asr"],
        "clean_outcomes": outcomes["clean"],
        "seconds": seconds,
    }


def repairs(
    setup: Setup,
    stage: dict[str, Any],
    trigger: str,
    rate: float,
    methods: list[str],
    partial: dict[str, Any] | None = None,
):
    """Every method's repair of one model at one rate: (entries, the before outcomes)."""
    entries: dict[str, Any] = {}
    done = {} if partial is None else partial.setdefault("repairs", {})
    before = None
    for method in methods:
        restarts = []
        reversal = None
        for label, overrides in protocol.repair_overrides(
            method, stage["model"], stage["search"], rate
        ):
            if reversal is not None:
                overrides["reversal_from"] = reversal
            if setup.quick:
                overrides.update(setup.quick["repair"])
            log(f"{trigger}: repair {label} at rate {rate:g}")
            # A repair that stamps nothing is the same at every rate: one folder serves them all.
            at = f"rate-{rate:g}" if protocol.uses_rate(method) else "any-rate"
            folder = stage["base"] / at / label.replace("/", "-")
            setup.task("start", label)
            result, seconds = run_task("defend", overrides, folder, None, setup.should_stop)
            if method == "point" and reversal is None:
                reversal = result.artifact
            entry = repair_entry(result, seconds)
            if method == "point":
                entry["reverse_s"] = result.metrics.get("time/reverse_s")
                entry["point_success"] = result.extra.get("point_success")
            restarts.append(entry)
            done[label] = {"asr": entry["asr"], "acc_clean": entry["acc_clean"], "seconds": seconds}
            setup.task("done", label)
            if before is None:
                outcomes = json.loads((Path(result.artifact) / "outcomes.json").read_text())
                before = outcomes["before"]
        entries[method] = {"restarts": restarts} if method == "point" else restarts[0]
    return entries, before


def floor(clean: Path, trigger: str) -> dict[str, Any]:
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


def trigger_record(
    setup: Setup,
    trigger: str,
    rate: float,
    methods: list[str],
    clean: Path,
    existing: dict[str, Any] | None = None,
    partial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The trigger's record at ``rate`` with ``methods`` repaired (added to ``existing``, the
    record of an earlier sitting on the same clean model, when given). ``partial`` (a dict) is
    filled as the tasks finish, so a caller that catches a stopped task knows what did finish."""
    started = time.perf_counter()
    stage = attack_and_search(setup, trigger, clean, partial)
    entries, before = repairs(setup, stage, trigger, rate, methods, partial)
    record = existing or {
        "schema": SCHEMA,
        "trigger": trigger,
        "target": protocol.TARGET,
        "rate": rate,
        "protocol": protocol_settings(setup.arch),
        "floor": floor(clean, trigger),
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
            "methods": methods,
            "same_model": same_model(record, before),
            "machine": machine(setup.quick is not None),
            "commit": commit(),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": {**stage["seconds"], "wall": time.perf_counter() - started},
        }
    )
    return record


def same_model(record: dict[str, Any], before: dict[str, str]) -> bool:
    """Whether this run repaired the model the record's first run attacked: a later sitting on a
    fresh machine attacks again, and only a model that scores every held-out image as before
    keeps the added methods paired image by image with the earlier ones."""
    attack = record["attack"]
    return before["asr"] == attack["asr_outcomes"] and before["clean"] == attack["clean_outcomes"]


def protocol_settings(arch: str = "small") -> dict[str, Any]:
    clean, attack = protocol.settings(arch)
    return {
        "clean": clean,
        "attack": attack,
        "search": protocol.SEARCH,
        "repair": protocol.REPAIR,
        "methods": protocol.METHOD_SETTINGS,
    }


def machine(quick: bool) -> dict[str, Any]:
    """Where the tasks ran: the CPU always (the report's cost names it), and on a GPU its name."""
    import torch

    from engine.ml.runtime import cpu_has_native_bf16, cpu_name, pick_device, resolve_precision

    device = pick_device("auto")
    out = {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "precision": resolve_precision("auto", device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": bool(quick),
    }
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return out


def commit() -> str | None:
    """The checkout's commit, else ``MESA_TUI_COMMIT`` (a copy without .git, as on a lent GPU)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        out = ""
    return out or setting("MESA_TUI_COMMIT") or None
