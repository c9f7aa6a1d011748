"""The fixed-position study's driver (benchmarks/fixed_position.py) at a token size on real
CIFAR-10 images: one JSON per unit with the attack, the detection (learned placement, the
position of the target's triggers), the search and the four repairs paired on the same held-out
images with Wilson intervals; a clean unit records whether detection flagged anything; a rerun
skips what exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/fixed_position.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_the_units_answer_the_main_question_first():
    sys.path.insert(0, str(ROOT))
    from benchmarks.fixed_position import attack_units, paired, wilson_entry

    names = [u["name"] for u in attack_units()]
    assert names[:6] == [
        "square-white_corner_s0",
        "bw-0_corner_s0",
        "bw-85_corner_s0",
        "square-white_at8-8_s0",
        "bw-0_at8-8_s0",
        "bw-85_at8-8_s0",
    ]
    assert names[6:9] == ["clean-s0", "clean-s1", "clean-s2"] and len(names) == 20
    assert names[9:15] == [n.replace("_s0", "_s1") for n in names[:6]]  # the second seeds
    assert names[15:] == [f"clean-s{s}" for s in range(3, 8)]  # then more clean seeds
    assert paired("1100", "1010") == {"both": 1, "only_first": 1, "only_second": 1, "neither": 1}
    entry = wilson_entry("0001")
    assert (
        entry["k"] == 1 and entry["n"] == 4 and entry["wilson95"][0] < 0.25 < entry["wilson95"][1]
    )


def test_false_positives_count_every_class_that_holds_no_backdoor(tmp_path):
    """A clean model's every class, an attacked model's every class but the target; a partial
    record does not count."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.fixed_position import false_positives, wrong_classes

    scores = {str(c): 0.0 for c in range(10)}
    records = {
        "clean-s0": {"kind": "clean", "false_positive": True, "flagged": [3]},
        "bw-0_corner_s0": {"kind": "attack", "flagged": [0, 5]},  # 0, the target, is right
        "bw-85_corner_s0.partial": {"kind": "attack", "flagged": [1, 2]},
    }
    for name, r in records.items():
        r["detection"] = {"flagged": r.pop("flagged"), "scores": scores}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert wrong_classes(tmp_path) == (2, 10 + 9)
    assert "1 of 1 (95 % Wilson" in false_positives(
        tmp_path
    ) and "2 of 19 flagged" in false_positives(tmp_path)


def test_a_rerun_adds_a_missing_method_to_a_finished_unit_and_redoes_nothing(tmp_path, monkeypatch):
    """A finished unit recorded before ``mesa-probes`` and ``ideal`` existed: the rerun repairs
    with those alone on the kept model and search, keeps the recorded repairs, pairs the new
    ones with MESA's and says what it added; a unit with every method is left alone."""
    sys.path.insert(0, str(ROOT))
    import benchmarks.fixed_position as driver

    unit = next(u for u in driver.attack_units() if u["name"] == "bw-0_corner_s0")
    kept = {m: {"asr_outcomes": "1100", "asr": 0.5} for m in ("mesa", "point", "finetune")}
    kept["neural-cleanse"] = {"asr_outcomes": "1000", "asr": 0.25}
    attack = {"acc_clean": 0.85, "asr": 0.97}
    record = {
        "unit": unit["name"],
        "attack": {**attack, "seconds": 600.0},
        "search": {"validity": {"0.9": 0.9}},
        "repairs": kept,
    }
    (tmp_path / f"{unit['name']}.json").write_text(json.dumps(record))
    ran: list[list[str]] = []

    def repairs(model, search, seed, base, methods, progress):
        assert (model, search, seed) == ("attack", "search", 0)
        ran.append(list(methods))
        for method in methods:
            progress(method, {"asr_outcomes": "0100", "asr": 0.25})

    def the_model(unit, base, record, made=attack):
        record["attack"] = {**made, "seconds": 1.0}  # kept: found in no time
        return "attack", 0

    monkeypatch.setattr(driver, "the_model", the_model)
    found = {"artifact": "search", "validity": {"0.9": 0.9}}
    monkeypatch.setattr(driver, "the_search", lambda unit, model, seed, base: found)
    monkeypatch.setattr(driver, "repairs", repairs)
    path = driver.complete_unit(unit, tmp_path / "work", tmp_path)
    assert ran == [["mesa-probes", "ideal"]]
    after = json.loads(path.read_text())
    assert set(after["repairs"]) == set(driver.METHODS)
    assert {m: after["repairs"][m]["asr"] for m in kept} == {m: e["asr"] for m, e in kept.items()}
    assert after["repairs"]["ideal"]["paired_with_mesa"] == {
        "both": 1, "only_first": 1, "only_second": 0, "neither": 2
    }  # fmt: skip
    assert after["added"][0]["methods"] == ["mesa-probes", "ideal"]
    assert driver.complete_unit(unit, tmp_path / "work", tmp_path) is None and len(ran) == 1


def test_a_completion_refuses_a_model_made_again_that_differs_from_the_record(
    tmp_path, monkeypatch
):
    """The kept attack was lost and made again 0.2 points off: the search's validity can still
    match, but the new repairs would not be paired with the recorded ones."""
    sys.path.insert(0, str(ROOT))
    import benchmarks.fixed_position as driver

    unit = next(u for u in driver.attack_units() if u["name"] == "square-white_corner_s0")
    record = {
        "unit": unit["name"],
        "attack": {"acc_clean": 0.8525, "asr": 0.9744, "seconds": 1443.0},
        "search": {"validity": {"0.9": 1.0}},
        "repairs": {"mesa": {"asr_outcomes": "01", "asr": 0.5}},
    }
    (tmp_path / f"{unit['name']}.json").write_text(json.dumps(record))

    def the_model(unit, base, record):
        record["attack"] = {"acc_clean": 0.8505, "asr": 0.9750, "seconds": 900.0}
        return "attack", 0

    monkeypatch.setattr(driver, "the_model", the_model)
    monkeypatch.setattr(driver, "the_search", lambda *a: {"validity": {"0.9": 1.0}})
    monkeypatch.setattr(driver, "repairs", lambda *a: pytest.fail("repaired a different model"))
    with pytest.raises(UserError, match="not the recorded one"):
        driver.complete_unit(unit, tmp_path / "work", tmp_path)
    assert json.loads((tmp_path / f"{unit['name']}.json").read_text()) == record


