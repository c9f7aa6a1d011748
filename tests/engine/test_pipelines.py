"""Pipelines, study templates, reuse, input resolution and the foreground recorder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.errors import UserError
from engine.pipelines import (
    CANONICAL_BW_IDS,
    apply_reuse,
    build_pipeline,
    build_study,
    dedupe,
    flagged_target,
    reference_hash,
    split_overrides,
)
from engine.reporter import MemoryReporter, TaskResult
from engine.specs import SPEC_CLASSES, build_spec
from engine.version import code_version
from store.entities import NewJob
from store.repository import RunEvents, Store


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def test_hard_coded_bw_ids_are_the_canonical_orbits():
    from engine.ml.triggers import canonical_bw_ids

    assert list(CANONICAL_BW_IDS) == canonical_bw_ids() and len(CANONICAL_BW_IDS) == 51


def test_pipeline_with_oracle_target_and_overrides():
    built = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0", methods=["mesa", "ideal"],
        overrides={"epochs": "1", "steps": "20", "defend_stamp_rate": "0.1"},
    )  # fmt: skip
    kinds = [j.kind for j in built.jobs]
    assert kinds == ["train", "mesa", "defend", "defend"]
    train, mesa, defend_mesa, defend_ideal = built.jobs
    assert train.spec["epochs"] == 1 and train.spec["arch"] == "small"  # cpu-quick preset
    assert mesa.spec["steps"] == 20 and mesa.spec["target"] == 0 and mesa.spec["model"] == "job:#0"
    assert defend_mesa.spec["search"] == "job:#1" and defend_mesa.spec["epochs"] == 1
    assert defend_mesa.spec["stamp_rate"] == 0.1 and defend_ideal.spec["method"] == "ideal"
    assert defend_mesa.depends_on == (("#0", "model"), ("#1", "search"))


def test_the_recent_defenses_are_pipeline_methods_with_the_presets_cut_budgets():
    from engine.pipelines import parse_methods

    assert {"anp", "i-bau", "clp", "ft-sam"} <= set(parse_methods("all"))
    built = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0",
        methods=parse_methods("anp,i-bau,clp,ft-sam"), overrides={},
    )  # fmt: skip
    kinds = [j.kind for j in built.jobs]
    assert kinds == ["train", "defend", "defend", "defend", "defend"]  # no search needed
    specs = {j.spec["method"]: j.spec for j in built.jobs[1:]}
    assert specs["anp"]["anp_iterations"] == 500 and specs["anp"]["anp_eps"] == 0.4
    assert specs["i-bau"]["ibau_rounds"] == 2 and specs["ft-sam"]["sam_epochs"] == 20
    assert specs["clp"]["clp_u"] == 3.0
    assert all(j.depends_on == (("#0", "model"),) for j in built.jobs[1:])


def test_pipeline_with_auto_target_detects_first():
    built = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="auto", methods=["mesa", "point"], overrides={}
    )
    kinds = [j.kind for j in built.jobs]
    assert kinds == ["train", "detect", "mesa", "defend", "defend"]
    mesa = built.jobs[2]
    assert mesa.spec["target"] == "job:#1:flagged"
    # The search takes the flagged class and the detection's position scan from one input.
    assert mesa.spec["scan_from"] == "job:#1"
    assert ("#1", "target:flagged,scan_from") in mesa.depends_on
    assert ("#1", "target:flagged") in built.jobs[4].depends_on  # point needs the class too
    oracle = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0", methods=["mesa"], overrides={}
    )
    assert oracle.jobs[1].spec["scan_from"] is None  # no detection: the search scans


def test_overrides_route_to_stages_and_unknown_ones_are_refused():
    routed = split_overrides({"epochs": 2, "train_lr": 0.5, "steps": 10})
    assert routed["train"] == {"epochs": 2, "lr": 0.5}
    assert routed["defend"] == {"epochs": 2}
    assert routed["mesa"] == {"steps": 10} and routed["detect"] == {"steps": 10}
    with pytest.raises(UserError, match="unknown setting 'wobble'"):
        split_overrides({"wobble": 1})


def test_a_choice_only_the_attack_offers_goes_to_the_attack(isolated_home):
    """``--placement corner`` is a trigger placement of the attack only (the search and the
    repair stamp per image or per batch): it goes to train, with a note; a value no stage
    offers is still refused."""
    from engine.pipelines import routing_notes

    routed = split_overrides({"placement": "corner"})
    assert routed["train"] == {"placement": "corner"}
    assert "placement" not in routed["mesa"] and "placement" not in routed["defend"]
    (note,) = routing_notes({"placement": "corner"})
    assert "train stage only" in note and "--detect-placement" in note
    assert split_overrides({"placement": "per-batch"})["defend"] == {"placement": "per-batch"}
    assert routing_notes({"placement": "per-batch", "epochs": 2}) == []
    built = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0", methods=["mesa"],
        overrides={"placement": "corner"},
    )  # fmt: skip
    assert [j.spec.get("placement") for j in built.jobs] == ["corner", "learned", "per-image"]
    with pytest.raises(UserError, match="invalid --placement 'diagonal'"):
        build_pipeline(
            preset="cpu-quick", trigger="bw:170", target="0", methods=["mesa"],
            overrides={"placement": "diagonal"},
        )  # fmt: skip


def test_study_templates():
    params, jobs = build_study("paper-cifar10-bw", [0], {})
    assert len(params["triggers"]) == 51 and params["paper"]["ideal"]["mean"] == 0.024
    assert [j.role for j in jobs].count("clean") == 1  # one shared clean model
    attacks = [j for j in jobs if j.role == "train"]
    assert len(attacks) == 51 and all(j.depends_on == (("#0", "init_from"),) for j in attacks)
    assert attacks[0].spec["poison_rate"] == 0.01 and attacks[0].spec["epochs"] == 10
    params, jobs = build_study("cpu-mini", [0, 1], {"mesa_steps": 50})
    assert params["seeds"] == [0, 1] and len(dedupe(jobs)) == len(jobs)
    assert {j.spec["steps"] for j in jobs if j.kind == "mesa"} == {50}
    assert {j.spec["stamp_rate"] for j in jobs if j.kind == "defend"} == {0.1}
    _, c100 = build_study("paper-cifar100-color", [0], {}, target_mode="oracle")
    targets = [j.spec["target"] for j in c100 if j.kind == "mesa"]
    assert targets == [51, 90, 96, 79, 8, 50, 19, 7, 7, 91]
    assert {j.spec["dataset"] for j in c100 if j.kind == "train"} == {"cifar100"}


def _resolved(spec: dict, paths: dict[int, str]) -> dict:
    """A job's spec with its ``job:#i`` references replaced by the path job i would leave."""
    return {
        k: paths[int(v[5:])] if isinstance(v, str) and v.startswith("job:#") else v
        for k, v in spec.items()
    }


