"""The paper-figure study's report from its result folder: the numbers are those of
``stats.summarize`` on the records, the figure has one column per implanted trigger, a trigger that
was not implanted is listed and left out, and a record of an unknown schema is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.report import build_report, figures, paper, stats

N = 40  # held-out non-target images per trigger


def bits(hits: int, n: int = N) -> str:
    return "1" * hits + "0" * (n - hits)


def entry(hits: int) -> dict:
    return {"asr": hits / N, "asr_outcomes": bits(hits), "clean_outcomes": bits(30, 50)}


def record(trigger: str, attack: int, mesa: int, point: tuple[int, int, int], wall=60.0) -> dict:
    return {
        "schema": 1,
        "trigger": trigger,
        "target": 0,
        "rate": 0.01,
        "floor": {"asr": 0.0, "asr_outcomes": bits(0)},
        "attack": {"held_out_asr": attack / N, "asr_outcomes": bits(attack)},
        "repairs": {
            "mesa": entry(mesa),
            "point": {"restarts": [entry(h) for h in point]},
            "ideal": entry(1),
            "finetune": entry(attack),
        },
        "runs": [
            {
                "machine": {"cpu": "Test CPU", "precision": "fp32", "threads": 1},
                "seconds": {"wall": wall},
            }
        ],
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "results"
    (root / "rate-0.01").mkdir(parents=True)
    records = [
        record("bw:0", 40, 2, (4, 6, 8)),
        record("bw:85", 39, 3, (20, 10, 12)),
        record("bw:170", 38, 1, (2, 2, 3)),
        record("bw:7", 10, 0, (0, 0, 0)),  # not implanted: 25 % before repair
    ]
    for r in records:
        (root / "rate-0.01" / f"{r['trigger'].replace(':', '-')}.json").write_text(json.dumps(r))
    (root / "rate.json").write_text(json.dumps({"rate": 0.01}))
    return root


def test_the_summary_is_summarize_on_the_records_and_drops_the_unimplanted(folder):
    data = paper.summary(folder)
    records = paper.load_records(folder)[0.01]
    expected = stats.summarize(records, ["mesa", "point", "ideal", "finetune"])
    entry = data["rates"]["0.01"]
    assert entry["methods"] == expected["methods"]
    assert entry["not_implanted"]["triggers"] == ["bw:7"]
    assert entry["methods"]["mesa"]["n"] == 3
    assert entry["methods"]["mesa"]["asr_mean"]["mean"] == pytest.approx(6 / 3 / N)
    assert entry["methods"]["point"]["worst"]["trigger"] == "bw:85"
    assert entry["before"]["mean"] == pytest.approx((40 + 39 + 38) / 3 / N)
    assert entry["cost"] == {"per_trigger_s": 60.0, "total_s": 240.0, "machines": [
        "Test CPU (fp32, 1 thread(s))"]}  # fmt: skip
    assert data["main_rate"] == 0.01 and data["paper"]["point"]["worst"] == 0.514


def test_the_report_has_the_table_beside_the_paper_and_the_figure_with_intervals(folder, tmp_path):
    result = build_report(None, str(folder), tmp_path / "out")
    text = Path(result.report).read_text()
    assert "| mesa | 3 | 5.0 % [" in text and "3.6 % / 8.2 %" in text
    assert "(restart 50.0 %)" in text  # point's worst single restart, beside its worst mean
    assert "not implanted (attack ASR under 50 %, left out of every mean): 1 (bw:7)" in text
    (figure,) = result.figures
    assert result.sizes[figure] == figures.trigger_figure_size(3)
    rows = list(csv.DictReader(open(Path(result.report).parent / "tables/triggers-rate-0.01.csv")))
    assert [r["trigger"] for r in rows] == ["bw:0", "bw:170", "bw:7", "bw:85"]
    assert float(rows[0]["mesa_minus_point"]) == pytest.approx((2 - 6) / N)


def test_a_method_run_on_a_subset_gets_its_own_figure_and_stays_out_of_the_paper_s(
    folder, tmp_path, monkeypatch
):
    """A method on some triggers only (the subset's defenses) is drawn in a second figure over
    those triggers with every method, never as a line joining far-apart triggers in the first."""
    path = folder / "rate-0.01" / "bw-85.json"
    record = json.loads(path.read_text())
    record["repairs"]["anp"] = entry(5)
    path.write_text(json.dumps(record))
    drawn = {}

    def asr_by_trigger(path, triggers, patterns, lines, sorted_by, title, **options):
        drawn[Path(path).name] = (list(triggers), list(lines), options["colors"])
        return figures.trigger_figure_size(len(triggers))

    monkeypatch.setattr(figures, "asr_by_trigger", asr_by_trigger)
    build_report(None, str(folder), tmp_path / "out")
    full, subset = (
        drawn["asr-by-trigger-rate-0.01.png"],
        drawn["asr-by-trigger-rate-0.01-subset.png"],
    )
    assert full[1] == ["mesa", "point", "ideal", "finetune"] and len(full[0]) == 3
    assert subset[:2] == (["bw:85"], ["mesa", "point", "ideal", "finetune", "anp"])
    assert full[2]["point"] == subset[2]["point"]  # a method keeps its colour


def test_methods_added_on_a_re_attacked_model_that_scores_differently_are_named(folder, tmp_path):
    path = folder / "rate-0.01" / "bw-85.json"
    r = json.loads(path.read_text())
    r["runs"][0]["same_model"] = None  # the first run: nothing to compare with
    r["runs"].append({**r["runs"][0], "methods": ["anp", "clp"], "same_model": False})
    path.write_text(json.dumps(r))
    assert paper.summary(folder)["rates"]["0.01"]["re_attacked"] == {"bw:85": ["anp", "clp"]}
    text = Path(build_report(None, str(folder), tmp_path / "out").report).read_text()
    assert "re-attacked model that scored the held-out images differently" in text
    assert "bw:85: anp, clp" in text


def test_a_record_of_another_schema_or_broken_json_is_refused_in_one_line(folder, tmp_path):
    path = folder / "rate-0.01" / "bw-0.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 99}))
    with pytest.raises(UserError, match=r"bw-0.json has schema 99; this version reads \(1,\)"):
        paper.summary(folder)
    path.write_text("{")
    with pytest.raises(UserError, match="is not valid JSON"):
        build_report(None, str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_committed_study_records_pass_the_check():
    """The check refuses what the summary cannot read, never the records the study wrote."""
    committed = Path(__file__).parents[2] / "docs" / "results" / "paper-small"
    by_rate, main = paper.read_folder(committed)
    assert main in by_rate and all(len(records) > 1 for records in by_rate.values())


def test_study_show_reads_a_result_folder(folder):
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    shown = CliRunner().invoke(app, ["study", "show", str(folder), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == json.loads(json.dumps(paper.summary(folder)))
    table = CliRunner().invoke(app, ["study", "show", str(folder)])
    assert "stamping rate 0.01 (main)" in table.output
    (mesa,) = [line.split() for line in table.output.splitlines() if line.startswith("mesa ")]
    # n, mean, its interval, the worst and where, none above 10 %, 30 of 50 clean, the paper's
    assert mesa[1:4] == ["3", "5.0", "%"] and mesa[6:9] == ["7.5", "%", "bw:85"]
    assert mesa[9:] == ["0", "60.0", "%", "3.6", "/", "8.2", "%"]
    # MESA against point over the triggers: the second table's row, from the summary's test
    test = paper.summary(folder)["rates"]["0.01"]["wilcoxon"]["point"]
    versus = [line.split() for line in table.output.splitlines() if line.startswith("point ")][-1]
    assert (
        versus[1:4] == [str(test["n"]), str(test["lower"]), str(test["higher"])] == ["3", "2", "0"]
    )
    assert versus[-1] == f"{test['p']:.2g}"


def gpu_result(tmp_path: Path, records: list[dict]) -> Path:
    """The shape benchmarks/gpu_bench.py writes (format 2), with its pilot's records."""
    for r in records:
        r["runs"][0]["machine"] |= {"gpu": "NVIDIA H100 80GB HBM3", "precision": "bf16"}
    data = {
        "benchmark": "gpu",
        "format": 2,
        "tiny": False,
        "environment": {"torch": "2.11.0", "cuda": "13.0", "device_name": "NVIDIA H100 80GB HBM3"},
        "history": [{"stage": "epoch", "status": "running", "at_s": 0.1}],
        "stages": {"epoch": "done", "clean": "done", "paper": "done", "mesa_speed": "done"},
        "resnet18_epoch_s_bs512": 4.1,
        "clean_cifar10": {"acc_clean": 0.9412, "acc_clean_by_epoch": [0.5, 0.9412]},
        "utilisation": {"clean": {"gpus": [{"index": "0", "util_mean_pct": 96.5}]}},
        "paper_resnet18": {
            "pilot": True,
            "protocol": {"attack": {"lr": 1e-3}},
            "finished": [r["trigger"] for r in records],
            "unfinished": [{"trigger": "bw:85", "stopped_in": "search", "finished": ["attack"]}],
            "not_started": ["bw:1", "bw:2"],
            "stopped": "budget spent in the middle of bw:85's search",
            "records": records,
        },
    }
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    return path


def test_the_gpu_pilot_is_reported_beside_the_cpu_study_with_its_device(folder, tmp_path):
    records = [record("bw:0", 40, 1, (3, 5, 7), wall=80.0), record("bw:170", 39, 0, (2, 2, 2))]
    path = gpu_result(tmp_path, records)
    result = build_report(None, str(folder), tmp_path / "out", gpu_results=[path])
    text = Path(result.report).read_text()
    assert "## Stamping rate 0.01 (main)" in text  # the CPU study comes first, as before
    assert "## ResNet-18 on NVIDIA H100 80GB HBM3: a pilot of the same protocol" in text
    assert "2 trigger(s) finished: bw:0, bw:170. A pilot, not the study" in text
    assert "Unfinished: bw:85 (stopped in search). Not started: 2. Stopped: budget spent" in text
    assert "on NVIDIA H100 80GB HBM3 (bf16, 1 thread(s))" in text
    assert "| mesa | 2 | 1.2 % [" in text  # (1 + 0) / 2 / 40 held-out images
    tables = Path(result.report).parent / "tables"
    rows = list(csv.DictReader(open(tables / "gpu-triggers-rate-0.01.csv")))
    assert [r["trigger"] for r in rows] == ["bw:0", "bw:170"]
    assert (tables / "gpu-summary-rate-0.01.csv").exists()
    figures = (tables / "gpu_results.csv").read_text()
    assert "NVIDIA H100 80GB HBM3,gpu.json,clean_cifar10.acc_clean,0.9412" in figures
    assert "utilisation.clean.gpus.0.util_mean_pct,96.5" in figures
    assert "paper_resnet18.triggers_finished,2" in figures
    assert "asr_outcomes" not in figures and "history" not in figures


def test_a_gpu_pilot_record_of_another_schema_is_refused(folder, tmp_path):
    bad = record("bw:0", 40, 1, (3, 5, 7))
    bad["schema"] = 7
    path = gpu_result(tmp_path, [bad])
    with pytest.raises(UserError, match="the record of bw:0 has schema 7"):
        build_report(None, str(folder), tmp_path / "out", gpu_results=[path])
    assert not (tmp_path / "out").exists()


def test_the_report_of_a_result_folder_never_opens_the_store(folder, tmp_path, monkeypatch):
    """A result folder is files only: a store that cannot be opened (here not a database at all,
    as an old schema would also refuse) does not stop its report."""
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    broken = tmp_path / "not-a-store.db"
    broken.write_text("not SQLite")
    monkeypatch.setenv("MESA_TUI_DB", f"sqlite:///{broken}")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists() and broken.read_text() == "not SQLite"
    job = CliRunner().invoke(app, ["report", "1", "--out", str(tmp_path / "job")])
    assert job.exit_code == 2  # a job id still needs the store, and says so in one line


@pytest.mark.parametrize(
    "args",
    [
        ["--results", "{missing}"],  # no such folder
        ["--results", "{empty}"],  # a folder without results
        ["--results", "{folder}", "study", "list"],  # an app option given to a command
    ],
)
def test_a_results_folder_the_app_cannot_show_is_refused_in_one_line(args, folder, tmp_path):
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "folder": folder}
    result = CliRunner().invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "--results" in result.stderr


def test_study_show_of_a_folder_without_results_names_the_folder_not_a_study(tmp_path):
    """A folder meant as a result folder gets the folder's line, not "study ... does not exist"."""
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["study", "show", str(tmp_path / "empty")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: study show: '{tmp_path / 'empty'}' holds no rate-*/bw-*.json results; give a "
        "folder that benchmarks/paper_study.py wrote, e.g. docs/results/paper-small"
    ]
    named = CliRunner().invoke(app, ["study", "show", "no-such-study"])
    assert named.exit_code == 2 and "study 'no-such-study' does not exist" in named.stderr
    report = CliRunner().invoke(
        app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    )
    assert report.exit_code == 2 and "report: '" in report.stderr and "holds no" in report.stderr
    assert not (tmp_path / "r").exists()


def test_one_rates_folder_given_for_the_study_points_to_the_folder_above(folder, tmp_path):
    from typer.testing import CliRunner

    from mesa_tui.cli import app

    rate = folder / "rate-0.01"
    for args in (["study", "show", str(rate)], ["report", str(rate), "--out", str(tmp_path / "r")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().endswith(
            f"'{rate}' is one rate's folder; give the folder above it, {folder}"
        )
