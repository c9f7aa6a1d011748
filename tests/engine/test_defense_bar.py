"""The defense-bar study template queues exactly the tasks of benchmarks/defense.py's main part.

The driver runs here with its tasks replaced by a recorder (nothing trains): each task's spec and
the artifact path it would leave. The template's jobs, in the same order, must have the same kind
and, once each ``job:#i`` reference is replaced by the path task i left, the same spec, field for
field (the references are then the driver's dependencies: model, search, reversal_from).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine import defense_bar as bar
from engine import specs
from engine.catalog import DatasetInfo
from engine.errors import UserError
from engine.pipelines import build_study, dedupe, reference_hash

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "defense.py"
NINE_MODELS = "mesa,ideal,point,finetune,random-patch,neural-cleanse"
SUBSET = "--triggers bw:0 --first-seed 1 --seeds 2 --methods point,mesa:0.8 --rates 0.2,0.1"
SUBSET_ARGV = [*SUBSET.split(" "), "--residual-rates", "0.2", "--steps", "50"]
# defense.py --quick's sizes as the template's settings (the reproduction check uses them too).
QUICK = {
    "rates": "0.1",
    "residual_methods": "mesa",
    "train_dataset": "cifar10-quick",
    "train_epochs": "1",
    "mesa_steps": "8",
    "mesa_batch_size": "32",
    "mesa_hidden": "16",
    "mesa_sample_every": "4",
    "mesa_n_eval_triggers": "8",
    "mesa_eval_images": "16",
    "mesa_samples": "32",
    "defend_epochs": "1",
    "point_restarts": "2",
    "point_epochs": "1",
    "nc_epochs": "2",
    "nc_steps_per_epoch": "2",
    "residual_steps": "2",
    "residual_hidden": "16",
    "residual_batch_size": "32",
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("defense_bench_bar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def driver_tasks(bench, monkeypatch, tmp_path, argv: list[str]) -> list[tuple[str, dict, str]]:
    """(kind, spec, artifact) of every task the driver's main part runs, in its order."""
    tasks: list[tuple[str, dict, str]] = []

    def run_task(kind, spec, workdir):
        artifact = f"/artifacts/{Path(workdir).relative_to(tmp_path)}"
        tasks.append((kind, spec.to_json(), artifact))
        metrics = {"eval/acc_clean": 0.8, "eval/asr": 0.1, "eval/ra": 0.7, "before/acc_clean": 0.8}
        return bench.TaskResult(artifact, metrics, {"wall_s": 1.0})

    monkeypatch.setattr(bench, "run_task", run_task)
    monkeypatch.setattr(bench, "residual_reference", lambda *args: {})
    monkeypatch.setattr(bench, "log", lambda message: None)
    args = bench.parse_args([*argv, "--parts", "main"])
    bench._main_part(args, tmp_path, {"models": []})
    return tasks


def assert_same_tasks(jobs, tasks) -> None:
    assert [j.kind for j in jobs] == [kind for kind, _, _ in tasks]
    paths = {f"job:#{i}": artifact for i, (_, _, artifact) in enumerate(tasks)}
    for i, (job, (_, spec, _)) in enumerate(zip(jobs, tasks, strict=True)):
        refs = {k: v for k, v in job.spec.items() if isinstance(v, str) and v.startswith("job:#")}
        assert {k: paths[v] for k, v in refs.items()} == {k: spec[k] for k in refs}, job.label
        assert {**job.spec, **{k: paths[v] for k, v in refs.items()}} == spec, job.label
        assert sorted(job.depends_on) == sorted((v[4:], k) for k, v in refs.items())
        assert all(int(ref[1:]) < i for ref, _ in job.depends_on)  # upstream comes first
        assert job.spec_hash == reference_hash(job.spec)