def test_paper_small_template_is_the_protocol_of_engine_paper_small():
    from engine import paper_small as protocol

    params, jobs = build_study("paper-cifar10-bw-small", [protocol.SEED], {})
    triggers = [f"bw:{i}" for i in CANONICAL_BW_IDS]
    assert params["triggers"] == triggers and params["target_mode"] == "oracle"
    assert params["methods"] == list(protocol.MAIN_METHODS)
    assert params["overrides"] == {"stamp_rate": protocol.PAPER_RATE}
    per_trigger = 2 + len(protocol.MAIN_METHODS) - 1 + protocol.POINT_RESTARTS
    assert len(jobs) == 1 + 51 * per_trigger and len(dedupe(jobs)) == len(jobs)
    roles = [j.role for j in jobs]
    assert roles.count("clean") == 1 and roles.count("train") == roles.count("mesa") == 51
    assert "detect" not in roles and {j.seed for j in jobs} == {protocol.SEED}
    assert all(j.spec_hash == reference_hash(j.spec) for j in jobs)

    # Every spec is what the driver builds from engine.paper_small for the same upstream paths.
    paths = {i: f"/artifacts/{i}" for i in range(len(jobs))}
    clean = {k: v for k, v in protocol.CLEAN.items() if k != "preset"}
    assert jobs[0].spec == build_spec("train", protocol.CLEAN["preset"], None, clean).to_json()
    assert jobs[0].depends_on == ()
    for t, trigger in enumerate(triggers):
        first = 1 + t * per_trigger
        attack, search, *repairs = jobs[first : first + per_trigger]
        assert attack.trigger == search.trigger == trigger
        assert attack.depends_on == (("#0", "init_from"),)
        expected = protocol.attack_overrides(trigger, paths[0])
        assert (
            _resolved(attack.spec, paths)
            == build_spec("train", protocol.ATTACK["preset"], None, expected).to_json()
        )
        model, found = paths[first], paths[first + 1]
        assert search.depends_on == ((f"#{first}", "model"),)
        assert (
            _resolved(search.spec, paths)
            == build_spec("mesa", None, None, protocol.search_overrides(model)).to_json()
        )
        wanted = [
            (method, overrides)
            for method in protocol.MAIN_METHODS
            for _, overrides in protocol.repair_overrides(method, model, found, protocol.PAPER_RATE)
        ]
        assert [j.method for j in repairs] == [m for m, _ in wanted]
        first_point = None
        for r, (job, (method, overrides)) in enumerate(zip(repairs, wanted, strict=True)):
            index = first + 2 + r
            deps = [(f"#{first}", "model")]
            if method == "mesa":
                deps.append((f"#{first + 1}", "search"))
            if method == "point" and first_point is None:
                first_point = index  # reverses every restart; the later ones reuse its reversal
            elif method == "point":
                overrides = {**overrides, "reversal_from": paths[first_point]}
                deps.append((f"#{first_point}", "reversal_from"))
            assert job.depends_on == tuple(deps), job.label
            assert (
                _resolved(job.spec, paths) == build_spec("defend", None, None, overrides).to_json()
            )
        points = [j.spec["point_index"] for j in repairs if j.method == "point"]
        assert points == list(range(protocol.POINT_RESTARTS))
        assert {j.spec["stamp_rate"] for j in repairs} == {protocol.PAPER_RATE}
        assert all(j.spec["point_restarts"] == protocol.POINT_RESTARTS for j in repairs)


