"""The position scan: probe patterns at every offset find where a fixed-position backdoor lives.

On the planted model whose checkerboard backdoor answers at one offset only, the target's map
peaks there and nowhere else, its lift stands out from the other classes', the search's learned
pi starts on that peak, and detection flags the target by the lift. On the planted model that
answers anywhere (the paper's random-position backdoor) the target has no peak: the search
keeps the paper's uniform start.
"""

from __future__ import annotations

import pytest
import torch

from engine.errors import UserError
from engine.ml.data import Normalizer
from engine.ml.mesa import MesaConfig, MesaTrainer, scan_for
from engine.ml.position_scan import (
    ScanConfig,
    position_prior,
    position_support,
    probe_patterns,
    scan_positions,
)
from engine.tasks.detect import scan_flags
from tests.ml.planted import CLASSES, SIZE, PlantedBackdoor, synthetic
from tests.ml.test_positions import SPOT, FixedSpotBackdoor

GRID = (SIZE - 2, SIZE - 2)


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic(128, seed=3)
    return images, labels, Normalizer((0.0,) * 3, (1.0,) * 3)


def scan(model, data, **overrides):
    images, _, normalizer = data
    return scan_positions(model.eval(), normalizer, images, 3, ScanConfig(**overrides))


def test_probes_are_grey_white_black_then_black_and_white():
    probes = probe_patterns(3, 3, 6, torch.Generator().manual_seed(0))
    assert probes.shape == (6, 3, 3, 3)
    assert [float(p.mean()) for p in probes[:3]] == [0.5, 1.0, 0.0]
    assert set(probes[3:].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(probes[3:, 0], probes[3:, 1])  # the same in every channel


def test_a_fixed_position_backdoor_peaks_at_its_place(data):
    result = scan(FixedSpotBackdoor(), data)
    assert result.grid == GRID
    assert result.peak(1) == SPOT
    lifts = {c: result.lift(c) for c in range(CLASSES)}
    assert lifts[1] > 0.5, lifts
    assert max(v for c, v in lifts.items() if c != 1) < 0.1, lifts
    support = position_support(result, 1, 0.25)
    assert support is not None and bool(support.view(GRID)[SPOT])
    assert int(support.sum()) <= 10  # the peak and its overlapping neighbours, not the grid
    assert position_support(result, 0, 0.25) is None  # no peak: every offset


def test_a_backdoor_that_works_anywhere_has_no_peak(data):
    result = scan(PlantedBackdoor(), data)
    assert float(result.class_map(1).median()) > 0.5  # the target answers everywhere
    assert result.lift(1) < 0.25
    assert position_support(result, 1, 0.25) is None


def test_the_scan_is_a_function_of_its_seed(data):
    a, b = scan(FixedSpotBackdoor(), data, seed=1), scan(FixedSpotBackdoor(), data, seed=1)
    assert torch.equal(a.probs, b.probs)
    c = scan(FixedSpotBackdoor(), data, seed=1, chunk=7)  # any chunking: the same map
    assert torch.allclose(a.probs, c.probs, atol=1e-6)
    d = scan(FixedSpotBackdoor(), data, seed=2)
    assert not torch.equal(a.probs, d.probs)


def test_the_learned_search_starts_on_the_scans_peak(data):
    images, labels, normalizer = data
    model = FixedSpotBackdoor()
    cfg = MesaConfig(
        betas=(0.8,),
        batch_size=32,
        hidden=32,
        channels_last=False,
        samples=32,
        n_eval_triggers=8,
        eval_images=32,
        placement="learned",
    )
    result = scan_for(model, normalizer, images, cfg, "fp32", 0)
    pairs = [(0.8, 1, "t1"), (0.8, 0, "t0")]
    trainer = MesaTrainer(model, normalizer, images, pairs, cfg, position_scan=result)
    target, clean = trainer.runs
    pi = target.position_probs(trainer.grid, cfg)
    assert float(pi[SPOT]) == float(pi.max()) and int((pi > 0).sum()) <= 10
    prior = position_prior(result, 1, 0.8).view(GRID)
    assert float(prior[SPOT]) == pytest.approx(float(torch.tensor(0.8).log()), abs=0.3)
    assert target.learned and not clean.learned  # no peak for class 0: the paper's placement
    foreign = scan_positions(model, normalizer, images, 2, ScanConfig(images=4, probes=3))
    with pytest.raises(UserError, match="scan with the search's trigger size"):
        MesaTrainer(model, normalizer, images, pairs, cfg, position_scan=foreign)


def test_detection_flags_by_the_lift_that_stands_out():
    flagged, z = scan_flags(
        {0: 0.05, 1: 0.62, 2: 0.08, 3: 0.04}, z_threshold=2.0, min_lift=0.25, floor=0.05
    )
    assert flagged == [1] and z[1] > 2.0
    flagged, _ = scan_flags(  # a clean model: every lift small, none flagged
        {0: 0.05, 1: 0.20, 2: 0.02, 3: 0.04}, z_threshold=2.0, min_lift=0.25, floor=0.05
    )
    assert flagged == []
