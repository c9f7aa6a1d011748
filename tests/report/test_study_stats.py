"""A study's statistics read from the store and its repairs' outcomes.json
(engine/report/study_stats.py): the same table as stats.summarize of the records built by hand,
point restarts in index order, repairs without outcomes left out, labels and references of other
templates, and refusals that leave the rest of `study show` working."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.report.stats import summarize
from engine.report.study_stats import pick_reference, study_records, study_statistics
from store.repository import Store

from .small_study import make_small_study

METHODS = ["mesa", "point", "ideal", "finetune"]


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def test_statistics_are_summarize_of_the_same_records(tmp_path, store):
    store, records = make_small_study(tmp_path, store)
    stats = study_statistics(store, "small")
    expected = summarize(records, METHODS)
    assert {k: stats[k] for k in expected} == expected
    assert (stats["records"], stats["repairs"], stats["without_outcomes"]) == (4, 24, [])
    assert list(stats["methods"]) == METHODS and stats["reference"] == "mesa"
    assert stats["not_implanted"] == {"count": 1, "triggers": ["bw:1"]}
    row = stats["per_trigger"]["bw:0"]
    assert row["floor"] is None and row["methods"]["point"]["restarts"] == 3
    assert set(row["versus_reference"]) == {"point", "ideal", "finetune"}
    mesa = stats["methods"]["mesa"]
    assert mesa["n"] == 3 and mesa["asr_mean"]["lo"] <= mesa["asr_mean"]["mean"]
    assert mesa["asr_mean"]["mean"] <= mesa["asr_mean"]["hi"]
    assert stats["wilcoxon"]["finetune"]["n"] == 3
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats


def test_repairs_without_outcomes_or_unfinished_are_left_out(tmp_path):
    store, records = make_small_study(
        tmp_path,
        without_outcomes=(("bw:85", "finetune"),),
        unfinished=(("bw:170", "point/1"),),
    )
    stats = study_statistics(store, "small")
    expected = summarize(records, METHODS)
    assert {k: stats[k] for k in expected} == expected
    missing = [
        r.job_id
        for r in store.study_repairs("small")
        if r.trigger == "bw:85" and r.method == "finetune"
    ]
    assert stats["without_outcomes"] == missing and stats["repairs"] == 24 - 2
    assert "finetune" not in stats["per_trigger"]["bw:85"]["methods"]
    assert stats["per_trigger"]["bw:170"]["methods"]["point"]["restarts"] == 2
    assert stats["methods"]["finetune"]["n"] == 2


def test_a_study_without_outcomes_has_no_statistics(tmp_path):
    from tests.engine.report_study import make_study

    store = make_study(tmp_path)  # cpu-mini, its repairs finished without outcomes.json
    assert study_statistics(store, "mini") is None


def _repair(tmp_path: Path, job_id: int, trigger: str, method: str, seed: int, asr: str, **spec):
    directory = tmp_path / f"defend-{job_id}"
    directory.mkdir()
    before = {"asr": "1" * len(asr), "clean": "1" * len(asr)}
    after = {"asr": asr, "clean": "1" * len(asr)}
    (directory / "outcomes.json").write_text(json.dumps({"before": before, "after": after}))
    return SimpleNamespace(
        job_id=job_id,
        trigger=trigger,
        method=method,
        seed=seed,
        spec={"method": method.split("-")[0], "point_index": None, **spec},
        result={"artifact": str(directory), "metrics": {}},
    )


def test_labels_seeds_and_reference_of_other_templates(tmp_path):
    """The ResNet template's labels (mesa-ensemble, mesa-0.9, point restarts) over two seeds:
    one record per trigger and seed, named apart; the ensemble is the reference."""
    repairs = []
    for seed in (0, 1):
        for method in ("mesa-0.9", "mesa-ensemble", "finetune"):
            repairs.append(_repair(tmp_path, len(repairs), "bw:7", method, seed, "0011"))
        for index in (1, 0):  # finished out of order: read back in index order
            repairs.append(
                _repair(
                    tmp_path,
                    len(repairs),
                    "bw:7",
                    "point",
                    seed,
                    "1" * (2 + index) + "0" * (2 - index),
                    point_index=index,
                )
            )
    records, methods, used, missing = study_records(repairs, ["ideal", "point", "mesa-0.9"])
    assert [r["trigger"] for r in records] == ["bw:7/seed=0", "bw:7/seed=1"]
    assert methods == ["point", "mesa-0.9", "mesa-ensemble", "finetune"] and used == 10
    restarts = records[0]["repairs"]["point"]["restarts"]
    assert [r["asr_outcomes"] for r in restarts] == ["1100", "1110"] and missing == []
    assert pick_reference(records, methods) == "mesa-ensemble"
    assert pick_reference(records, ["point", "mesa-0.9", "finetune"]) == "mesa-0.9"
    assert pick_reference(records, ["point", "finetune"]) == "finetune"
    assert pick_reference(records, ["point"]) is None
    table = summarize(records, methods, reference="mesa-ensemble")
    assert table["per_trigger"]["bw:7/seed=1"]["methods"]["point"]["asr"] == 5 / 8


def test_records_the_table_cannot_use_are_an_error_not_a_failure(tmp_path):
    store, _ = make_small_study(tmp_path)
    for repair in store.study_repairs("small"):
        if repair.trigger == "bw:85" and repair.method == "ideal":
            path = Path(repair.result["artifact"]) / "outcomes.json"
            data = json.loads(path.read_text())
            data["after"]["asr"] = data["after"]["asr"][:-1]  # one image short: not paired
            path.write_text(json.dumps(data))
    stats = study_statistics(store, "small")
    assert "bw:85" in stats["error"] and stats["records"] == 4