def test_paper_small_template_adds_the_recent_defenses_without_a_search():
    """--methods picks the study's methods: the recent defenses alone queue no search (none
    repairs from it) and their specs carry no stamping rate (one repair serves every rate), as
    the driver's records; with mesa the search is back."""
    from engine import paper_small as protocol

    recent = ",".join(protocol.RECENT_METHODS)
    params, jobs = build_study("paper-cifar10-bw-small", [0], {"methods": recent}, None, ["bw:0"])
    assert params["methods"] == list(protocol.RECENT_METHODS)
    assert params["overrides"] == {"stamp_rate": protocol.PAPER_RATE, "methods": recent}
    assert [j.kind for j in jobs] == ["train", "train", *["defend"] * 4]
    defends = [j for j in jobs if j.kind == "defend"]
    assert [j.spec["method"] for j in defends] == list(protocol.RECENT_METHODS)
    unset = SPEC_CLASSES["defend"].model_fields["stamp_rate"].default
    assert {j.spec["stamp_rate"] for j in defends} == {unset}  # not the study's rate
    _, with_mesa = build_study(
        "paper-cifar10-bw-small", [0], {"methods": "mesa-0.9,anp-acc10"}, None, ["bw:0"]
    )
    assert [j.kind for j in with_mesa] == ["train", "train", "mesa", "defend", "defend"]
    assert with_mesa[3].spec["beta"] == 0.9 and with_mesa[4].spec["anp_max_acc_drop"] == 0.1


