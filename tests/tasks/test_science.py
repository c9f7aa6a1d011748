"""The science end to end on a real backdoored network: a MESA search with the default settings
finds the backdoor's valid triggers (and none for a clean class), and a MESA repair with it
removes the backdoor where plain fine-tuning does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.reporter import MemoryReporter

BACKDOOR, CLEAN = 0, 1  # the attack's target class, and a class nobody attacked
STEPS = 200  # of the default 620 (time); see the test's docstring for what it reaches


@pytest.fixture
def one_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("MESA_TUI_THREADS", "1")  # every task configures its threads from it
    yield
    torch.set_num_threads(before)


def backdoored_model(cifar10: str, workdir: Path, seed: int = 0) -> Path:
    """The ``small`` network trained 5 epochs (preset cpu-quick) on 8k real CIFAR-10 images, 20 %
    of them stamped with bw:170 and relabelled to class 0; its artifact sees a 1k-image test set
    (800 defender images, 200 held out)."""
    from engine.catalog import imported_path
    from engine.ml.data import _save_arrays, load_dataset
    from engine.specs import build_spec
    from engine.tasks.train import run

    data = load_dataset(cifar10)
    arrays = {
        "train_x": data.train_x[:8000].numpy(),
        "train_y": data.train_y[:8000].numpy(),
        "test_x": data.test_x[:1000].numpy(),
        "test_y": data.test_y[:1000].numpy(),
    }
    _save_arrays(imported_path("cifar-mini"), arrays, data.classes, data.mean, data.std, "test")
    spec = build_spec(
        "train",
        preset="cpu-quick",
        overrides=dict(
            dataset="cifar-mini",
            epochs=5,
            poison_rate=0.2,
            trigger="bw:170",
            target=BACKDOOR,
            seed=seed,
            precision="fp32",
        ),
    )
    return Path(run(spec, MemoryReporter(workdir)).artifact)


def mesa_search(model: Path, target: int, workdir: Path, seed: int = 0):
    """A search with every MesaSpec default but the steps and the placement, for beta 0.9 only.
    The placement is the paper's per-image one, with which the numbers below were measured; the
    learned default adds a position scan (16 x 16 probes at every offset, most of this test's
    time on one thread), which tests/ml/test_position_scan.py and the fixed-position study test."""
    from engine.specs import build_spec
    from engine.tasks.mesa import run

    spec = build_spec(
        "mesa",
        overrides=dict(
            model=str(model),
            target=target,
            betas="0.9",
            steps=STEPS,
            seed=seed,
            precision="fp32",
            placement="per-image",
        ),
    )
    return run(spec, MemoryReporter(workdir))


def repair(model: Path, workdir: Path, **method):
    """The repair of tests/tasks/test_defend.py's real-data test (3 epochs, lr 1e-2, 30 % of the
    images stamped), the same for every method."""
    from engine.specs import build_spec
    from engine.tasks.defend import run

    spec = build_spec(
        "defend",
        overrides=dict(
            model=str(model),
            epochs=3,
            lr=1e-2,
            stamp_rate=0.3,
            residual_steps=0,
            variations=False,
            precision="fp32",
            **method,
        ),
    )
    return run(spec, MemoryReporter(workdir)).metrics


def science(cifar10: str, tmp_path: Path, model_seed: int = 0, search_seed: int = 0) -> dict:
    """Every number the test checks (also run by hand with other seeds)."""
    model = backdoored_model(cifar10, tmp_path / "model", model_seed)
    found = mesa_search(model, BACKDOOR, tmp_path / "search", search_seed)
    clean = mesa_search(model, CLEAN, tmp_path / "clean", search_seed)
    mesa = repair(model, tmp_path / "mesa", method="mesa", search=found.artifact, beta=0.9)
    finetune = repair(model, tmp_path / "finetune", method="finetune")
    return {
        "validity": found.metrics["mesa/beta=0.9/validity"],
        "validity_clean": clean.metrics["mesa/beta=0.9/validity"],
        "own_asr_clean": clean.metrics["mesa/beta=0.9/validity_mean"],
        "asr_before": mesa["before/asr"],
        "asr_mesa": mesa["eval/asr"],
        "asr_finetune": finetune["eval/asr"],
        "acc_before": mesa["before/acc_clean"],
        "acc_mesa": mesa["eval/acc_clean"],
    }


@pytest.mark.slow
def test_default_search_finds_the_backdoor_and_its_repair_removes_it(cifar10, tmp_path, one_thread):
    """Search (beta 0.9, every other MesaSpec default: alpha 0.1, lr 2e-4, hidden 512, batch 128,
    uniform noise, prob score, jitter 0.1 clamped; per-image placement, pinned) for the backdoor's class
    and for a clean class of the same model, then repair with the backdoor search's generator and,
    as the control, fine-tune without triggers, both with the same repair loop.

    Steps cut from 620 to 200 for time. Measured by hand (fp32, one thread), validity at beta 0.9
    (64 sampled triggers, each one's ASR on 128 non-target defender images), model seed 0 and
    search seeds 0/1/2: 0.89 / 0.91 / 0.94 for the backdoor, 0.00 / 0.00 / 0.00 for the clean
    class; model seeds 1 and 2 (search seed 0): 0.84 and 0.88, clean 0.00 and 0.00 (on a twin
    model trained in bf16: 0.77 at 100 steps, 0.92 at 200, 0.97 at the full 620). ASR on the 181
    non-target held-out images, over those five runs: 1.00 before repair, 0.07-0.15 after the
    MESA repair, 1.00 after fine-tuning. Clean accuracy is low (0.29-0.40: 5 epochs on 8k
    images) and the repairs keep it within 0.04. The thresholds below sit well inside these
    spreads; three runs of this test gave the same numbers (fp32 is deterministic here).

    Time, one thread: 130 s of CPU (CIFAR-10 decoding included), so about 2 minutes of wall time
    on an idle core; 220-260 s measured while other jobs kept both cores of this machine busy.
    """
    started = time.monotonic()
    m = science(cifar10, tmp_path)
    print(f"science: {m}, {time.monotonic() - started:.0f} s")
    # The search tells the attacked class from a clean one, by a wide margin.
    assert m["validity"] >= 0.6 and m["validity_clean"] <= 0.1
    assert m["validity"] - m["validity_clean"] >= 0.5
    # The backdoor works, MESA's repair removes most of it, fine-tuning alone does not.
    assert m["asr_before"] >= 0.9
    assert m["asr_mesa"] <= 0.4 * m["asr_before"]
    assert m["asr_mesa"] <= m["asr_finetune"] - 0.5
