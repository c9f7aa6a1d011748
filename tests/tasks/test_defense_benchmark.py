"""benchmarks/defense.py's bookkeeping: parts, reused models and saved task results.

The benchmark runs for hours, so it must survive being split over sittings: a rerun in the same
--workdir reuses every finished task (only when the spec is the same), and --models reuses
backdoored models trained elsewhere. The end-to-end run is the slow --quick test in
test_defend.py; these tests check the bookkeeping without training anything.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from engine.specs import build_spec

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "defense.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("defense_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_seed_defaults_to_zero(bench):
    assert bench.parse_args([]).first_seed == 0
    assert bench.parse_args(["--first-seed", "1", "--seeds", "2"]).first_seed == 1


def test_parts_and_skip_flags(bench):
    args = bench.parse_args(["--skip-paper"])
    assert args.parts == ["main", "alpha"]
    args = bench.parse_args(["--parts", "alpha"])
    assert args.parts == ["alpha"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--parts", "main,beta"], "unknown parts ['beta']"),
        (["--models", "bw:170"], "give TRIGGER=ARTIFACT_DIR"),
        (["--first-seed", "-1"], "--first-seed -1"),
        (["--models", "bw:170=/nonexistent/model"], "'bw:170=/nonexistent/model'"),
    ],
)
def test_bad_options_exit_2_naming_the_value(bench, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def _model_dir(tmp_path: Path, trigger: str, seed: int) -> Path:
    d = tmp_path / f"model-{trigger.replace(':', '')}-{seed}"
    d.mkdir()
    manifest = {
        "kind": "model",
        "spec": {"trigger": trigger, "seed": seed},
        "metrics": {"eval/acc_clean": 0.84, "eval/asr": 0.99},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_reused_model_matches_trigger_and_seed(bench, tmp_path):
    model = _model_dir(tmp_path, "bw:170", 0)
    args = bench.parse_args(["--models", f"bw:170={model}"])
    reused = bench.reused_model(args, "bw:170", 0)
    assert reused.artifact == str(model)
    assert reused.metrics["eval/asr"] == 0.99 and reused.extra["reused"]
    assert bench.reused_model(args, "bw:170", 1) is None  # other seeds are trained
    assert bench.reused_model(args, "bw:0", 0) is None
    args.models["bw:0"] = str(model)
    with pytest.raises(SystemExit, match="that model's trigger is bw:170"):
        bench.reused_model(args, "bw:0", 0)


def test_a_finished_task_is_reused_only_for_the_same_spec(bench, tmp_path, monkeypatch):
    calls = []

    def run(spec, reporter):
        calls.append(spec.steps)
        out = reporter.workdir / "artifact"
        out.mkdir(exist_ok=True)
        return bench.TaskResult(str(out), {"mesa/steps": float(spec.steps)}, {})

    monkeypatch.setitem(sys.modules, "engine.tasks.fakemesa", types.SimpleNamespace(run=run))
    spec = build_spec("mesa", overrides={"model": "m", "target": 0, "steps": 10})
    first = bench.run_task("fakemesa", spec, tmp_path / "w")
    again = bench.run_task("fakemesa", spec, tmp_path / "w")
    assert calls == [10]
    assert again.metrics == first.metrics and again.artifact == first.artifact
    assert again.extra["wall_s"] == first.extra["wall_s"]  # the time measured then

    longer = build_spec("mesa", overrides={"model": "m", "target": 0, "steps": 20})
    bench.run_task("fakemesa", longer, tmp_path / "w")
    assert calls == [10, 20]

    # a saved result whose artifact has gone is run again, not trusted
    import shutil

    shutil.rmtree(tmp_path / "w" / "artifact")
    bench.run_task("fakemesa", longer, tmp_path / "w")
    assert calls == [10, 20, 20]


def test_only_the_asked_parts_run_and_a_given_model_is_not_trained_again(
    bench, tmp_path, monkeypatch, capsys
):
    trained, ablated = [], []
    monkeypatch.setattr(bench, "ensure_dataset", lambda name: None)
    monkeypatch.setattr(bench, "train_model", lambda *a, **k: trained.append(a[1]))
    monkeypatch.setattr(bench, "paper_recipe", lambda args, root: {"summary": {}})
    monkeypatch.setattr(bench, "alpha_ablation", lambda args, *m: ablated.append(m) or [])

    report = bench.main(["--parts", "paper", "--workdir", str(tmp_path / "w")])
    assert trained == [] and ablated == []
    assert "paper_recipe" in report and "summary" not in report and "alpha_ablation" not in report

    model = _model_dir(tmp_path, "bw:170", 0)
    argv = ["--parts", "alpha", "--triggers", "bw:170", "--seeds", "1"]
    report = bench.main([*argv, "--models", f"bw:170={model}", "--workdir", str(tmp_path / "w")])
    assert trained == []
    assert ablated == [(str(model), 0, tmp_path / "w" / "bw170-s0")]
    assert "alpha_ablation" in report and "paper_recipe" not in report
    capsys.readouterr()


def _report(
    tmp_path: Path,
    name: str,
    trigger: str,
    mesa_asr: float,
    validity: float,
    artifact: str = "m",
    rate: float = 0.1,
) -> str:
    def row(method: str, asr: float) -> dict:
        return {
            "method": method,
            "rate": rate,
            "acc_clean": 0.83,
            "asr": asr,
            "ra": 0.8,
            "before_acc_clean": 0.84,
            "variations": {"asr_noise": asr + 0.01},
            "residual_validity": 0.0,
            "residual_own_asr": asr - 0.01,
            "wall_s": 10.0,
        }

    report = {
        "benchmark": "defense",
        "machine": {"processor": "cpu-" + name, "torch": "x"},
        "models": [
            {
                "trigger": trigger,
                "seed": 0,
                "attack": {"acc_clean": 0.84, "asr": 0.99, "artifact": artifact},
                "search": {"wall_s": 1.0, "beta=0.9": {"validity": validity}},
                "repairs": [row("mesa", mesa_asr), row("point#0", 0.03), row("point#1", 0.2)],
            }
        ],
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_merge_recomputes_the_summary_and_bar_over_every_report(bench, tmp_path, capsys):
    a = _report(tmp_path, "a", "bw:170", mesa_asr=0.02, validity=0.95)
    b = _report(tmp_path, "b", "bw:0", mesa_asr=0.12, validity=0.7)
    out = tmp_path / "merged.json"
    report = bench.main(["--merge", f"{a},{b}", "--out", str(out)])
    mesa = report["summary"]["methods"]["mesa"]
    assert mesa["n"] == 2 and mesa["asr_mean"] == pytest.approx(0.07)
    assert mesa["asr_worst"] == pytest.approx(0.12)
    assert report["summary"]["methods"]["point"]["n"] == 4  # restarts pooled over both models
    assert report["bar"]["search_validity_min"] == pytest.approx(0.7)
    assert report["bar"]["search_validity_ok"] is False
    assert report["bar"]["mesa_asr_worst_ok"] is False
    assert [m["source"] for m in report["models"]] == [a, b]
    assert json.loads(out.read_text())["summary"]["methods"]["mesa"]["n"] == 2
    tables = capsys.readouterr().err
    assert "cpu-a" in tables and "cpu-b" in tables
    # every repair: ... ASR, robust acc, worst variation, residual validity, residual own ASR, s
    assert (
        "| bw:0 | 0 | mesa | 0.1 | 83.0 % | 12.0 % | 80.0 % | 13.0 % | 0.0 % | 11.0 % | 10 |"
        in (tables)
    )


def test_merge_joins_runs_of_one_model_and_refuses_two_models_under_one_key(
    bench, tmp_path, capsys
):
    a = _report(tmp_path, "a", "bw:170", mesa_asr=0.02, validity=0.95)
    more = _report(tmp_path, "more", "bw:170", mesa_asr=0.3, validity=0.95, rate=0.01)
    report = bench.main(["--merge", f"{a},{more},{a}"])
    (model,) = report["models"]
    assert sorted({r["rate"] for r in model["repairs"]}) == [0.01, 0.1]
    assert len(model["repairs"]) == 6  # the repeated report adds nothing twice
    assert report["summary_by_rate"]["0.01"]["mesa"]["asr_mean"] == pytest.approx(0.3)
    assert report["summary"]["methods"]["mesa"]["asr_mean"] == pytest.approx(0.02)
    tables = capsys.readouterr().err
    # the rates side by side: mesa at 0.01 then at 0.1, mean / worst (repairs)
    assert "| method | rate 0.01 | rate 0.1 |" in tables
    assert "| mesa | 30.0 % / 30.0 % (1) | 2.0 % / 2.0 % (1) |" in tables
    other = _report(tmp_path, "other", "bw:170", mesa_asr=0.1, validity=0.9, artifact="m2")
    for argv, needle in (
        ([f"{a},{other}"], "hold different models for trigger bw:170 seed 0"),
        ([str(tmp_path / "missing.json")], "not a readable JSON report"),
    ):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--merge", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_every_rate_repairs_with_the_reversal_of_the_headline_rate(bench, tmp_path, monkeypatch):
    """A later sitting that adds rates reuses the headline runs instead of redoing them."""
    calls = []

    def run_task(kind, spec, workdir):
        calls.append((spec.method, spec.stamp_rate, spec.reversal_from))
        metrics = {"eval/acc_clean": 0.8, "eval/asr": 0.1, "eval/ra": 0.7}
        return bench.TaskResult(f"{workdir}", metrics, {"wall_s": 1.0})

    monkeypatch.setattr(bench, "run_task", run_task)
    monkeypatch.setattr(bench, "log", lambda message: None)
    args = bench.parse_args(["--point-restarts", "2"])
    bench.repair_all(args, "m", "s", 0, tmp_path, [0.01, 0.1, 0.2], ["point", "neural-cleanse"])
    first = str(tmp_path / "defend-point#0-0.1")
    nc = str(tmp_path / "defend-neural-cleanse-0.1")
    assert calls[:3] == [("point", 0.1, None), ("point", 0.1, first), ("neural-cleanse", 0.1, None)]
    later = [c for c in calls if c[1] != 0.1]
    assert [c[1] for c in later] == [0.01] * 3 + [0.2] * 3
    assert all(c[2] == (first if c[0] == "point" else nc) for c in later)


def test_paper_recipe_tables_show_how_broad_each_backdoor_is(bench):
    search = {
        "wall_s": 1.0,
        "beta=0.9": {"validity": 0.5, "bw_distinct": 17, "nearest_to_true": 1.86},
        "beta=0.5": {"validity": 0.9, "bw_distinct": 26, "nearest_to_true": 0.4},
    }
    model = {"trigger": "bw:0", "seed": 0, "attack": {"acc_clean": 0.825, "asr": 0.838}}
    report = {"paper_recipe": {"models": [{**model, "search": search, "repairs": []}]}}
    tables = bench.markdown(report)
    assert "| bw:0 | 0 | 82.5 % | 83.8 % | 50.0 % / 90.0 % | 17 / 26 | 0.40 |" in tables


def test_models_are_trained_with_the_recipe_of_the_committed_results(bench, monkeypatch, tmp_path):
    """The cpu-quick preset moved on (batch 512, crop epochs); the benchmark keeps its recipe."""
    specs = []
    monkeypatch.setattr(bench, "run_task", lambda kind, spec, workdir: specs.append(spec))
    args = bench.parse_args([])
    bench.train_model(args, "bw:170", 1, tmp_path)
    bench.train_model(bench.parse_args(["--train-epochs", "3"]), None, 0, tmp_path)
    bench.train_model(args, "bw:0", 0, tmp_path, preset="paper-cifar10", init_from="m", epochs=4)
    first, clean, paper = specs
    assert (first.arch, first.batch_size, first.lr, first.crop_epochs) == ("small", 256, 0.2, 0)
    assert first.epochs == 10 and first.trigger == "bw:170" and first.seed == 1
    assert (first.crop_padding, first.padding_mode, first.whiten_stem) == (4, "zeros", False)
    assert clean.epochs == 3 and clean.poison_rate == 0.0 and clean.arch == "small"
    quick = build_spec("train", preset="cpu-quick")
    assert (quick.batch_size, quick.crop_epochs) != (256, 0)  # why the pin exists
    assert (quick.crop_padding, quick.padding_mode) != (4, "zeros") and quick.whiten_stem
    # other presets keep their own recipe
    assert paper.lr == 1e-3 and paper.epochs == 4 and paper.init_from == "m"