def test_paper_small_template_rate_subsets_and_refusals():
    from engine import paper_small as protocol

    params, jobs = build_study(
        "paper-cifar10-bw-small", [0], {"stamp_rate": "0.1"}, None, ["pilot"]
    )
    assert params["triggers"] == list(protocol.PILOT_TRIGGERS) and len(jobs) == 1 + 3 * 8
    assert {j.spec["stamp_rate"] for j in jobs if j.kind == "defend"} == {0.1}
    assert params["overrides"] == {"stamp_rate": 0.1}
    # A subset keeps the canonical order; "even" and "odd" are the driver's halves.
    params, _ = build_study("paper-cifar10-bw-small", [0], {}, "oracle", ["bw:85", "bw:0"])
    assert params["triggers"] == ["bw:0", "bw:85"]
    even, _ = build_study("paper-cifar10-bw-small", [0], {}, None, ["even"])
    assert even["triggers"] == protocol.even_triggers()
    cases = [
        ([1], {}, None, None, "one seed"),
        ([0], {"mesa_steps": "10"}, None, None, "only --stamp-rate and --methods"),
        ([0], {"methods": "anp,magic"}, None, None, "invalid --methods 'anp,magic': magic"),
        ([0], {"methods": "anp,anp"}, None, None, "named twice"),
        ([0], {"stamp_rate": "2"}, None, None, "invalid --stamp-rate"),
        ([0], {}, "auto", None, "runs with --target oracle only"),
        ([0], {}, None, ["bw:4"], "bw:4 is not among paper-cifar10-bw-small's 51 triggers"),
    ]
    for seeds, overrides, target, chosen, message in cases:
        with pytest.raises(UserError, match=message):
            build_study("paper-cifar10-bw-small", seeds, overrides, target, chosen)
    # Every template takes a subset; the others keep auto as their default target.
    params, jobs = build_study("cpu-mini", [0], {}, None, ["bw:85"])
    assert params["triggers"] == ["bw:85"] and params["target_mode"] == "auto"
    assert {j.trigger for j in jobs} == {"bw:85"}


def _fake_dataset(digest: str) -> None:
    from safetensors.numpy import save_file

    from engine import catalog

    path = catalog.imported_path("cifar10")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train_x": np.zeros((1, 3, 32, 32), np.uint8)},
        str(path),
        metadata={"sha256": digest, "classes": json.dumps([str(c) for c in range(10)])},
    )


def _finish(store, job_id, artifact_sha, dataset_hash=None, result=None):
    engine = store.register_engine("here", 1, "test", 1)
    (claimed,) = [
        c
        for c in store.claim_jobs(
            engine.id,
            10,
            host="here",
            executor="local",
            code_version=code_version(),
            workdir_for=lambda k, i: f"/tmp/{k}-{i}",
            startup_grace_s=60,
        )  # fmt: skip
        if c.job_id == job_id
    ]
    events = RunEvents(claimed.run_id, job_id)
    events.artifacts = [(f"/tmp/art-{job_id}", "model", artifact_sha, 1)]
    events.env = {"dataset_hash": dataset_hash, "code_version": code_version()}
    store.record_events([events])
    store.finish_run(claimed.run_id, "succeeded", result=result or {"metrics": {}})


def test_reuse_needs_equal_spec_code_dataset_and_upstream(store):
    _fake_dataset("d" * 64)
    first = build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0", methods=["ideal"], overrides={}
    )
    ids = store.submit(first.jobs)
    _finish(store, ids[0], "a" * 64, dataset_hash="d" * 64)
    again = apply_reuse(store, build_pipeline(
        preset="cpu-quick", trigger="bw:170", target="0", methods=["ideal"], overrides={}
    ).jobs)  # fmt: skip
    assert again[0].reuse_of == ids[0] and again[1].reuse_of is None  # defend never finished
    _finish(store, ids[1], "b" * 64)
    again = apply_reuse(store, first.jobs)
    assert [j.reuse_of for j in again] == ids
    other_trigger = build_pipeline(
        preset="cpu-quick", trigger="bw:0", target="0", methods=["ideal"], overrides={}
    )
    assert [j.reuse_of for j in apply_reuse(store, other_trigger.jobs)] == [None, None]
    _fake_dataset("e" * 64)  # the data changed: nothing is reused
    assert [j.reuse_of for j in apply_reuse(store, first.jobs)] == [None, None]


