"""GPU figures in one prepared run, written stage by stage (benchmarks/gpu.sh launches it on a lent
machine; its header and docs/presets.md's GPU section say how).

The stages, in this order. The whole JSON at --out is rewritten atomically when a stage starts,
after it ends and after every trigger, so a run killed by its time limit loses only the stage it
was in (``stages`` says which stage that was):

1. ``epoch``: one epoch of ResNet-18 on the training set at batch 128 and 512 through the train
   task with the engine's GPU defaults (bf16 autocast, channels_last, the data resident on the
   device, cuDNN's autotuner); then, one epoch each at batch 512, each of these taken away (fp32,
   no channels_last, no autotuner), the step compiled (torch.compile: its compile time and its
   steady epoch) and the data path alone (an epoch of batches from the device or from the host);
2. ``clean``: the clean-cifar10 preset to the end, compiled where the epoch stage showed that
   compiling pays for itself within the recipe's epochs: wall time and clean accuracy per epoch;
3. ``paper``: the paper-figure protocol's ResNet-18 variant (``engine.paper_small``, arch
   resnet18) from that clean model, one trigger after another (the pilot's first): the attack with
   1 % poisoning, the 3-beta search, the repairs mesa, point x 3, ideal and finetune at rate 0.01,
   each trigger's record built by ``benchmarks/_paper.py`` as the CPU study builds it (schema 1)
   -- until ``--budget-s`` (seconds from the start of the run) is spent: a trigger starts only
   when the time left holds the last trigger's time (the first starts while any is left: a cut
   one still tells the attack's ASR), and one still running at the deadline is stopped between
   two steps and listed under ``unfinished`` with what it did finish. A pilot, not the study;
4. ``mesa_speed``: the MESA search throughput on the device (``benchmarks/mesa_speed.py``: all
   betas in one batch against one beta at a time).

While a stage runs the GPU is sampled as the engine's heartbeat samples it (NVML through
``engine.daemon.gpu_snapshot``), a line is printed every --heartbeat-s seconds, and each stage's
mean and peak utilisation and memory are kept under ``utilisation``. Every figure names the
device. ``--tiny`` runs every stage, ResNet-18 included, on a cut dataset of a few hundred images
(tests/tasks/test_benchmarks.py runs it on the CPU through benchmarks/gpu.sh).

Progress goes to stderr; a short table, then one line of JSON (the headline figures), to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _script import run_main  # noqa: E402

from benchmarks._paper import (  # noqa: E402
    Setup,
    commit,
    log,
    protocol_settings,
    sha256_of,
    trigger_record,
    write_json,
)
from engine import paper_small as protocol  # noqa: E402
from engine.errors import Cancelled, UserError  # noqa: E402
from engine.ml.data import import_dataset, load_dataset  # noqa: E402
from engine.ml.runtime import (  # noqa: E402
    configure_cpu,
    configure_device,
    environment,
    pick_device,
)
from engine.reporter import MemoryReporter  # noqa: E402
from engine.run_environment import COMPILE_ENV, CUDNN_BENCHMARK_ENV  # noqa: E402

FORMAT = 2  # of this file's JSON (1: the figures at the end only, before the stages)
STAGES = ("epoch", "clean", "paper", "mesa_speed")
RATE = protocol.PAPER_RATE
METHODS = list(protocol.MAIN_METHODS)
TINY_DATASET = "cifar10-gpu-tiny"
TINY_SIZES = (256, 100)  # training and test images of the cut dataset
# --tiny: the same tasks at sizes a loaded CPU runs in seconds (ResNet-18 all the same).
TINY_PAPER = {
    "dataset": TINY_DATASET,
    "attack": {"epochs": 1, "poison_rate": 0.2, "batch_size": 32},
    "search": {
        "steps": 4,
        "batch_size": 8,
        "hidden": 16,
        "stats_every": 2,
        "sample_every": 2,
        "n_eval_triggers": 4,
        "eval_images": 8,
    },
    "search_samples": 16,
    "repair": {"epochs": 1, "batch_size": 32, "point_epochs": 1, "point_batch_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=None, help="CIFAR-10 image-folder archive to import first")
    p.add_argument("--out", type=Path, default=None, help="the JSON file, rewritten stage by stage")
    p.add_argument("--tiny", action="store_true", help="a few hundred images, for a CPU check")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds from the start by which the paper stage's triggers must be done (default: "
        "none; each trigger still needs the time its predecessor took)",
    )
    p.add_argument(
        "--triggers",
        default="pilot,rest",
        help="the paper stage's triggers in order: bw:ID,... or pilot,rest (the pilot's three, "
        "then the other 48 of the canonical list)",
    )
    p.add_argument("--stages", default=",".join(STAGES), help="a subset of " + ",".join(STAGES))
    p.add_argument("--clean-epochs", type=int, default=None, help="override clean-cifar10's 30")
    p.add_argument("--clean-model", type=Path, default=None, help="skip the clean stage: use this")
    p.add_argument("--workdir", type=Path, default=None, help="where models go (default: a temp)")
    p.add_argument("--heartbeat-s", type=float, default=15.0, help="seconds between GPU lines")
    p.add_argument(
        "--no-compile", action="store_true", help="do not measure (nor use) torch.compile"
    )
    # Tests only: the budget runs out when this task of this trigger starts (TRIGGER/LABEL, e.g.
    # bw:0/search), so a cut in the middle of a trigger does not hang on the clock.
    p.add_argument("--cut-at", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: {', '.join(unknown)} unknown; use {', '.join(STAGES)}")
    args.stages = stages
    return args


def trigger_order(value: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if part == "pilot":
            names += protocol.PILOT_TRIGGERS
        elif part == "rest":
            names += protocol.even_triggers() + protocol.odd_triggers()
        elif part.startswith("bw:"):
            names.append(part)
        else:
            raise UserError(f"--triggers {value!r}: give bw:ID,... or pilot,rest")
    return list(dict.fromkeys(names))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def env(values: dict[str, str]) -> Iterator[None]:
    """Environment switches (engine.run_environment) for the tasks run inside the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# The JSON file, the budget and the heartbeat