def test_a_kept_task_is_reused_across_an_unset_setting_added_since():
    sys.path.insert(0, str(ROOT))
    from benchmarks._paper import same_spec

    saved = {"model": "m", "steps": 300}
    assert same_spec(saved, {"model": "m", "steps": 300, "scan_from": None})
    assert not same_spec(saved, {"model": "m", "steps": 300, "probe_share": 0.5})
    assert not same_spec(saved, {"model": "m", "steps": 200, "scan_from": None})


@pytest.mark.slow
def test_the_driver_writes_a_record_per_unit_and_skips_it_next_time(cifar10, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--quick", "--results", str(results), "--workdir", str(work)]
    done = run("--units", "square-white_corner_s0,clean-s0", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((results / "square-white_corner_s0.json").read_text())
    assert record["trigger"] == "square:white" and record["placement"] == "corner"
    assert record["detection"]["placement"] == "learned"
    assert set(record["detection"]["scores"]) == {"0", "1", "2"}
    assert set(record["detection"]["positions"]["0"]) >= {"pos_entropy_ratio", "top"}
    assert set(record["repairs"]) == {
        "mesa", "mesa-probes", "ideal", "point", "neural-cleanse", "finetune"
    }  # fmt: skip
    n = len(record["repairs"]["mesa"]["asr_outcomes"])
    for method, entry in record["repairs"].items():
        assert len(entry["asr_outcomes"]) == n  # the same held-out images
        assert entry["asr_interval"]["n"] == n
        if method != "mesa":
            assert sum(entry["paired_with_mesa"].values()) == n
    assert record["repairs"]["mesa"]["positions"] == "learned"
    assert record["search"]["positions"]  # pi's summary per beta
    clean = json.loads((results / "clean-s0.json").read_text())
    assert clean["false_positive"] == bool(clean["detection"]["flagged"])
    assert not list(results.glob("*.partial.json"))
    again = run("--units", "square-white_corner_s0", *common)
    assert again.returncode == 0 and again.stdout.strip() == ""
    table = run("--summary", "--results", str(results))
    assert "square-white_corner_s0" in table.stdout and "clean-s0" in table.stdout
    written = (results / "README.md").read_text()
    assert written == table.stdout and "Clean models flagged by detection: " in written
    assert f"{int(clean['false_positive'])} of 1" in written
    scan = record["detection"]["scan"]["classes"]["0"]
    assert {"lift", "peak_row", "peak_col"} <= set(scan)


def test_the_paper_check_attacks_as_the_study_did_when_no_model_is_kept(tmp_path, monkeypatch):
    """A fresh machine has no kept paper-study model: the check runs the study's attack (its
    settings, on the committed clean model, in the study's folder layout) instead of stopping,
    and the comparison says whether the model scores the held-out images as the record's."""
    sys.path.insert(0, str(ROOT))
    import benchmarks._paper as paper
    import benchmarks.fixed_position as driver
    from engine import paper_small as protocol
    from engine.reporter import TaskResult

    (tmp_path / "results" / "clean-model").mkdir(parents=True)
    (tmp_path / "results" / "clean-model" / "manifest.json").write_text("{}")
    monkeypatch.setattr(driver, "PAPER_RESULTS", tmp_path / "results")
    monkeypatch.setattr(driver, "PAPER_WORK", tmp_path / "work")
    calls = []

    def run_task(kind, overrides, folder, preset=None, should_stop=None):
        calls.append((kind, overrides, folder, preset))
        return TaskResult(str(folder / "artifact"), {}, {}), 1.0

    monkeypatch.setattr(paper, "run_task", run_task)  # the study's attack step runs it
    assert driver.paper_model("bw:85") == str(tmp_path / "work" / "bw-85" / "attack" / "artifact")
    clean = str((tmp_path / "results" / "clean-model").resolve())
    ((kind, overrides, folder, preset),) = calls
    assert kind == "train" and overrides == protocol.attack_overrides("bw:85", clean)
    assert folder == tmp_path / "work" / "bw-85" / "attack"
    assert preset == protocol.settings()[1]["preset"]

    bits = {"asr_outcomes": "0100", "asr": 0.25, "acc_clean": 0.8}
    study = {"attack": {"asr_outcomes": "1110", "clean_outcomes": "1011"}}
    study |= {"search": {"validity": {}}, "repairs": {"mesa": bits}}
    (tmp_path / "results" / "rate-0.1").mkdir()
    (tmp_path / "results" / "rate-0.1" / "bw-85.json").write_text(json.dumps(study))
    record = {"repairs": {"mesa": bits}}
    same = driver.paper_comparison("bw:85", record, {"asr": "1110", "clean": "1011"})
    other = driver.paper_comparison("bw:85", record, {"asr": "1111", "clean": "1011"})
    assert same["same_model"] and not other["same_model"]


def test_a_summary_of_a_folder_without_records_is_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "no-results"
    done = run("--summary", "--results", str(missing))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "holds no unit records" in done.stderr and not missing.exists()
