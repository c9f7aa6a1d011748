"""The paper-figure study: its protocol's rules (which triggers, which rate, which subset) and the
driver script at a tiny size on real CIFAR-10 images (a record per trigger and rate, skipped when
it exists, repairs paired on the same held-out images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import paper_small as protocol
from engine.pipelines import CANONICAL_BW_IDS

ROOT = Path(__file__).resolve().parents[2]


def test_the_trigger_lists_split_the_51_and_the_subset_follows_its_rule():
    even, odd = protocol.even_triggers(), protocol.odd_triggers()
    assert len(even) == 26 and len(odd) == 25
    assert sorted(even + odd) == sorted(f"bw:{i}" for i in CANONICAL_BW_IDS)
    spaced = protocol.spaced_triggers()
    assert len(spaced) == 8 and spaced[0] == "bw:0" and spaced[-1] == "bw:186"
    point = {f"bw:{i}": i / 1000 for i in CANONICAL_BW_IDS}  # worst: the largest ids
    subset = protocol.subset_triggers(point)
    assert subset[:4] == ["bw:186", "bw:170", "bw:114", "bw:113"]
    assert len(subset) == 11  # bw:186 is both among the worst and an end of the spaced ids


def test_the_rate_rule_keeps_the_papers_rate_unless_ideal_leaves_more_than_5_percent():
    assert protocol.main_rate([0.02, 0.04, 0.06]) == 0.01
    assert protocol.main_rate([0.02, 0.04, 0.12]) == 0.1
    with pytest.raises(ValueError):
        protocol.main_rate([])


def test_point_is_three_repairs_and_mesa_uses_the_search():
    point = protocol.repair_overrides("point", "M", "S", 0.01)
    assert [label for label, _ in point] == ["point/0", "point/1", "point/2"]
    assert [s["point_index"] for _, s in point] == [0, 1, 2]
    ((_, mesa),) = protocol.repair_overrides("mesa", "M", "S", 0.1)
    assert mesa["search"] == "S" and mesa["stamp_rate"] == 0.1 and "beta" not in mesa
    ((_, single),) = protocol.repair_overrides("mesa-0.9", "M", "S", 0.1)
    assert single["beta"] == 0.9
    for _, settings in [*point, ("mesa", mesa)]:
        assert settings["epochs"] == 10 and settings["seed"] == protocol.SEED


def test_the_recent_defenses_run_at_their_defaults_and_one_repair_serves_every_rate():
    for method in protocol.RECENT_METHODS:
        ((label, low),) = protocol.repair_overrides(method, "M", "S", 0.01)
        ((_, high),) = protocol.repair_overrides(method, "M", "S", 0.1)
        assert label == method and low == high and "stamp_rate" not in low
        assert low["method"] == method and "search" not in low
        assert not protocol.uses_rate(method)
    assert all(protocol.uses_rate(m) for m in [*protocol.MAIN_METHODS, *protocol.SUBSET_METHODS])
    from benchmarks.paper_study import method_list

    assert method_list("anp,i-bau,clp,ft-sam") == ["anp", "i-bau", "clp", "ft-sam"]
    assert set(protocol.RECENT_METHODS) <= set(method_list("all"))


def test_anp_with_the_accuracy_budget_is_a_study_method_paired_with_the_others():
    from benchmarks.paper_study import method_list
    from engine.report.paper import METHOD_ORDER
    from engine.specs import DefendSpec

    ((label, low),) = protocol.repair_overrides("anp-acc10", "M", "S", 0.01)
    ((_, high),) = protocol.repair_overrides("anp-acc10", "M", "S", 0.1)
    assert label == "anp-acc10" and low == high and "stamp_rate" not in low
    assert low["method"] == "anp" and low["anp_max_acc_drop"] == 0.1
    assert not protocol.uses_rate("anp-acc10")
    ((_, anp),) = protocol.repair_overrides("anp", "M", "S", 0.1)
    assert {k: v for k, v in low.items() if k != "anp_max_acc_drop"} == anp  # else the same
    assert DefendSpec(**low).anp_config().max_acc_drop == 0.1
    assert method_list("anp,anp-acc10") == ["anp", "anp-acc10"]
    assert "anp-acc10" in method_list("all")
    assert METHOD_ORDER.index("anp") + 1 == METHOD_ORDER.index("anp-acc10")
    ((_, bb),) = protocol.repair_overrides("anp-bb10", "M", "S", 0.1)
    assert bb == {**low, "anp_lr": 0.01} and DefendSpec(**anp).anp_lr == 0.2  # only the mask lr
    assert DefendSpec(**bb).anp_config().lr == 0.01 and "anp-bb10" in method_list("all")


def test_the_resnet18_variant_is_the_same_protocol_at_the_papers_learning_rate():
    clean, attack = protocol.settings("resnet18")
    assert clean["preset"] == "clean-cifar10" and clean["poison_rate"] == 0.0
    assert attack["arch"] == "resnet18" and attack["lr"] == 1e-3
    small = protocol.ATTACK
    assert {k: v for k, v in attack.items() if k not in ("arch", "lr")} == {
        k: v for k, v in small.items() if k not in ("arch", "lr")
    }
    overrides = protocol.attack_overrides("bw:0", "/m", "resnet18")
    assert overrides["init_from"] == "/m" and overrides["poison_rate"] == 0.01
    assert "preset" not in overrides and overrides["lr"] == 1e-3
    assert protocol.attack_overrides("bw:0", "/m")["lr"] == 1e-2  # the CPU network's default
    with pytest.raises(ValueError, match="no 'vgg' variant"):
        protocol.settings("vgg")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/paper_study.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_the_driver_writes_one_paired_record_per_trigger_and_skips_it_next_time(cifar10, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    common = ["--quick", "--results", str(results), "--workdir", str(work), "--threads", "1"]
    done = run("--triggers", "bw:170", "--rates", "0.1", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    path = results / "rate-0.1" / "bw-170.json"
    assert done.stdout.split() == [str(path)]
    record = json.loads(path.read_text())
    assert record["schema"] == 1 and record["trigger"] == "bw:170" and record["rate"] == 0.1
    assert set(record["repairs"]) == set(protocol.MAIN_METHODS)
    assert len(record["repairs"]["point"]["restarts"]) == 3
    singles = [record["repairs"][m] for m in ("mesa", "ideal", "finetune")]
    entries = singles + record["repairs"]["point"]["restarts"]
    n = len(record["attack"]["asr_outcomes"])
    for entry in entries:  # the same held-out images, image by image
        assert len(entry["asr_outcomes"]) == n
        assert entry["asr"] == pytest.approx(entry["asr_outcomes"].count("1") / n)
    assert len(record["floor"]["asr_outcomes"]) == n
    assert record["runs"][0]["machine"]["precision"] in ("fp32", "bf16")
    assert (results / "clean-model" / "manifest.json").exists()
    clean = json.loads((results / "clean-model.json").read_text())
    assert clean["sha256"] == record["clean_model_sha256"]

    again = run("--triggers", "bw:170", "--rates", "0.1", *common)
    assert again.returncode == 0 and "done already" in again.stderr
    assert json.loads(path.read_text()) == record
    # A later sitting adds methods to the same record, on the same model.
    more = run("--triggers", "bw:170", "--rates", "0.1", "--methods", "mesa-0.9", *common)
    assert more.returncode == 0, more.stderr[-3000:]
    grown = json.loads(path.read_text())
    assert set(grown["repairs"]) == {*protocol.MAIN_METHODS, "mesa-0.9"}
    assert grown["attack"] == record["attack"] and len(grown["runs"]) == 2
    assert grown["runs"][1]["same_model"] is True  # the kept attack, so paired image by image


def test_the_rate_is_decided_from_the_pilot_and_written_down(tmp_path):
    folder = tmp_path / "rate-0.01"
    folder.mkdir()
    for trigger, asr in zip(protocol.PILOT_TRIGGERS, (0.02, 0.03, 0.13), strict=True):
        record = {"trigger": trigger, "repairs": {"ideal": {"asr": asr}}}
        (folder / f"{trigger.replace(':', '-')}.json").write_text(json.dumps(record))
    done = run("--decide-rate", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    decision = json.loads((tmp_path / "rate.json").read_text())
    assert decision["rate"] == 0.1 and decision["ideal_mean"] == pytest.approx(0.06)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--triggers", "square:white"], "--triggers 'square:white'"),
        (["--triggers", "bw:0,bw:999"], "bw trigger id 999 is out of range"),  # before any work
        (["--rates", "0.1,2"], "a stamping rate is in (0, 1]"),
        (["--methods", "mesa,bogus"], "bogus unknown"),
        (["--rates", "main"], "run the pilot, then --decide-rate"),
        (["--decide-rate"], "the pilot is not finished"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    done = run(*args, "--results", str(tmp_path), "--workdir", str(tmp_path / "w"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert not (tmp_path / "w").exists()


def test_a_re_attacked_model_counts_as_the_same_only_if_every_held_out_image_scores_as_before():
    from benchmarks._paper import same_model

    record = {"attack": {"asr_outcomes": "1101", "clean_outcomes": "0111"}}
    assert same_model(record, {"asr": "1101", "clean": "0111"})
    assert not same_model(record, {"asr": "1100", "clean": "0111"})
    assert not same_model(record, {"asr": "1101", "clean": "1111"})
