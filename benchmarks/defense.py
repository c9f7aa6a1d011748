"""The defense quality bar of issue 3: MESA repair against its baselines on CIFAR-10.

For every trigger x seed: train the backdoored cpu-quick model (engine.tasks.train), run a MESA
search (3 betas, engine.tasks.mesa), then repair with every method at every stamping rate
(engine.tasks.defend) and print, per trigger/seed/method/rate, clean accuracy, ASR, robust
accuracy, ASR under pattern variations, the residual check and wall time. Then:

- the summary table at the headline rate (mean and worst per method; point also over restarts);
- the alpha ablation (alpha 0, 0.1, 10 at the default length and at a longer one: validity,
  diversity and the ensemble's repair ASR);
- the paper's attack recipe: a clean quick model fine-tuned 10 epochs at lr 1e-3 with 1 %
  poisoning, repaired by MESA and by point (mean and worst);
- the bar checks of issue 3, each with the numbers it used.

The main part's recipe (the models, the search, the repairs and their order) lives in
engine/defense_bar.py, which the study template ``defense-bar`` builds its jobs from, so
``mesa-tui study create NAME --template defense-bar --seeds 0,1,2`` queues the same tasks (the
test tests/engine/test_defense_bar.py compares them spec for spec). This script stays: its
committed JSONs (benchmarks/results) were made by it, and its alpha ablation, paper-recipe part
and the residual check of the unrepaired model have no template yet.

Every setting is fixed before anything runs; nothing is chosen by looking at the held-out split
(the defenses see only the defender split; the held-out split only scores them).

Usage: python benchmarks/defense.py [--triggers bw:170,bw:0,bw:85] [--seeds 3]
       [--rates 0.01,0.1,0.2] [--methods ...] [--steps 620] [--parts main,alpha,paper]
       [--models bw:170=ARTIFACT,...] [--workdir DIR] [--threads N] [--quick] [--out FILE]
       python benchmarks/defense.py --merge A.json,B.json [--out FILE] [--markdown FILE]
The full run takes hours on a 2-core CPU; --quick is a tiny smoke version (about a minute).
With --workdir every finished task leaves its result there and a rerun reuses it, so a long
benchmark can be split over several sittings (or parts run side by side: --parts alpha in one
process, --parts main in another) and the last run prints the whole JSON. Reports of runs that
did not share a workdir (other triggers, other machines) combine with --merge. --models reuses
backdoored models already trained (a study's, say) instead of training them again.
JSON goes to stdout (and --out); progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine import defense_bar as bar  # noqa: E402
from engine.errors import DatasetMissing  # noqa: E402
from engine.reporter import MemoryReporter, TaskResult  # noqa: E402
from engine.specs import build_spec  # noqa: E402

SHARED_CIFAR = Path(__file__).resolve().parent.parent.parent / "shared/data/cifar10-jpeg.tar.gz"
# The recipe's methods in the driver's spelling (mesa:0.9 for mesa-0.9, as its reports name them).
ALL_METHODS = tuple(m.replace("mesa-", "mesa:") for m in bar.METHODS)
VARIATION_KEYS = ("asr_noise", "asr_rot90", "asr_invert", "asr_flip1", "asr_occlude1", "asr_corner")
QUICK_DATASET = "cifar10-quick"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _models_and_methods(p)
    _parts_and_output(p)
    args = p.parse_args(argv)
    _check(p, args)
    if args.skip_alpha and "alpha" in args.parts:
        args.parts.remove("alpha")
    if args.skip_paper and "paper" in args.parts:
        args.parts.remove("paper")
    models = {}
    for item in args.models:
        trigger, sep, path = item.partition("=")
        if not sep or not Path(path, "manifest.json").exists():
            p.error(f"--models {item!r}: give TRIGGER=ARTIFACT_DIR (a model artifact directory)")
        models[trigger] = path
    args.models = models
    if args.quick:
        apply_quick(args)
    if args.residual_rates is None:
        args.residual_rates = [args.headline_rate]
    if args.paper_seeds is None:
        args.paper_seeds = args.seeds
    if args.alpha_betas is None:
        args.alpha_betas = args.betas
    return args


def _models_and_methods(p: argparse.ArgumentParser) -> None:
    """The main part: which models, which search, which repairs."""
    p.add_argument("--triggers", type=csv(str), default=list(bar.TRIGGERS))
    p.add_argument("--seeds", type=int, default=bar.SEEDS, help="seeds 0..N-1 per trigger")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="start the main part's seeds here (seeds F..F+N-1): a later sitting adds seeds",
    )
    p.add_argument("--rates", type=csv(float), default=list(bar.RATES))
    p.add_argument("--headline-rate", type=float, default=bar.HEADLINE_RATE)
    p.add_argument("--methods", type=csv(str), default=list(ALL_METHODS))
    p.add_argument("--target", type=int, default=bar.TARGET)
    p.add_argument("--dataset", default=bar.TRAIN["dataset"])
    p.add_argument(
        "--train-epochs", type=int, default=None, help="default: 10 (bar.RESULTS_RECIPE)"
    )
    p.add_argument("--steps", type=int, default=bar.SEARCH["steps"], help="search steps per beta")
    p.add_argument("--betas", type=csv(float), default=list(bar.SEARCH["betas"]))
    p.add_argument("--search-batch", type=int, default=bar.SEARCH["batch_size"])
    p.add_argument("--hidden", type=int, default=bar.SEARCH["hidden"])
    p.add_argument("--repair-epochs", type=int, default=bar.REPAIR["epochs"])
    p.add_argument("--point-restarts", type=int, default=bar.REPAIR["point_restarts"])
    p.add_argument("--point-epochs", type=int, default=bar.REPAIR["point_epochs"])
    p.add_argument(
        "--nc-epochs", type=int, default=bar.REPAIR["nc_epochs"], help="Neural Cleanse outer steps"
    )
    p.add_argument("--nc-steps-per-epoch", type=int, default=bar.REPAIR["nc_steps_per_epoch"])
    p.add_argument("--residual-steps", type=int, default=bar.REPAIR["residual_steps"])
    p.add_argument(
        "--residual-rates",
        type=csv(float),
        default=None,
        help="rates whose repairs get the residual search (default: the headline rate)",
    )
    p.add_argument(
        "--residual-methods",
        type=csv(str),
        default=None,
        help="methods whose repairs get the residual search (default: all)",
    )
    p.add_argument(
        "--models",
        type=csv(str),
        default=[],
        help="TRIGGER=ARTIFACT: reuse this backdoored model for the trigger at its own seed",
    )


def _parts_and_output(p: argparse.ArgumentParser) -> None:
    """The alpha and paper parts, the machine, and where the report goes."""
    p.add_argument("--alpha", type=csv(float), default=[0.0, 0.1, 10.0])
    p.add_argument("--alpha-long-steps", type=int, default=3000)
    p.add_argument(
        "--alpha-betas",
        type=csv(float),
        default=None,
        help="betas of the ablation's searches (default: --betas; one beta costs a third)",
    )
    p.add_argument("--skip-alpha", action="store_true")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument(
        "--parts",
        type=csv(str),
        default=["main", "alpha", "paper"],
        help="which parts run: main (every method at every rate), alpha, paper",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--paper-epochs", type=int, default=10)
    p.add_argument(
        "--paper-lr",
        type=float,
        default=1e-3,
        help="fine-tuning learning rate of the paper recipe (the paper's 1e-3 is for ResNet-18)",
    )
    p.add_argument("--paper-seeds", type=int, default=None, help="default: --seeds")
    p.add_argument("--clean-epochs", type=int, default=None, help="clean model (default: 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workdir", default=None, help="keep artifacts here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown here")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version (about a minute)")
    p.add_argument(
        "--merge",
        type=csv(str),
        default=[],
        help="REPORT.json,...: run nothing; combine reports of earlier runs (other triggers, "
        "seeds or sittings) into one, with the summary and bar checks over all of them",
    )


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = [m for m in args.methods if m not in ALL_METHODS and not m.startswith("mesa:")]
    if unknown:
        p.error(f"unknown methods {unknown}; use {', '.join(ALL_METHODS)} or mesa:BETA")
    bad_parts = [part for part in args.parts if part not in ("main", "alpha", "paper")]
    if bad_parts:
        p.error(f"unknown parts {bad_parts}; use main, alpha, paper")
    if args.first_seed < 0 or args.seeds < 1:
        p.error(f"--first-seed {args.first_seed} --seeds {args.seeds}: use 0 or more and 1 or more")


def apply_quick(args: argparse.Namespace) -> None:
    """Tiny sizes everywhere: a smoke test of the whole pipeline, not a measurement."""
    args.triggers = args.triggers[:1]
    args.seeds = 1
    args.rates = [args.headline_rate]
    args.dataset = QUICK_DATASET
    args.train_epochs = 1
    args.residual_methods = ["mesa"]
    args.steps = 8
    args.search_batch = 32
    args.hidden = 16
    args.repair_epochs = 1
    args.point_restarts = 2
    args.point_epochs = 1
    args.nc_epochs = 2
    args.nc_steps_per_epoch = 2
    args.residual_steps = 2
    args.alpha_long_steps = 16
    args.paper_epochs = 1
    args.clean_epochs = 1


# ---------------------------------------------------------------------------------------------
# Data


def ensure_dataset(name: str) -> None:
    """CIFAR-10 from the data home, else imported from the shared JPEG copy; the quick subset
    (1,000 training and 300 test images) is cut from it."""
    from engine.ml.data import import_dataset, load_dataset

    base = "cifar10"
    try:
        data = load_dataset(base)
    except DatasetMissing:
        if not SHARED_CIFAR.exists():
            raise
        log(f"importing {SHARED_CIFAR} as {base} (once)")
        import_dataset(SHARED_CIFAR, base)
        data = load_dataset(base)
    if name == QUICK_DATASET:
        from engine.catalog import imported_path
        from engine.ml.data import _save_arrays

        arrays = {
            "train_x": data.train_x[:1000].numpy(),
            "train_y": data.train_y[:1000].numpy(),
            "test_x": data.test_x[:300].numpy(),
            "test_y": data.test_y[:300].numpy(),
        }
        _save_arrays(
            imported_path(name), arrays, data.classes, data.mean, data.std, "cifar10 subset"
        )


# ---------------------------------------------------------------------------------------------
# Running tasks


RESULT_FILE = "benchmark-result.json"


def run_task(kind: str, spec: Any, workdir: Path) -> TaskResult:
    """Run one task in ``workdir``; a result left there by an earlier run of the same spec is
    reused (its wall time is the one measured then)."""
    import importlib

    saved = workdir / RESULT_FILE
    spec_json = spec.model_dump(mode="json")
    if saved.exists():
        data = json.loads(saved.read_text())
        if (
            data.get("spec") == spec_json
            and data.get("artifact")
            and Path(data["artifact"]).exists()
        ):
            log(f"  reusing {kind} result in {workdir}")
            return TaskResult(data["artifact"], data["metrics"], data["extra"])
    task = importlib.import_module(f"engine.tasks.{kind}")
    started = time.perf_counter()
    result = task.run(spec, MemoryReporter(workdir, resume=True))  # a killed run goes on
    result.extra["wall_s"] = time.perf_counter() - started
    data = {"spec": spec_json, "artifact": result.artifact, "metrics": result.metrics}
    write_json(saved, {**data, "extra": result.extra})
    return result


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a run killed while writing leaves the old file (or none)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=float))
    tmp.replace(path)


def reused_model(args, trigger: str, seed: int) -> TaskResult | None:
    """The artifact given with --models for this trigger, when it was trained with this seed."""
    from engine.ml.artifacts import read_manifest

    path = args.models.get(trigger)
    if path is None:
        return None
    manifest = read_manifest(path, verify=False)
    spec = manifest.get("spec", {})
    if spec.get("trigger") != trigger:
        raise SystemExit(
            f"--models {trigger}={path}: that model's trigger is {spec.get('trigger')}"
        )
    if spec.get("seed") != seed:
        return None
    return TaskResult(str(path), manifest.get("metrics", {}), {"wall_s": None, "reused": True})


def train_model(args, trigger: str | None, seed: int, workdir: Path, **overrides) -> TaskResult:
    """A backdoored (or, with no trigger, clean) model: the recipe of engine.defense_bar over its
    preset, or another preset's own recipe (the paper part's attack)."""
    preset = overrides.pop("preset", bar.TRAIN_PRESET)
    given = dict(
        dataset=args.dataset,
        target=args.target,
        epochs=args.train_epochs,
        device=args.device,
        precision=args.precision,
    )
    given.update(overrides)
    if preset == bar.TRAIN_PRESET:
        values = bar.train_values(trigger or "none", seed, given)
    else:  # None means "not given", as in the recipe
        values = {"trigger": trigger or "none", "seed": seed}
        values.update({k: v for k, v in given.items() if v is not None})
    if trigger is None:
        values["poison_rate"] = 0.0
    return run_task("train", build_spec("train", preset=preset, overrides=values), workdir)


def run_search(
    args,
    model: str,
    seed: int,
    workdir: Path,
    alpha: float | None = None,
    steps: int | None = None,
    betas: list[float] | None = None,
) -> TaskResult:
    given = dict(
        model=model,
        target=args.target,
        betas=betas or args.betas,
        alpha=alpha,
        steps=steps or args.steps,
        batch_size=args.search_batch,
        hidden=args.hidden,
        device=args.device,
        precision=args.precision,
    )
    if args.quick:
        given.update(sample_every=4, n_eval_triggers=8, eval_images=16, samples=32)
    values = bar.search_values(seed, given)
    return run_task("mesa", build_spec("mesa", overrides=values), workdir)


def repair_settings(args) -> dict[str, Any]:
    """The driver's options as defend settings over engine.defense_bar's (the residual search
    has the main search's batch and width)."""
    return dict(
        epochs=args.repair_epochs,
        target=args.target,
        point_restarts=args.point_restarts,
        point_epochs=args.point_epochs,
        nc_epochs=args.nc_epochs,
        nc_steps_per_epoch=args.nc_steps_per_epoch,
        residual_steps=args.residual_steps,
        residual_hidden=args.hidden,
        residual_batch_size=args.search_batch,
        device=args.device,
        precision=args.precision,
    )


def repair_plan(args, rates: list[float], methods: list[str], **changes: Any) -> bar.Plan:
    """The repairs the options ask for (``changes``: other Plan fields, e.g. no residual)."""
    residual_methods = args.residual_methods
    fields: dict[str, Any] = dict(
        rates=tuple(rates),
        methods=tuple(m.replace("mesa:", "mesa-") for m in methods),
        headline_rate=args.headline_rate,
        residual_rates=tuple(args.residual_rates),
        residual_methods=None if residual_methods is None else tuple(residual_methods),
    )
    return bar.Plan(**{**fields, **changes})


def run_repair(args, repair: bar.Repair, model: str, search: str | None, reversal: list[str],
               workdir: Path) -> TaskResult:  # fmt: skip
    """One repair of engine.defense_bar's list; ``reversal``: the artifacts of those before it."""
    values = {**repair.values, "model": model}
    if repair.uses_search:
        values["search"] = search
    if repair.reversal_of is not None:
        values["reversal_from"] = reversal[repair.reversal_of]
    return run_task("defend", build_spec("defend", overrides=values), workdir)


def row_of(result: TaskResult) -> dict[str, Any]:
    m = result.metrics
    row = {
        "acc_clean": m.get("eval/acc_clean"),
        "asr": m.get("eval/asr"),
        "ra": m.get("eval/ra"),
        "before_acc_clean": m.get("before/acc_clean"),
        "before_asr": m.get("before/asr"),
        "variations": {k: m[f"eval/{k}"] for k in VARIATION_KEYS if f"eval/{k}" in m},
        "residual_validity": m.get("residual/validity"),
        # the mean own ASR of the residual search's samples: unlike validity (own ASR at least
        # 0.9), it still shows a backdoor that survived a little weakened (90 % ASR left)
        "residual_own_asr": m.get("residual/validity_mean"),
        "repair_s": m.get("time/repair_s"),
        "reverse_s": m.get("time/reverse_s"),
        "wall_s": result.extra.get("wall_s"),
    }
    return row


def search_summary(result: TaskResult, betas: list[float]) -> dict[str, Any]:
    m = result.metrics
    out: dict[str, Any] = {"wall_s": result.extra.get("wall_s")}
    for beta in betas:
        key = f"mesa/beta={beta:g}"
        out[f"beta={beta:g}"] = {
            name: m.get(f"{key}/{name}")
            for name in (
                "validity",
                "validity_mean",
                "pixel_std",
                "pairwise_l2",
                "knn_entropy",
                "bw_distinct",
                "nearest_to_true",
            )
        }
    return out


def residual_reference(args, model: str, seed: int, workdir: Path) -> dict[str, float]:
    """The residual check on the model before any repair: what the same short search finds
    when the backdoor is intact (the scale for every repaired model's residual/validity).
    Kept in ``workdir`` like a task's result, so a rerun does not search again."""
    from engine.ml.runtime import pick_device, resolve_precision
    from engine.tasks.defend import RESIDUAL_SEED_OFFSET, residual_check
    from engine.tasks.mesa import load_defender_data

    saved = workdir / "residual-reference.json"
    key = {"model": model, "seed": seed, "target": args.target, "steps": args.residual_steps}
    key.update(batch=args.search_batch, hidden=args.hidden, precision=args.precision)
    stored = json.loads(saved.read_text()) if saved.exists() else {}
    if stored.get("key") == key:
        return stored["result"]
    device = pick_device(args.device)
    net, _, normalizer, images, labels, _ = load_defender_data(model, device, 0.8, 0)
    result = residual_check(
        net,
        normalizer,
        images,
        labels,
        args.target,
        steps=args.residual_steps,
        batch_size=args.search_batch,
        hidden=args.hidden,
        seed=seed + RESIDUAL_SEED_OFFSET,
        device=device,
        precision=resolve_precision(args.precision, device),
        placement="per-image",  # as every committed result's residual was searched
    )
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(saved, {"key": key, "result": result})
    return result


# ---------------------------------------------------------------------------------------------
# One backdoored model: search, then every method at every rate


def repair_all(
    args, model: str, search: str, seed: int, root: Path, rates: list[float], methods: list[str]
) -> list[dict[str, Any]]:
    """Every repair of one model in engine.defense_bar's order: the headline rate first, whose
    runs reverse the point and Neural Cleanse triggers that every other rate repairs with (also
    when added in a later sitting; another order would reverse again at the new rate, and the
    headline runs' specs, which name the reversal they used, would no longer match their saved
    results)."""
    rows = []
    artifacts: list[str] = []
    plan = repair_plan(args, rates, methods)
    for repair in bar.repairs(plan, seed, repair_settings(args)):
        name = repair.method.replace("mesa-", "mesa:")
        if repair.restart is not None:
            name += f"#{repair.restart}"
        workdir = root / f"defend-{name.replace(':', '-')}-{repair.rate:g}"
        log(f"  repair {name} at rate {repair.rate:g}")
        result = run_repair(args, repair, model, search, artifacts, workdir)
        artifacts.append(str(result.artifact))
        rows.append(_repair_row(name, repair, result))
        row = rows[-1]
        log(
            f"    acc {row['acc_clean']:.4f}  asr {row['asr']:.4f}  ra {row['ra']:.4f}"
            f"  {row['wall_s']:.0f}s"
        )
    return rows


def _repair_row(name: str, repair: bar.Repair, result: TaskResult) -> dict[str, Any]:
    row = {"method": name, "rate": repair.rate, **row_of(result)}
    if repair.values["method"] == "neural-cleanse":
        row["nc_mask_l1"] = result.metrics.get("nc/mask_l1")
    if repair.restart is not None:
        r = repair.restart
        row["point_success"] = result.metrics.get(f"point/restart={r}/success")
        row["point_distance_to_true"] = result.metrics.get(f"point/restart={r}/distance_to_true")
    return row


def summarise(rows: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """Mean and worst ASR per method at ``rate`` (point rows pool the restarts)."""
    table: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if not math.isclose(row["rate"], rate):
            continue
        name = row["method"].split("#")[0]
        entry = table.setdefault(name, {"asr": [], "acc_drop": [], "ra": [], "acc": []})
        entry["asr"].append(row["asr"])
        entry["ra"].append(row["ra"])
        entry["acc"].append(row["acc_clean"])
        entry["acc_drop"].append(row["before_acc_clean"] - row["acc_clean"])
    out = {}
    for name, entry in table.items():
        out[name] = {
            "n": len(entry["asr"]),
            "asr_mean": sum(entry["asr"]) / len(entry["asr"]),
            "asr_worst": max(entry["asr"]),
            "acc_clean_mean": sum(entry["acc"]) / len(entry["acc"]),
            "acc_drop_mean": sum(entry["acc_drop"]) / len(entry["acc_drop"]),
            "acc_drop_worst": max(entry["acc_drop"]),
            "ra_mean": sum(entry["ra"]) / len(entry["ra"]),
        }
    return out


def per_beta(search: dict[str, Any]) -> dict[str, Any]:
    """The per-beta entries of a search summary (``beta=0.9``: ...), without its ``wall_s``."""
    return {key: value for key, value in search.items() if key.startswith("beta=")}


def bar_checks(summary: dict[str, Any], searches: list[dict[str, Any]], betas) -> dict[str, Any]:
    """The bar of issue 3, each check with the numbers it used (None: not measured)."""
    checks: dict[str, Any] = {}
    wanted = None if betas is None else {f"beta={b:g}" for b in betas}  # None: every beta
    validities = [
        v["validity"]
        for s in searches
        for key, v in per_beta(s).items()
        if wanted is None or key in wanted
    ]
    validities = [v for v in validities if v is not None]
    if validities:
        checks["search_validity_min"] = min(validities)
        checks["search_validity_ok"] = min(validities) >= 0.8
    mesa, ideal = summary.get("mesa"), summary.get("ideal")
    if mesa:
        checks["mesa_asr_mean_ok"] = mesa["asr_mean"] <= 0.05
        checks["mesa_asr_worst_ok"] = mesa["asr_worst"] <= 0.10
        checks["mesa_acc_drop_ok"] = mesa["acc_drop_worst"] <= 0.02
        if ideal:
            checks["mesa_minus_ideal_asr_mean"] = mesa["asr_mean"] - ideal["asr_mean"]
        if "point" in summary:
            point = summary["point"]
            checks["mesa_vs_point_mean_ok"] = mesa["asr_mean"] <= point["asr_mean"] + 0.01
            checks["mesa_vs_point_worst_ok"] = mesa["asr_worst"] <= point["asr_worst"] + 0.01
        for control in ("random-patch", "finetune"):
            if control in summary:
                checks[f"mesa_beats_{control}_by"] = summary[control]["asr_mean"] - mesa["asr_mean"]
    return checks


# ---------------------------------------------------------------------------------------------
# Main


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_reports(paths: list[str], headline_rate: float) -> dict[str, Any]:
    """One report from several: the models with the files and machines they came from (a model
    in several reports once, with the repairs of all), and the summaries and bar checks
    recomputed over all of their repairs."""
    report: dict[str, Any] = {"benchmark": "defense", "merged_from": [], "models": []}
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"--merge {path}: not a readable JSON report ({exc}); give a --out file of a run")
        if part.get("benchmark") != "defense":
            fail(f"--merge {path} is not a defense benchmark report; give a --out file of a run")
        report["merged_from"].append({"file": str(path), "machine": part.get("machine")})
        for model in part.get("models", []):
            key = (model["trigger"], model["seed"])
            if key not in seen:
                seen[key] = {**model, "source": str(path)}
                report["models"].append(seen[key])
                continue
            # The same model again (another run in its workdir: more rates or methods): its
            # repairs join the first entry's; two different models under one key are an error.
            first = seen[key]
            if first["attack"].get("artifact") != model["attack"].get("artifact"):
                fail(
                    f"--merge: {path} and {first['source']} hold different models for trigger "
                    f"{key[0]} seed {key[1]}; merge reports of different models"
                )
            have = {(r["method"], r["rate"]) for r in first["repairs"]}
            first["repairs"] += [
                r for r in model["repairs"] if (r["method"], r["rate"]) not in have
            ]
            first["source"] += f", {path}"
        if part.get("alpha_ablation"):
            report.setdefault("alpha_ablation", []).extend(part["alpha_ablation"])
        if part.get("paper_recipe"):
            report.setdefault("paper_recipe", {"models": []})["models"] += [
                {**m, "source": str(path)} for m in part["paper_recipe"]["models"]
            ]
    rows = [r for m in report["models"] for r in m["repairs"]]
    if rows:
        rates = sorted({r["rate"] for r in rows})
        report["summary"] = {"rate": headline_rate, "methods": summarise(rows, headline_rate)}
        report["summary_by_rate"] = {f"{r:g}": summarise(rows, r) for r in rates}
        searches = [m["search"] for m in report["models"]]
        report["bar"] = bar_checks(report["summary"]["methods"], searches, None)
    if "paper_recipe" in report:
        flat = [r for m in report["paper_recipe"]["models"] for r in m["repairs"]]
        report["paper_recipe"]["summary"] = summarise(flat, headline_rate)
    return report


def emit(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON to stdout (and --out), the tables to stderr (and --markdown)."""
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    tables = markdown(report)
    print(tables, file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(tables)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        report = merge_reports(args.merge, args.headline_rate)
        emit(report, args)
        return report
    if args.threads:  # the tasks (and configure_cpu here) read the budget from there
        from engine.ml.runtime import configure_cpu
        from engine.run_environment import THREADS_ENV

        os.environ[THREADS_ENV] = str(args.threads)
        configure_cpu()
    started = time.perf_counter()
    ensure_dataset(args.dataset)
    temp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="mesa-defense-bench-")
        root = Path(temp.name)
    report: dict[str, Any] = {
        "benchmark": "defense",
        "machine": _machine(args),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "models": [],
    }
    first_model = _main_part(args, root, report)
    if "alpha" in args.parts and first_model is not None:
        report["alpha_ablation"] = alpha_ablation(args, *first_model)
    if "paper" in args.parts:
        report["paper_recipe"] = paper_recipe(args, root / "paper")
    report["wall_s"] = time.perf_counter() - started
    emit(report, args)
    if temp is not None:
        temp.cleanup()
    return report


def _machine(args) -> dict[str, Any]:
    from engine.ml.runtime import cpu_has_native_bf16, cpu_name, pick_device, resolve_precision

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "native_bf16": cpu_has_native_bf16(),
        "precision": resolve_precision(args.precision, pick_device(args.device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _main_part(args, root: Path, report: dict[str, Any]) -> tuple[str, int, Path] | None:
    """Every trigger and seed: the backdoored model, and with the main part its search and
    repairs (report["models"], the summaries and bar checks); returns the first model (the alpha
    ablation's)."""
    all_rows: list[dict[str, Any]] = []
    searches: list[dict[str, Any]] = []
    first_model: tuple[str, int, Path] | None = None
    needs_models = "main" in args.parts or "alpha" in args.parts
    for trigger in args.triggers if needs_models else []:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            base = root / f"{trigger.replace(':', '')}-s{seed}"
            trained = _backdoored(args, trigger, seed, base)
            if first_model is None:
                first_model = (str(trained.artifact), seed, base)
            if "main" not in args.parts:
                continue
            entry = _model_entry(args, trigger, seed, base, trained)
            searches.append(entry["search"])
            all_rows += entry["repairs"]
            report["models"].append(entry)
    if "main" in args.parts:
        report["summary"] = {
            "rate": args.headline_rate,
            "methods": summarise(all_rows, args.headline_rate),
        }
        report["summary_by_rate"] = {f"{r:g}": summarise(all_rows, r) for r in args.rates}
        report["bar"] = bar_checks(report["summary"]["methods"], searches, args.betas)
    return first_model


def _backdoored(args, trigger: str, seed: int, base: Path) -> TaskResult:
    tag = base.name
    trained = reused_model(args, trigger, seed)
    if trained is None:
        log(f"{tag}: training the backdoored cpu-quick model")
        return train_model(args, trigger, seed, base / "model")
    log(f"{tag}: reusing the backdoored model {trained.artifact}")
    return trained


def _model_entry(args, trigger: str, seed: int, base: Path, trained: TaskResult) -> dict:
    """One model's search, residual reference and repairs, as the report lists them."""
    model = str(trained.artifact)
    log(f"{base.name}: MESA search ({args.steps} steps, betas {args.betas})")
    search = run_search(args, model, seed, base / "search")
    summary = search_summary(search, args.betas)
    reference = residual_reference(args, model, seed, base) if args.residual_steps else {}
    rows = repair_all(args, model, str(search.artifact), seed, base, args.rates, args.methods)
    for row in rows:
        row.update({"trigger": trigger, "seed": seed})
    return {
        "trigger": trigger,
        "seed": seed,
        "attack": {
            "acc_clean": trained.metrics.get("eval/acc_clean"),
            "asr": trained.metrics.get("eval/asr"),
            "train_s": trained.extra.get("wall_s"),
            "reused": bool(trained.extra.get("reused")),
            "artifact": model,
        },
        "search": summary,
        "residual_before_repair": reference.get("residual/validity"),
        "residual_own_asr_before_repair": reference.get("residual/validity_mean"),
        "repairs": rows,
    }


# ---------------------------------------------------------------------------------------------
# Tables


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _repair_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for entry in entries:
        for r in entry["repairs"]:
            variations = r.get("variations") or {}
            worst = max(variations.values()) if variations else None
            wall = r.get("wall_s")
            rows.append(
                [
                    entry["trigger"],
                    str(entry["seed"]),
                    r["method"],
                    f"{r['rate']:g}",
                    _pct(r["acc_clean"]),
                    _pct(r["asr"]),
                    _pct(r["ra"]),
                    _pct(worst),
                    _pct(r.get("residual_validity")),
                    _pct(r.get("residual_own_asr")),
                    "–" if wall is None else f"{wall:.0f}",
                ]
            )
    return rows


REPAIR_HEADER = [
    "trigger",
    "seed",
    "method",
    "rate",
    "clean acc",
    "ASR",
    "robust acc",
    "worst ASR under variations",
    "residual validity",
    "residual own ASR",
    "wall s",
]
SUMMARY_HEADER = [
    "method",
    "n",
    "ASR mean",
    "ASR worst",
    "clean acc",
    "acc drop worst",
    "robust acc",
]


def _summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            name,
            str(s["n"]),
            _pct(s["asr_mean"]),
            _pct(s["asr_worst"]),
            _pct(s["acc_clean_mean"]),
            f"{100 * s['acc_drop_worst']:.1f} pt",
            _pct(s["ra_mean"]),
        ]
        for name, s in summary.items()
    ]


def _rate_table(by_rate: dict[str, dict[str, Any]]) -> str:
    """One row per method, one column per stamping rate: the rates side by side."""
    rates = sorted(by_rate, key=float)
    methods = list(dict.fromkeys(name for rate in rates for name in by_rate[rate]))
    rows = []
    for name in methods:
        cells = []
        for rate in rates:
            s = by_rate[rate].get(name)
            cells.append(
                "–" if s is None else f"{_pct(s['asr_mean'])} / {_pct(s['asr_worst'])} ({s['n']})"
            )
        rows.append([name, *cells])
    return _table(["method", *(f"rate {r}" for r in rates)], rows)


def markdown(report: dict[str, Any]) -> str:
    """The report's tables in Markdown: per repair, per method and rate, the alpha ablation, the
    paper recipe and the bar checks."""
    out: list[str] = []
    if report.get("merged_from"):
        out += _merged_md(report["merged_from"])
    if report.get("models"):
        out += _models_md(report)
    if report.get("alpha_ablation"):
        out += _alpha_md(report["alpha_ablation"])
    if report.get("paper_recipe"):
        out += _paper_md(report["paper_recipe"])
    if report.get("bar"):
        out.append("\n## Bar checks\n")
        out.append("\n".join(f"- {k}: {v}" for k, v in report["bar"].items()))
    return "\n".join(out) + "\n"


def _merged_md(parts: list[dict[str, Any]]) -> list[str]:
    out = ["Merged from:\n"]
    for part in parts:
        machine = part.get("machine") or {}
        where = machine.get("cpu") or machine.get("processor", "?")
        if "precision" in machine:
            where += f", {machine['precision']}"
        out.append(f"- {part['file']} ({where}, torch {machine.get('torch', '?')})")
    out.append("")
    return out


def _models_md(report: dict[str, Any]) -> list[str]:
    out = ["## Backdoored models and searches\n"]
    rows = []
    for m in report["models"]:
        for beta, s in per_beta(m["search"]).items():
            rows.append(
                [
                    m["trigger"],
                    str(m["seed"]),
                    _pct(m["attack"]["acc_clean"]),
                    _pct(m["attack"]["asr"]),
                    beta,
                    _pct(s.get("validity")),
                    f"{s.get('pixel_std') or 0:.3f}",
                    f"{s.get('pairwise_l2') or 0:.2f}",
                    f"{s.get('bw_distinct') or 0:.0f}",
                ]
            )
    header = ["trigger", "seed", "clean acc", "ASR", "beta", "validity", "pixel std"]
    out.append(_table(header + ["pairwise L2", "distinct b/w"], rows))
    out.append("\n## Every repair\n")
    out.append(_table(REPAIR_HEADER, _repair_rows(report["models"])))
    by_rate = report.get("summary_by_rate", {})
    for rate, summary in by_rate.items():
        out.append(f"\n## Mean and worst over triggers and seeds, stamping rate {rate}\n")
        out.append(_table(SUMMARY_HEADER, _summary_rows(summary)))
    if len(by_rate) > 1:
        out.append("\n## ASR left by stamping rate (mean / worst, number of repairs)\n")
        out.append(_rate_table(by_rate))
    return out


def _alpha_md(ablation: list[dict[str, Any]]) -> list[str]:
    rows = []
    for a in ablation:
        for beta, s in per_beta(a["search"]).items():
            rows.append(
                [
                    f"{a['alpha']:g}",
                    str(a["steps"]),
                    beta,
                    _pct(s.get("validity")),
                    f"{s.get('pixel_std') or 0:.3f}",
                    f"{s.get('pairwise_l2') or 0:.2f}",
                    f"{s.get('knn_entropy') or 0:.1f}",
                    f"{s.get('bw_distinct') or 0:.0f}",
                    _pct(a["repair_asr"]),
                    _pct(a["repair_acc_clean"]),
                ]
            )
    header = ["alpha", "steps", "beta", "validity", "pixel std", "pairwise L2"]
    header += ["k-NN entropy", "distinct b/w", "repair ASR", "clean acc"]
    return ["\n## Alpha ablation\n", _table(header, rows)]


def _paper_md(paper: dict[str, Any]) -> list[str]:
    rows = []
    for m in paper.get("models", []):
        searched = per_beta(m.get("search", {}))
        nearest = [v.get("nearest_to_true") for v in searched.values()]
        nearest = [v for v in nearest if v is not None]
        rows.append(
            [
                m["trigger"],
                str(m["seed"]),
                _pct(m["attack"]["acc_clean"]),
                _pct(m["attack"]["asr"]),
                " / ".join(_pct(v.get("validity")) for v in searched.values()),
                " / ".join(f"{v.get('bw_distinct') or 0:.0f}" for v in searched.values()),
                f"{min(nearest):.2f}" if nearest else "–",
            ]
        )
    header = ["trigger", "seed", "clean acc", "ASR", "validity per beta"]
    header += ["distinct b/w per beta", "nearest sample to the trigger (L2)"]
    return [
        "\n## The paper's attack recipe (fine-tuned, 1 % poisoning)\n",
        _table(header, rows) + "\n",
        _table(REPAIR_HEADER, _repair_rows(paper.get("models", []))) + "\n",
        _table(SUMMARY_HEADER, _summary_rows(paper.get("summary", {}))),
    ]


def alpha_ablation(args, model: str, seed: int, base: Path) -> list[dict[str, Any]]:
    """Alpha 0, 0.1 and 10 at the default length and a longer one: does alpha 0 collapse?"""
    out = []
    for steps in (args.steps, args.alpha_long_steps):
        for alpha in args.alpha:
            tag = f"alpha{alpha:g}-steps{steps}"
            # alpha 0.1 at the default length is the main part's search (same directory, so
            # its saved result is reused when the main part ran in this workdir)
            betas = args.alpha_betas
            default = math.isclose(alpha, 0.1) and steps == args.steps and betas == args.betas
            if betas != args.betas:
                tag += "-betas" + "_".join(f"{b:g}" for b in betas)
            log(f"alpha ablation: alpha {alpha:g}, {steps} steps, betas {betas}")
            result = run_search(
                args,
                model,
                seed,
                base / ("search" if default else tag),
                alpha=alpha,
                steps=steps,
                betas=betas,
            )
            search_dir, summary = str(result.artifact), search_summary(result, betas)
            # the ensemble's repair at the headline rate, without the residual search
            plan = repair_plan(args, [args.headline_rate], ["mesa"], residual_methods=())
            (repair,) = bar.repairs(plan, seed, repair_settings(args))
            repaired = run_repair(args, repair, model, search_dir, [], base / f"{tag}-repair")
            out.append(
                {
                    "alpha": alpha,
                    "steps": steps,
                    "betas": betas,
                    "search": summary,
                    "repair_asr": repaired.metrics.get("eval/asr"),
                    "repair_acc_clean": repaired.metrics.get("eval/acc_clean"),
                }
            )
    return out


def paper_recipe(args, root: Path) -> dict[str, Any]:
    """Fine-tune a clean quick model 10 epochs at lr 1e-3 (``--paper-lr``) with 1 % poisoning
    (weaker, broader backdoors); repair by MESA (ensemble) and point (each restart) at the
    headline rate."""
    rows = []
    clean_by_seed: dict[int, str] = {}
    for seed in range(args.paper_seeds):
        log(f"paper recipe: clean cpu-quick model, seed {seed}")
        clean = train_model(args, None, seed, root / f"clean-s{seed}", epochs=args.clean_epochs)
        clean_by_seed[seed] = str(clean.artifact)
    for trigger in args.triggers:
        for seed in range(args.paper_seeds):
            tag = f"{trigger.replace(':', '')}-s{seed}"
            if args.paper_lr != 1e-3:
                tag += f"-lr{args.paper_lr:g}"
            log(f"paper recipe {tag}: fine-tuning with 1 % poisoning at lr {args.paper_lr:g}")
            attacked = train_model(
                args,
                trigger,
                seed,
                root / tag / "model",
                preset="paper-cifar10",
                init_from=clean_by_seed[seed],
                epochs=args.paper_epochs,
                lr=args.paper_lr,
                poison_rate=0.01,
            )
            model = str(attacked.artifact)
            search = run_search(args, model, seed, root / tag / "search")
            repairs = repair_all(
                args,
                model,
                str(search.artifact),
                seed,
                root / tag,
                [args.headline_rate],
                ["mesa", "point"],
            )
            for row in repairs:
                row.update({"trigger": trigger, "seed": seed})
            rows.append(
                {
                    "trigger": trigger,
                    "seed": seed,
                    "attack": {
                        "acc_clean": attacked.metrics.get("eval/acc_clean"),
                        "asr": attacked.metrics.get("eval/asr"),
                    },
                    "search": search_summary(search, args.betas),
                    "repairs": repairs,
                }
            )
    flat = [r for entry in rows for r in entry["repairs"]]
    return {"models": rows, "summary": summarise(flat, args.headline_rate)}


if __name__ == "__main__":
    main()
