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
    assert names[:4] == [
        "square-white_corner_s0",
        "bw-0_corner_s0",
        "square-white_at8-8_s0",
        "bw-0_at8-8_s0",
    ]
    assert names[4:7] == ["clean-s0", "clean-s1", "clean-s2"] and len(names) == 11
    assert paired("1100", "1010") == {"both": 1, "only_first": 1, "only_second": 1, "neither": 1}
    entry = wilson_entry("0001")
    assert (
        entry["k"] == 1 and entry["n"] == 4 and entry["wilson95"][0] < 0.25 < entry["wilson95"][1]
    )


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
    assert set(record["repairs"]) == {"mesa", "point", "neural-cleanse", "finetune"}
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
