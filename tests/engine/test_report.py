"""Reports: every section, figure (a valid PNG of the size drawn) and table of a finished study and
of one job with its upstream chain; GPU results; nothing half-written; no torch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import UserError
from engine.report import build_report
from engine.report import figures as fig
from engine.report.build import NO_GPU_RESULTS
from engine.report.collect import trigger_pattern

from .report_study import BETAS, make_study

ROOT = Path(__file__).resolve().parents[2]
STUDY_SECTIONS = (
    "# Report: study mini",
    "## Results beside the paper",
    "## ASR after repair per trigger",
    "## Attack and repair curves",
    "## MESA searches",
    "## Cost",
    "## GPU results",
    "## Provenance",
)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_size(name: str, n_triggers: int = 3) -> tuple[int, int]:
    if name == "asr-by-trigger.png":
        return fig.trigger_figure_size(n_triggers)
    if name.endswith("-grids.png"):
        return fig.grids_size(len(BETAS), with_original=True)
    if "-embedding-" in name:
        return fig.EMBEDDING_W, fig.EMBEDDING_H
    if name.endswith("-validity.png"):
        return fig.HISTOGRAM_W, fig.HISTOGRAM_H
    if name.endswith("curves.png"):
        return fig.panels_size(3)
    raise AssertionError(f"unexpected figure {name}")


@pytest.fixture
def study(tmp_path):
    store = make_study(tmp_path / "artifacts")
    yield store
    store.close()


def check_figures(result, report: str) -> None:
    assert result.figures
    for path in map(Path, result.figures):
        assert path.is_file(), path
        assert png_size(path) == expected_size(path.name), path.name
        assert result.sizes[str(path)] == expected_size(path.name)
        assert f"](figures/{path.name})" in report


def test_study_report_has_every_section_figure_and_table(study, tmp_path):
    out = tmp_path / "report"
    result = build_report(study, "mini", out)
    assert result.report == str(out / "report.md")
    report = (out / "report.md").read_text()
    for heading in STUDY_SECTIONS:
        assert f"\n{heading}\n" in f"\n{report}", heading
    assert NO_GPU_RESULTS in report
    check_figures(result, report)
    names = {Path(p).name for p in result.figures}
    searches = [m.job_id for m in study.study_members("mini") if m.kind == "mesa"]
    assert len(searches) == 3
    for job in searches:
        assert {
            f"search-{job}-{kind}.png" for kind in ("grids", "embedding-pca", "curves", "validity")
        } <= names
    assert {"asr-by-trigger.png", "attack-curves.png", "repair-curves.png"} <= names
    tables = {Path(p).name for p in result.tables}
    assert {"summary.csv", "cells.csv", "asr_by_trigger.csv", "curves.csv", "cost.csv"} <= tables
    assert {"provenance.csv"} <= tables
    for path in map(Path, result.tables):
        assert path.is_file() and path.read_text().count("\n") >= 2, path
    # The paper's figure: triggers sorted by the point baseline (bw:170 lowest, then bw:85, bw:0).
    rows = (out / "tables" / "asr_by_trigger.csv").read_text().splitlines()
    assert rows[0] == "trigger,mesa-ensemble,ideal,point,finetune"
    assert [r.split(",")[0] for r in rows[1:]] == ["bw:170", "bw:85", "bw:0"]
    # Clean accuracy before and after repair, and the paper's numbers, are in the table.
    header = "| method | done | ASR mean | ASR worst | seed sd | paper mean | paper worst | "
    assert header + "clean acc before | clean acc after | robust acc |" in report
    assert "| point | 3/3 | 25.0 % | 30.0 % | – | 10.5 % | 51.4 % | 82.0 % | 79.0 % |" in report
    cost = (out / "tables" / "cost.csv").read_text().splitlines()
    assert cost[0].startswith("stage,device,runs,wall_s_total")
    assert any(r.startswith("defend,cpu,12,") and ",1218.0," in r for r in cost)
    provenance = (out / "tables" / "provenance.csv").read_text()
    for item in ("0.1.0+gtest", "torch,2.14.1", "device,cpu", "cifar10 (sha256 " + "d" * 64):
        assert item in provenance
    assert not list(tmp_path.glob(".report.*")), "temporary directory left behind"


def test_job_report_includes_its_upstream_chain(study, tmp_path):
    members = study.study_members("mini")
    defend = next(m for m in members if m.method == "mesa-ensemble" and m.trigger == "bw:0")
    search = next(m for m in members if m.kind == "mesa" and m.trigger == "bw:0")
    result = build_report(study, str(defend.job_id), tmp_path / "job")
    report = Path(result.report).read_text()
    for heading in (
        "## Upstream chain",
        "## Job",
        "## Attack and repair curves",
        "## MESA searches",
    ):
        assert heading in report
    for heading in ("## Cost", "## GPU results", "## Provenance"):
        assert heading in report
    assert "## Results beside the paper" not in report
    check_figures(result, report)
    names = {Path(p).name for p in result.figures}
    assert {"attack-curves.png", "repair-curves.png", f"search-{search.job_id}-grids.png"} <= names
    job_table = (tmp_path / "job" / "tables" / "job.csv").read_text()
    assert "result.eval/asr,0.13" in job_table


def test_gpu_results_are_shown_with_their_device(study, tmp_path):
    # The shape benchmarks/gpu_bench.py prints (environment from engine.ml.runtime.environment).
    bench = {
        "benchmark": "gpu",
        "environment": {
            "torch": "2.11.0",
            "cuda": "12.8",
            "device": "cuda",
            "device_name": "NVIDIA H200",
            "threads": "16",
        },
        "tiny": False,
        "resnet18_epoch_s_bs128": 9.41,
        "resnet18_images_per_s_bs128": 5313,
        "resnet18_epoch_s_bs512": 6.02,
        "resnet18_images_per_s_bs512": 8306,
        "clean_cifar10": {"epochs": 30, "wall_s": 215.3, "acc_clean": 0.9412},
        "paper_attack_bw170": {"epochs": 10, "wall_s": 80.2, "acc_clean": 0.931, "asr": 0.998},
    }
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(bench))
    train = next(m.job_id for m in study.study_members("mini") if m.kind == "train")
    result = build_report(study, str(train), tmp_path / "r", gpu_results=[path])
    report = Path(result.report).read_text()
    assert "measured on **NVIDIA H200** (torch 2.11.0, CUDA 12.8)" in report
    assert NO_GPU_RESULTS not in report
    rows = (tmp_path / "r" / "tables" / "gpu_results.csv").read_text().splitlines()
    assert rows[0] == "device,file,figure,value"
    assert "NVIDIA H200,h200.json,resnet18_epoch_s_bs128,9.41" in rows
    assert "NVIDIA H200,h200.json,clean_cifar10.acc_clean,0.9412" in rows


def test_refusals_leave_nothing_written(study, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="'nope' is neither a study nor a job id"):
        build_report(study, "nope", tmp_path / "a")
    with pytest.raises(UserError, match="--gpu-results '.*missing.json' does not exist"):
        build_report(study, "mini", tmp_path / "a", gpu_results=[tmp_path / "missing.json"])
    assert not (tmp_path / "a").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; .* --force"):
        build_report(study, "mini", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    search = next(m.job_id for m in study.study_members("mini") if m.kind == "mesa")
    monkeypatch.setattr(fig, "validity_histogram", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(study, str(search), busy, force=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    result = build_report(study, str(search), busy, force=True)
    assert not (busy / "keep.txt").exists() and Path(result.report).is_file()


def test_trigger_thumbnails_match_the_task_patterns():
    torch = pytest.importorskip("torch")
    from engine.ml.triggers import parse_trigger

    for spec in ("bw:0", "bw:1", "bw:170", "bw:186", "bw:511", "color:3", "square:white"):
        ours = trigger_pattern(spec)
        theirs = parse_trigger(spec).numpy()
        assert ours.shape == theirs.shape and np.allclose(ours, theirs), spec
    assert torch is not None


def test_building_a_report_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.engine.report_study import make_study\n"
        "from engine.report import build_report\n"
        f"store = make_study(Path({str(tmp_path / 'art')!r}))\n"
        f"build_report(store, 'mini', {str(tmp_path / 'out')!r})\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("CLEAN")
    assert (tmp_path / "out" / "report.md").is_file()


def test_a_real_engine_run_reports_its_wall_time_and_peak_memory(tmp_path):
    from store.entities import NewJob
    from store.repository import Store

    from .helpers import start_engine, stop_engine, wait_for

    store = Store()
    (job,) = store.submit([NewJob("count", {"steps": 3, "step_s": 0.0}, "c")])
    engine = start_engine(tmp_path)
    try:
        wait_for(lambda: store.job(job).status == "succeeded", timeout=60, what="the job")
    finally:
        stop_engine(engine)
    (run,) = store.runs(job)
    assert store.latest_metrics([run.id])[run.id]["resource/peak_rss_mb"] > 10
    result = build_report(store, str(job), tmp_path / "r")
    cost = (tmp_path / "r" / "tables" / "cost.csv").read_text().splitlines()
    stage, device, runs, wall, *_, rss, gpu = cost[1].split(",")
    assert (stage, runs, gpu) == ("count", "1", "") and float(wall) >= 0 and float(rss) > 10
    assert "## Cost" in Path(result.report).read_text()


def test_a_job_outside_a_study_reports_its_stored_trigger():
    """A search submitted on its own (no study, no trigger in its spec, a label without one)
    reports the trigger the store gave it: its attack's."""
    from engine.report import collect
    from store.entities import NewJob
    from store.repository import Store

    store = Store()
    attack, search = store.submit(
        [
            NewJob("train", {"trigger": "bw:85", "target": 3}, "a", label="attack"),
            NewJob("mesa", {"model": "job:#0"}, "m", label="search", depends_on=(("#0", "model"),)),
        ]
    )
    assert collect.load_job(store, search).trigger == "bw:85"
    assert collect.load_job(store, attack).trigger == "bw:85"
    store.close()