def test_a_pipelines_jobs_carry_their_attacks_trigger_and_target(store):
    """Every stage stores the attack's trigger and target as fields (labels blanked: nothing is
    read from them); the search told to use the class detect flags, and the repairs, inherit the
    attack's target; a later pipeline reusing the finished attack inherits from that job."""
    import dataclasses

    def blank(jobs):
        return [dataclasses.replace(j, label="") for j in jobs]

    built = build_pipeline(
        preset="cpu-quick", trigger="color:3", target="auto", methods=["mesa", "point"],
        overrides={"train_target": "2"},
    )  # fmt: skip
    ids = store.submit(blank(built.jobs))
    jobs = [store.job(i) for i in ids]
    assert [j.kind for j in jobs] == ["train", "detect", "mesa", "defend", "defend"]
    assert jobs[2].spec["target"] == f"job:{ids[1]}:flagged"
    assert [(j.trigger, j.target) for j in jobs] == [("color:3", 2)] * 5
    _fake_dataset("d" * 64)
    _finish(store, ids[0], "a" * 64, dataset_hash="d" * 64)
    again = apply_reuse(store, blank(build_pipeline(
        preset="cpu-quick", trigger="color:3", target="auto", methods=["finetune"],
        overrides={"train_target": "2"},
    ).jobs))  # fmt: skip
    assert again[0].reuse_of == ids[0]
    reused, detect, finetune = store.submit(again)
    assert reused == ids[0] and store.job(finetune).spec["model"] == f"job:{ids[0]}"
    assert (store.job(finetune).trigger, store.job(finetune).target) == ("color:3", 2)


def test_engine_resolves_artifacts_and_the_flagged_class(store):
    from engine.daemon import Engine, EngineConfig

    train, detect = store.submit(
        [
            NewJob("train", {}, "t"),
            NewJob("detect", {"model": "job:#0"}, "d", depends_on=(("#0", "model"),)),
        ]
    )
    _finish(store, train, "a" * 64)
    _finish(store, detect, None, result={"flagged": [3, 5], "scores": {"3": 0.7, "5": 0.9}})
    engine = Engine(EngineConfig(cpu_slots=1), store=store)
    assert engine.resolve_inputs({"model": train, "target:flagged": detect}) == {
        "model": f"/tmp/art-{train}",
        "target": 5,
    }
    both = engine.resolve_inputs({"model": train, "target:flagged,scan_from": detect})
    assert both == {"model": f"/tmp/art-{train}", "target": 5, "scan_from": f"/tmp/art-{detect}"}
    assert flagged_target({"flagged": []}) is None


def test_reference_hash_ignores_job_ids_only():
    spec = build_spec("train", "cpu-quick", None, {}).to_json()
    assert reference_hash(spec) == build_spec("train", "cpu-quick", None, {}).spec_hash()
    assert reference_hash({"model": "job:3", "a": 1}) == reference_hash({"model": "job:9", "a": 1})
    assert reference_hash({"model": "job:3", "a": 1}) != reference_hash({"model": "job:3", "a": 2})


def test_foreground_runs_are_recorded(tmp_path, store):
    from engine.recording import ForegroundRecorder

    spec = build_spec("train", "cpu-quick", None, {"epochs": 1})
    recorder = ForegroundRecorder.start("train", spec)
    reporter = recorder.wrap(MemoryReporter(tmp_path))
    for step in range(5):
        reporter.log({"train/loss": 1.0 / (step + 1)}, step)
    reporter.text("hello")
    (tmp_path / "manifest.json").write_text("{}")
    reporter.artifact(tmp_path, "model")
    recorder.finish(TaskResult(artifact=str(tmp_path), metrics={"eval/asr": 0.5}), None)
    (job,) = store.list_jobs()
    assert job.executor == "foreground" and job.status == "succeeded"
    assert [p.step for p in store.metric_series(job.id, "train/loss")] == list(range(5))
    assert store.artifacts(job.id)[0].sha256 is not None
    assert [e.message for e in store.logs(job_id=job.id)] == ["hello"]
    assert store.job_detail(job.id).result["metrics"] == {"eval/asr": 0.5}


def test_foreground_recorder_fails_soft(tmp_path, store, capsys):
    from engine.recording import ForegroundRecorder

    spec = build_spec("train", "cpu-quick", None, {"epochs": 1})
    recorder = ForegroundRecorder.start("train", spec)
    reporter = recorder.wrap(MemoryReporter(tmp_path))
    recorder.store.engine.dispose()
    recorder.store.record_events = None  # any store failure
    reporter.log({"train/loss": 1.0}, 0)
    recorder.flush(force=True)
    recorder.finish(TaskResult(artifact=None, metrics={}), None)
    assert "stopped recording this run" in capsys.readouterr().err
    assert reporter.inner.last("train/loss") == 1.0