@pytest.mark.parametrize(
    ("argv", "seeds", "overrides", "triggers"),
    [
        pytest.param([], [0, 1, 2], {}, None, id="defaults"),
        pytest.param(
            ["--rates", "0.1", "--methods", NINE_MODELS, "--nc-epochs", "30"],
            [0, 1, 2],
            {"rates": "0.1", "methods": NINE_MODELS, "nc_epochs": "30"},
            None,
            id="nine-models",
        ),
        pytest.param(
            SUBSET_ARGV,
            [1, 2],
            dict(methods="point,mesa-0.8", rates="0.2,0.1", residual_rates="0.2", mesa_steps="50"),
            ["bw:0"],
            id="subset",
        ),
        pytest.param(["--quick"], [0], QUICK, ["bw:170"], id="quick"),
    ],
)
def test_the_template_queues_the_drivers_tasks(
    bench, monkeypatch, tmp_path, argv, seeds, overrides, triggers
):
    tasks = driver_tasks(bench, monkeypatch, tmp_path, argv)
    real_info = specs.dataset_info
    # The driver derives cifar10-quick (a CIFAR-10 slice) before it queues; a user imports it first.
    monkeypatch.setattr(
        specs,
        "dataset_info",
        lambda name: (
            DatasetInfo(name, 10, 3, (32, 32)) if name == bench.QUICK_DATASET else real_info(name)
        ),
    )
    params, jobs = build_study("defense-bar", seeds, overrides, None, triggers)
    assert_same_tasks(jobs, tasks)
    assert len(dedupe(jobs)) == len(jobs)
    assert params["target_mode"] == "oracle" and params["seeds"] == seeds
    assert {j.role for j in jobs} == {"train", "mesa", "defend"}


def test_the_recipe_pins_the_committed_models_and_the_papers_places(bench, monkeypatch, tmp_path):
    """The defaults are the committed results' (the cpu-quick preset moved on since)."""
    _, jobs = build_study("defense-bar", [0, 1, 2], {})
    attacks = [j for j in jobs if j.kind == "train"]
    assert [(j.trigger, j.seed) for j in attacks] == [
        (t, s) for t in ("bw:170", "bw:0", "bw:85") for s in (0, 1, 2)
    ]
    first = attacks[0].spec
    assert (first["batch_size"], first["lr"], first["crop_epochs"], first["epochs"]) == (
        256,
        0.2,
        0,
        10,
    )
    assert first["poison_rate"] == 0.1 and first["arch"] == "small"
    searches = [j.spec for j in jobs if j.kind == "mesa"]
    assert {(s["placement"], s["steps"], tuple(s["betas"])) for s in searches} == {
        ("per-image", 620, (0.9, 0.8, 0.5))
    }
    repairs = [j for j in jobs if j.kind == "defend"]
    assert len(repairs) == 9 * 3 * (len(bar.METHODS) + 2)  # point: 3 restarts
    point = [j for j in repairs if j.spec["method"] == "point" and j.trigger == "bw:170"]
    assert [j.spec.get("reversal_from") is None for j in point[:3]] == [True, False, False]
    first_point = f"job:#{2 + bar.METHODS.index('point')}"  # after the attack and the search
    assert {j.spec["reversal_from"] for j in point[1:] if j.seed == 0} == {first_point}


def test_rates_are_kept_apart_in_the_table_and_bad_plans_are_one_line():
    given = {"rates": "0.01,0.1", "methods": "mesa"}
    params, jobs = build_study("defense-bar", [0], given, None, ["bw:0"])
    assert params["methods"] == ["mesa", "mesa @0.01"]
    assert [j.method for j in jobs if j.kind == "defend"] == ["mesa", "mesa @0.01"]
    cases = [
        ({"rates": "x"}, None, "invalid --rates 'x'"),
        ({"rates": "2"}, None, "invalid --rates 2: give stamping rates in"),
        ({"rates": "0.1,0.10"}, None, "0.1 is named twice"),
        ({"methods": "point,point"}, None, "point is named twice"),
        ({"methods": "mesa,mesa-0.9,mesa-.9"}, None, "mesa-.9 is the same repair as mesa-0.9"),
        ({"headline_rate": "5"}, None, "invalid --headline-rate 5"),
        ({"rates": "0.1", "headline_rate": "0.01"}, None, "0.01: not among --rates 0.1"),
        ({"rates": "0.01,0.2"}, None, "--headline-rate 0.1: not among --rates 0.01,0.2"),
        ({"residual_rates": "7"}, None, "invalid --residual-rates 7"),
        ({"residual_rates": "0.3"}, None, "0.3 is not among --rates 0.01,0.1,0.2"),
        ({"residual_methods": "anpp"}, None, "invalid --residual-methods anpp"),
        ({"mesa_betas": "0.5,0.7"}, None, "beta 0.9 is not among the search's betas 0.5,0.7"),
        ({"residual_methods": ","}, None, "invalid --residual-methods ',': give e.g. mesa,point"),
        ({"methods": "anp"}, None, "invalid methods anp"),
        ({"headline_rate": "0.1,0.2"}, None, "invalid --headline-rate"),
        ({"bogus": "1"}, None, "unknown setting 'bogus'"),
        ({}, "auto", "runs with --target oracle only"),
    ]
    for overrides, target, message in cases:
        with pytest.raises(UserError, match=message):
            build_study("defense-bar", [0], overrides, target)