class Results:
    """The run's one JSON object, written whole (a temporary file renamed over it) at every save."""

    def __init__(self, path: Path | None, data: dict[str, Any]):
        self.path = path
        self.data = data
        self.started = time.monotonic()

    def stage(self, name: str, status: str) -> None:
        self.data["stages"][name] = status
        self.data["history"].append({"stage": name, "status": status, "at_s": self.elapsed()})
        self.save()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def save(self) -> None:
        self.data["updated"] = now()
        self.data["elapsed_s"] = self.elapsed()
        if self.path is not None:
            write_json(self.path, self.data)


class Budget:
    """``seconds`` from ``start`` (monotonic); None: no limit. ``expire`` ends it at once."""

    def __init__(
        self,
        seconds: float | None,
        start: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.seconds, self.start, self.clock = seconds, start, clock
        self.cut = False

    def left(self) -> float:
        if self.cut:
            return 0.0
        if self.seconds is None:
            return math.inf
        return self.seconds - (self.clock() - self.start)

    def expired(self) -> bool:
        return self.left() <= 0

    def expire(self) -> None:
        self.cut = True

    def can_start(self, estimate_s: float | None) -> bool:
        """Whether a trigger expected to take ``estimate_s`` (None: unknown) fits what is left."""
        left = self.left()
        return left > 0 and (estimate_s is None or estimate_s <= left)


class Heartbeat:
    """The GPUs as the engine's heartbeat reads them (``engine.daemon.gpu_snapshot``: NVML's name,
    memory and utilisation), sampled in a thread while a stage runs."""

    def __init__(self, print_every_s: float, sample_every_s: float = 1.0):
        from engine.daemon import gpu_snapshot, visible_gpus

        self.snapshot, self.gpus = gpu_snapshot, visible_gpus()
        self.print_every_s, self.sample_every_s = print_every_s, sample_every_s

    def describe(self) -> list[dict[str, Any]]:
        return self.snapshot(self.gpus) if self.gpus else []

    @contextlib.contextmanager
    def watch(self, stage: str, into: dict[str, Any]) -> Iterator[None]:
        samples: list[list[dict[str, Any]]] = []
        stop = threading.Event()

        def loop() -> None:
            last_print = time.monotonic()
            while not stop.wait(self.sample_every_s):
                snap = self.describe()
                samples.append(snap)
                if self.gpus and time.monotonic() - last_print >= self.print_every_s:
                    last_print = time.monotonic()
                    print(f"[heartbeat] {stage}: {heartbeat_line(snap)}", file=sys.stderr)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            into[stage] = self.summary(samples)

    def summary(self, samples: list[list[dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": len(samples)}
        if torch.cuda.is_available():
            out["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        if not self.gpus:
            out["note"] = "no GPU visible: the heartbeat shows none"
            return out
        gpus = []
        for i, gpu in enumerate(self.gpus):
            seen = [s[i] for s in samples if i < len(s)]
            util = [s["utilization_pct"] for s in seen if "utilization_pct" in s]
            used = [s["memory_used_mb"] for s in seen if "memory_used_mb" in s]
            entry: dict[str, Any] = {"index": gpu, "name": seen[0]["name"] if seen else None}
            if util:
                entry.update(
                    util_mean_pct=round(sum(util) / len(util), 1),
                    util_max_pct=max(util),
                    memory_max_mb=round(max(used)),
                    memory_total_mb=round(seen[0].get("memory_total_mb", 0)),
                )
            else:
                entry["note"] = (
                    "no utilisation from NVML (nvidia-ml-py missing?): the heartbeat shows none"
                )
            gpus.append(entry)
        out["gpus"] = gpus
        return out


def heartbeat_line(snapshot: list[dict[str, Any]]) -> str:
    if not snapshot:
        return "no GPU visible"
    parts = []
    for g in snapshot:
        if "utilization_pct" in g:
            parts.append(
                f"gpu {g['index']} {g['name']}: {g['utilization_pct']:.0f} % busy, "
                f"{g['memory_used_mb'] / 1024:.1f} of {g['memory_total_mb'] / 1024:.1f} GiB"
            )
        else:
            parts.append(f"gpu {g['index']} {g['name']}: no utilisation (no NVML)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Training through the train task, timed


class TimingReporter(MemoryReporter):
    """Keeps each progress call's (steps done, images per second so far) to split an epoch's
    first steps (compilation) from the rest."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.ticks: list[tuple[int, float]] = []

    def progress(self, stage: str, done: int, total: int, info: dict[str, float]) -> None:
        super().progress(stage, done, total, info)
        self.ticks.append((done, float(info.get("img/s", 0.0))))


def train_once(overrides: dict[str, Any], workdir: Path, preset: str | None = None):
    """(TaskResult, wall seconds, reporter) of one train task."""
    from engine.specs import build_spec
    from engine.tasks.train import run as train

    spec = build_spec("train", preset=preset, overrides=overrides)
    reporter = TimingReporter(workdir)
    started = time.perf_counter()
    result = train(spec, reporter)
    sync()
    return result, time.perf_counter() - started, reporter


def one_epoch(dataset: str, batch: int, workdir: Path, **overrides: Any) -> dict[str, Any]:
    values = {
        "dataset": dataset,
        "arch": "resnet18",
        "epochs": 1,
        "batch_size": batch,
        "trigger": "none",
        "poison_rate": 0.0,
        "schedule": "constant",
        "lr": 0.05,
        "eval_every": 0,
        "max_test_images": 1000,  # the final evaluation is not timed: keep it short
        **overrides,
    }
    result, _, reporter = train_once(values, workdir)
    out = {
        "epoch_s": round(result.metrics["time/train_s"], 3),
        "images_per_s": round(result.metrics["perf/images_per_s"]),
        "precision": result.extra["precision"],
        "channels_last": values.get("channels_last", True),
        "compiled": result.extra["compiled"],
    }
    out.update(steady_split(reporter.ticks, batch, result.metrics["time/train_s"]) or {})
    return out


def steady_split(ticks: list[tuple[int, float]], batch: int, epoch_s: float) -> dict | None:
    """From the progress calls: the epoch at the pace of its later steps (``steady_epoch_s``) and
    what its first step cost beyond that pace (``first_step_extra_s``: cuDNN's autotuning, and
    with torch.compile the compilation). None with fewer than two calls."""
    if len(ticks) < 2:
        return None
    (first_done, first_rate), (last_done, last_rate) = ticks[0], ticks[-1]
    first_s = first_done * batch / max(first_rate, 1e-9)
    last_s = last_done * batch / max(last_rate, 1e-9)
    if last_done <= first_done or last_s <= first_s:
        return None
    per_step = (last_s - first_s) / (last_done - first_done)
    steady_epoch = per_step * last_done
    return {
        "steady_epoch_s": round(steady_epoch, 3),
        "first_step_extra_s": round(max(epoch_s - steady_epoch, 0.0), 2),
    }


def data_path(dataset: str, device: torch.device, batch: int) -> dict[str, Any]:
    """One epoch of training batches (gather, crop, flip, normalise) from images resident on the
    device, and from images on the host copied per batch: the data path alone, no model."""
    from engine.ml.data import Normalizer, augment, batch_indices, to_float

    data = load_dataset(dataset)
    host = data.train_x
    resident = host.to(device)
    normalizer = Normalizer(data.mean, data.std, device)

    def epoch(images: torch.Tensor) -> float:
        generator = torch.Generator().manual_seed(0)
        sync()
        started = time.perf_counter()
        n = images.shape[0]
        for idx in batch_indices(n, batch, generator, True, n > batch, images.device):
            x = images[idx].to(device)
            x = normalizer.inplace(to_float(augment(x, generator, padding=4)))
        sync()
        return time.perf_counter() - started

    epoch(resident)  # warm-up: kernels loaded, allocator primed
    on_device, from_host = epoch(resident), epoch(host)
    return {
        "device_s": round(on_device, 4),
        "host_copy_s": round(from_host, 4),
        "speedup": round(from_host / max(on_device, 1e-9), 2),
        "batch": batch,
    }


# ---------------------------------------------------------------------------------------------
# The stages


def epoch_stage(res: Results, args, device, dataset: str, work: Path) -> None:
    data = res.data
    if device.type == "cuda":  # CUDA's start and the kernels' loading stay out of the figures
        for batch in (128, 512):
            one_epoch(dataset, batch, work / f"warm-up-{batch}", max_train_images=4 * batch)
    for batch in (128, 512):
        figures = one_epoch(dataset, batch, work / f"epoch-{batch}")
        data[f"resnet18_epoch_s_bs{batch}"] = figures["epoch_s"]
        data[f"resnet18_images_per_s_bs{batch}"] = figures["images_per_s"]
        log(f"epoch at batch {batch}: {figures['epoch_s']:.2f} s ({figures})")
        res.save()
    options = data["options"] = {
        "batch": 512,
        "default": figures,
        # What "fp32" means for the convolutions: cuDNN may run them in TF32 (torch's default).
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    variants: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("fp32", {"precision": "fp32"}, {}),
        ("no_channels_last", {"channels_last": False}, {}),
    ]
    if device.type == "cuda":
        variants.append(("no_cudnn_benchmark", {}, {CUDNN_BENCHMARK_ENV: "0"}))
    else:
        options["no_cudnn_benchmark"] = {"skipped": "no cuDNN on the CPU"}
    if args.no_compile:
        options["compile"] = {"skipped": "--no-compile"}
    elif device.type == "cuda":
        variants.append(("compile", {}, {COMPILE_ENV: "1"}))
    else:
        options["compile"] = {"skipped": "on the CPU: compiling ResNet-18 takes minutes there"}
    for name, overrides, switches in variants:
        try:
            with env(switches):
                options[name] = one_epoch(dataset, 512, work / f"epoch-{name}", **overrides)
        except Exception as exc:  # noqa: BLE001 (one variant's failure is a figure too)
            options[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"epoch at batch 512, {name}: {options[name]}")
        res.save()
    compiled = options.get("compile", {})
    if "steady_epoch_s" in compiled and "steady_epoch_s" in figures:
        compiled.update(compile_pays(figures, compiled, args.clean_epochs or 30))
    options["data_on_device"] = data_path(dataset, device, 512)
    res.save()


def compile_pays(eager: dict[str, Any], compiled: dict[str, Any], epochs: int) -> dict:
    """Whether compiling pays for itself within ``epochs``: its one-off cost (the compiled first
    step's extra over the eager one's) against what its steadier steps save over the epochs."""
    saving = eager["steady_epoch_s"] - compiled["steady_epoch_s"]
    cost = compiled["first_step_extra_s"] - eager.get("first_step_extra_s", 0.0)
    return {
        "compile_s": round(cost, 2),
        "saving_per_epoch_s": round(saving, 3),
        "pays_off_within_clean": saving > 0 and cost < epochs * saving,
    }


def clean_stage(res: Results, args, dataset: str, work: Path) -> Path:
    compiled = res.data.get("options", {}).get("compile", {}).get("pays_off_within_clean", False)
    overrides: dict[str, Any] = {"dataset": dataset, "epochs": args.clean_epochs}
    if args.tiny:
        overrides["epochs"] = args.clean_epochs or 1
    fallback = None
    try:
        with env({COMPILE_ENV: "1" if compiled else "0"}):
            result, wall, reporter = train_once(overrides, work / "clean", "clean-cifar10")
    except Exception as exc:
        if not compiled:
            raise
        fallback = f"{type(exc).__name__}: {exc}"[:300]  # compiled, it failed: train it eager
        log(f"the compiled clean run failed ({fallback}); again without compiling")
        with env({COMPILE_ENV: "0"}):
            result, wall, reporter = train_once(overrides, work / "clean-eager", "clean-cifar10")
    curve = [round(v, 4) for _, v in reporter.series("eval/acc_clean")]
    res.data["clean_cifar10"] = {
        "epochs": len(reporter.series("train/epoch")),
        "wall_s": round(wall, 1),
        "train_s": round(result.metrics["time/train_s"], 1),
        "images_per_s": round(result.metrics["perf/images_per_s"]),
        "acc_clean": round(result.metrics["eval/acc_clean"], 4),
        "acc_clean_by_epoch": curve,
        "compiled": result.extra["compiled"],
        "precision": result.extra["precision"],
        "target_acc_clean": 0.93,
        "compile_failed": fallback,
        "sha256": sha256_of(Path(result.artifact) / "model.safetensors"),
    }
    res.save()
    return Path(result.artifact)


def first_trigger_estimate(res: Results, args) -> float | None:
    """Seconds for one trigger from the epoch stage's throughput at batch 128 (for the reader:
    the budget waits for a trigger's own time): the images the protocol passes through the
    network (attack epochs, search steps, repair epochs) over that rate, a quarter more for the
    evaluations and the point reversals. None without it."""
    rate = res.data.get("resnet18_images_per_s_bs128")
    if not rate:
        return None
    quick = TINY_PAPER if args.tiny else None
    n_train, n_test = TINY_SIZES if args.tiny else (50_000, 10_000)
    attack = quick["attack"] if quick else protocol.ATTACK_RESNET18
    search = {**protocol.SEARCH, "batch_size": 128, **(quick["search"] if quick else {})}
    repair = {**protocol.REPAIR, **(quick["repair"] if quick else {})}
    repairs = len(METHODS) - 1 + protocol.POINT_RESTARTS
    images = (
        attack["epochs"] * n_train
        + search["steps"] * len(protocol.SEARCH["betas"]) * search["batch_size"]
        + repairs * repair["epochs"] * 0.8 * n_test
    )
    return round(1.25 * images / rate, 1)


def paper_stage(res: Results, args, clean: Path, budget: Budget, work: Path) -> None:
    triggers = trigger_order(args.triggers)
    block = _paper_block(res, args, clean, triggers)
    res.data["paper_resnet18"] = block
    res.save()
    estimate: float | None = None  # the last trigger's seconds; the first starts while time is left
    for i, trigger in enumerate(triggers):
        if not budget.can_start(estimate):
            block["not_started"] = triggers[i:]
            block["stopped"] = (
                f"budget: {max(budget.left(), 0):.0f} s left before {trigger}, "
                f"which needs about {estimate:.0f} s"
                if estimate is not None
                else "budget spent"
            )
            res.save()
            break
        where: dict[str, Any] = {"task": None, "finished": []}
        setup = _paper_setup(args, budget, work, trigger, where)
        partial: dict[str, Any] = {}
        started = budget.clock()
        try:
            record = trigger_record(setup, trigger, RATE, METHODS, clean, partial=partial)
        except Cancelled:
            block["unfinished"].append(_unfinished(trigger, where, {}, budget, started, partial))
            block["not_started"] = triggers[i + 1 :]
            block["stopped"] = f"budget spent in the middle of {trigger}'s {where['task']}"
            log(f"{trigger}: stopped in {where['task']} (the budget is spent)")
            res.save()
            break
        except Exception as exc:  # noqa: BLE001 (the next trigger may still run)
            error = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            block["unfinished"].append(_unfinished(trigger, where, error, budget, started, partial))
            log(f"{trigger}: failed in {where['task']}: {exc}")
            res.save()
            continue
        estimate = budget.clock() - started
        block["records"].append(record)
        block["finished"].append(trigger)
        log(
            f"{trigger}: done in {estimate:.0f} s; held-out ASR {record['attack']['held_out_asr']:.3f}"
            f" before repair, after: "
            + ", ".join(f"{m} {entry_asr(record['repairs'][m]):.3f}" for m in METHODS)
        )
        res.save()


def _paper_block(res: Results, args, clean: Path, triggers: list[str]) -> dict[str, Any]:
    """The pilot's entry in the results, filled as triggers finish."""
    return {
        "pilot": True,
        "note": "a pilot: the triggers that fitted the budget, not the 51 of the study",
        "arch": "resnet18",
        "rate": RATE,
        "methods": METHODS,
        "protocol": protocol_settings("resnet18"),
        "clean_model_sha256": sha256_of(clean / "model.safetensors"),
        "budget_s": args.budget_s,
        "first_trigger_estimate_s": first_trigger_estimate(res, args),
        "planned": triggers,
        "finished": [],
        "unfinished": [],
        "not_started": [],
        "stopped": None,
        "records": [],
    }


def _paper_setup(args, budget: Budget, work: Path, trigger: str, where: dict[str, Any]) -> Setup:
    """The study's setup for one trigger; ``where`` follows its tasks (and --cut-at expires the
    budget when the named task starts, for the tests)."""

    def on_task(event: str, label: str) -> None:
        if event == "start":
            where["task"] = label
            if args.cut_at == f"{trigger}/{label}":
                budget.expire()
        else:
            where["finished"].append(label)

    return Setup(
        workdir=work / "paper",
        arch="resnet18",
        quick=TINY_PAPER if args.tiny else None,
        should_stop=budget.expired,
        on_task=on_task,
    )


def _unfinished(trigger, where, error: dict, budget: Budget, started: float, partial) -> dict:
    return {
        "trigger": trigger,
        "stopped_in": where["task"],
        "finished": where["finished"],
        **error,
        "seconds": round(budget.clock() - started, 1),
        **partial,
    }


def entry_asr(entry: dict[str, Any]) -> float:
    runs = entry.get("restarts", [entry])
    return sum(r["asr"] for r in runs) / len(runs)


def mesa_stage(res: Results, args) -> None:
    import mesa_speed

    res.data["mesa_speed"] = mesa_speed.measure(
        mesa_speed.parse_args(["--quick"] if args.tiny else [])
    )
    res.save()


def cut_dataset(name: str, n_train: int, n_test: int) -> None:
    """The first images of CIFAR-10 as their own dataset (for --tiny)."""
    from engine.catalog import imported_path
    from engine.ml.data import _save_arrays

    data = load_dataset("cifar10")
    arrays = {
        "train_x": data.train_x[:n_train].numpy(),
        "train_y": data.train_y[:n_train].numpy(),
        "test_x": data.test_x[:n_test].numpy(),
        "test_y": data.test_y[:n_test].numpy(),
    }
    _save_arrays(imported_path(name), arrays, data.classes, data.mean, data.std, "cifar10 subset")


# ---------------------------------------------------------------------------------------------


def headline(data: dict[str, Any]) -> dict[str, Any]:
    """The figures of the last stdout line (the JSON file has everything)."""
    paper = data.get("paper_resnet18") or {}
    out = {
        "device": data["environment"].get("device_name"),
        "stages": data["stages"],
        "elapsed_s": data.get("elapsed_s"),
    }
    for key in ("resnet18_epoch_s_bs128", "resnet18_epoch_s_bs512"):
        if key in data:
            out[key] = data[key]
    if "clean_cifar10" in data:
        out["clean_acc"] = data["clean_cifar10"]["acc_clean"]
        out["clean_wall_s"] = data["clean_cifar10"]["wall_s"]
    if paper:
        out["triggers_finished"] = paper["finished"]
        out["triggers_unfinished"] = [u["trigger"] for u in paper["unfinished"]]
    if "mesa_speed" in data:
        out["mesa_steps_per_s"] = data["mesa_speed"]["ours"]["generator_steps_per_s"]
    return out


def table(data: dict[str, Any]) -> str:
    lines = [f"GPU run on {data['environment'].get('device_name')} ({data['elapsed_s']} s):"]
    for stage in STAGES:
        util = data["utilisation"].get(stage, {})
        busy = [g.get("util_mean_pct") for g in util.get("gpus", []) if "util_mean_pct" in g]
        lines.append(
            f"  {stage:<11} {data['stages'][stage]:<40}"
            + (f" GPU busy {busy[0]:.0f} % on average" if busy else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    trigger_order(args.triggers)  # a bad list: one line before anything runs
    if args.archive:
        import_dataset(args.archive, "cifar10")
    load_dataset("cifar10")  # a missing dataset: one line and exit 2 (run_main)
    configure_cpu()
    device = pick_device("auto")
    configure_device(device)
    dataset = "cifar10"
    if args.tiny:
        cut_dataset(TINY_DATASET, *TINY_SIZES)
        dataset = TINY_DATASET
    heartbeat = Heartbeat(args.heartbeat_s)
    log(f"the engine's heartbeat would show: {heartbeat_line(heartbeat.describe())}")
    res = Results(
        args.out,
        {
            "benchmark": "gpu",
            "format": FORMAT,
            "tiny": args.tiny,
            "environment": {**environment(device), "gpus": heartbeat.describe()},
            "command": sys.argv[1:] if argv is None else argv,
            "commit": commit(),
            "started": now(),
            "budget_s": args.budget_s,
            "dataset": dataset,
            "stages": {s: "pending" if s in args.stages else "skipped: not asked" for s in STAGES},
            "history": [],
            "utilisation": {},
        },
    )
    res.started = started
    budget = Budget(args.budget_s, started)
    failed = False
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        clean = args.clean_model
        stage_work: dict[str, Callable[[], Any]] = {
            "epoch": lambda: epoch_stage(res, args, device, dataset, work),
            "clean": lambda: clean_stage(res, args, dataset, work),
            "paper": lambda: paper_stage(res, args, clean, budget, work),
            "mesa_speed": lambda: mesa_stage(res, args),
        }
        for stage in STAGES:
            if stage not in args.stages:
                continue
            if stage == "paper" and clean is None:
                res.stage(stage, "skipped: no clean model (the clean stage did not finish)")
                continue
            res.stage(stage, "running")
            log(f"stage {stage}")
            try:
                with heartbeat.watch(stage, res.data["utilisation"]):
                    value = stage_work[stage]()
            except Exception as exc:  # noqa: BLE001 (the later stages still run)
                failed = True
                traceback.print_exc()
                res.stage(stage, f"failed: {type(exc).__name__}: {exc}"[:300])
                continue
            if stage == "clean":
                clean = value
            res.stage(stage, "done")
    print(table(res.data))
    print(json.dumps(headline(res.data)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
