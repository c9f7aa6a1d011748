"""Fixed-position backdoors: the ``learned`` placement of the MESA search and detection.

A planted model whose backdoor answers only at one offset (the checkerboard's matched filter read
at that place alone): the search with ``learned`` placement concentrates its position
distribution pi there and its triggers are valid; ``per-image`` (the paper's random places)
finds nothing. Also: the straight-through stamp is exact, pi is stored and read back, and a
repair stamps where pi says while every other method's batches stay as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.ml.data import Normalizer
from engine.ml.mesa import (
    MesaConfig,
    open_search,
    position_stats,
    search,
    search_targets,
    top_positions,
    write_search_artifact,
)
from engine.ml.repair import FixedPatternSampler, build_repair_batch
from engine.ml.triggers import (
    Placement,
    sample_positions,
    stamp,
)
from engine.specs import build_spec
from engine.tasks.detect import flag_classes
from tests.ml.planted import CHECKER, CLASSES, SIZE, PlantedBackdoor, synthetic

SPOT = (8, 1)  # the offset where the planted backdoor answers (grid 10 x 10 on 12 x 12 images)


class FixedSpotBackdoor(PlantedBackdoor):
    """The planted checkerboard backdoor, read only where the patch's top-left is ``spot``."""

    def __init__(self, spot: tuple[int, int] = SPOT, target: int = 1):
        super().__init__(target=target)
        self.spot = spot
        with torch.no_grad():  # clean logits less sure (the search's probability has gradients)
            self.head.weight.mul_(0.2)
            self.head.bias.mul_(0.2)
            self.gain.mul_(2.0 / 3.0)  # target logit +5 with the checkerboard at the spot,
            self.threshold.fill_(1.5)  # about -4 on clean images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean(dim=(2, 3)))
        response = self.detector(x)[:, 0, self.spot[0], self.spot[1]]
        return logits + self.gain * (response - self.threshold)[:, None]


def setup(n: int = 512):
    images, labels = synthetic(n, seed=3)
    normalizer = Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return FixedSpotBackdoor().eval(), normalizer, images, labels


def config(placement: str, **overrides) -> MesaConfig:
    values = dict(
        betas=(0.8,),
        steps=150,
        batch_size=64,
        hidden=64,
        stats_every=50,
        sample_every=150,
        n_eval_triggers=32,
        eval_images=64,
        samples=64,
        channels_last=False,
        placement=placement,
    )
    values.update(overrides)
    return MesaConfig(**values)


def test_the_planted_model_answers_at_one_place_only():
    model, normalizer, images, _ = setup(64)
    x = images.float() / 255
    pattern = CHECKER.expand(3, 3, 3)
    at_spot = stamp(x, pattern, torch.tensor([SPOT]).expand(64, 2))
    elsewhere = stamp(x, pattern, torch.tensor([[2, 6]]).expand(64, 2))
    with torch.no_grad():
        assert (model(at_spot).argmax(1) == 1).float().mean() > 0.95
        assert (model(elsewhere).argmax(1) == 1).float().mean() < 0.5


def test_learned_placement_finds_a_fixed_position_backdoor_that_per_image_misses():
    model, normalizer, images, labels = setup()
    learned = search(model, normalizer, images, 1, config("learned"), labels=labels, seed=0)
    pi = learned.positions[0]
    assert pi is not None and tuple(pi.shape) == (SIZE - 2, SIZE - 2)
    stats = position_stats(pi)
    assert (stats["pos_top_row"], stats["pos_top_col"]) == SPOT
    assert stats["pos_top_share"] > 0.3
    assert stats["pos_entropy_ratio"] < 0.8
    assert top_positions(pi, 1)[0][:2] == list(SPOT)
    assert learned.validity(0.8) > 0.5
    assert learned.metrics["mesa/beta=0.8/pos_top_mass"] > 0.5
    assert float(learned.landing[0][SPOT]) > 0

    random_places = search(model, normalizer, images, 1, config("per-image"), labels=labels)
    assert random_places.positions == [None]
    assert random_places.validity(0.8) < 0.1
    assert "mesa/beta=0.8/pos_entropy" not in random_places.metrics


def test_without_a_scan_peak_the_learned_search_is_the_papers_search_exactly(tmp_path):
    """A backdoor that answers anywhere gives the scan no peak: the default (learned) search is
    then the paper's per-image one bit for bit, with no pi, so its repair stamps at random places
    (a pi learned over the whole image collapsed onto a few offsets and repaired worse); a
    detection's pairs still learn pi there (it raised the true target's validity)."""
    images, labels = synthetic(512, seed=3)
    normalizer = Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    model = PlantedBackdoor(target=1).eval()
    quick = dict(steps=60, sample_every=60, stats_every=30)
    learned = search(model, normalizer, images, 1, config("learned", **quick), labels=labels)
    paper = search(model, normalizer, images, 1, config("per-image", **quick), labels=labels)
    assert learned.positions == [None] and learned.landing == [None]
    assert learned.metrics == paper.metrics
    torch.testing.assert_close(learned.samples[0], paper.samples[0], rtol=0, atol=0)
    assert not any("pos_" in key for row in learned.history for key in row)
    write_search_artifact(learned, tmp_path / "search")  # no pi: a repair stamps at random places
    assert open_search(tmp_path / "search").positions == {}
    # Detection asks whether any trigger works: its pairs learn pi over every offset.
    pairs = [(0.8, 1, "detect/class=1")]
    found = search_targets(model, normalizer, images, pairs, config("learned", **quick))
    assert found.positions[0] is not None and found.positions[0].shape == (10, 10)


def test_detection_with_learned_placement_flags_the_fixed_position_target():
    model, normalizer, images, labels = setup()
    pairs = [(0.8, c, f"detect/class={c}") for c in range(CLASSES)]

    def scores(placement: str) -> dict[int, float]:
        result = search_targets(
            model, normalizer, images, pairs, config(placement), labels=labels, seed=0
        )
        return {c: result.metrics[f"detect/class={c}/validity"] for c in range(CLASSES)}

    learned = scores("learned")
    flagged, _ = flag_classes(learned, z_threshold=2.0, min_score=0.5, floor=0.05)
    assert flagged == [1], learned
    flagged, _ = flag_classes(scores("per-image"), z_threshold=2.0, min_score=0.5, floor=0.05)
    assert flagged == []


def test_random_placements_are_unchanged_by_the_position_fields():
    """per-image/per-batch configs read as before (no position keys) and carry no pi."""
    cfg = config("per-image")
    assert "position_alpha" not in cfg.to_json()
    assert "position_alpha" in config("learned").to_json()
    with pytest.raises(UserError, match="'per-image', 'per-batch' or 'learned'"):
        build_spec("mesa", overrides={"model": "m", "placement": "corner"})


def test_pi_is_stored_and_the_repair_stamps_where_it_says(tmp_path):
    model, normalizer, images, labels = setup(256)
    result = search(
        model, normalizer, images, 1, config("learned", steps=60, sample_every=60), labels=labels
    )
    write_search_artifact(result, tmp_path / "search")
    stats = (tmp_path / "search" / "stats.json").read_text()
    assert '"positions"' in stats and '"top"' in stats
    artifact = open_search(tmp_path / "search")
    torch.testing.assert_close(artifact.positions[0.8], result.positions[0].float())
    sampler = artifact.sampler(beta=0.8)
    x = torch.rand(32, 3, SIZE, SIZE)
    y = torch.zeros(32, dtype=torch.long)

    def batch(source, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        tg = torch.Generator().manual_seed(seed + 1)
        out = build_repair_batch(x, y, source, 1.0, g, Placement("per-image"), tg)
        return out, g.get_state()

    (stamped, _, _), state_mesa = batch(sampler)
    (_, _, _), state_fixed = batch(FixedPatternSampler(CHECKER.expand(3, 3, 3)))
    (_, _, _), state_none = batch(None)
    # The repair's own stream advanced alike whatever the source (the pairing).
    assert torch.equal(state_mesa, state_fixed) and torch.equal(state_mesa, state_none)
    # The stamps sit where pi puts them: draw the same places again from the trigger stream.
    tg = torch.Generator().manual_seed(6)
    artifact.sampler(beta=0.8).sample(32, tg)
    expected = sample_positions(artifact.positions[0.8], 32, tg)
    for ensemble in ("equal", "staircase", "round-robin"):  # every ensemble stamps from pi
        mixed = artifact.sampler(ensemble=ensemble).sample_positions(8, (SIZE, SIZE), tg)
        assert mixed.shape == (8, 2) and int(mixed.max()) <= SIZE - 3
    with pytest.raises(UserError, match="repair images of the size searched"):
        artifact.sampler(beta=0.8).sample_positions(4, (SIZE + 2, SIZE + 2), tg)
    changed = (stamped != x).any(1)  # (N, H, W) pixels the stamp touched
    for i, (r, c) in enumerate(expected.tolist()):
        rows, cols = changed[i].nonzero(as_tuple=True)
        assert rows.min() >= r and cols.min() >= c and rows.max() < r + 3 and cols.max() < c + 3


def test_fixed_offset_placement_for_the_attack():
    pos = Placement("at:4,7").sample(3, (12, 12), 3)
    assert pos.tolist() == [[4, 7]] * 3
    assert Placement("at:10,10").sample(1, (8, 8), 3).tolist() == [[5, 5]]  # clamped to fit
    assert Placement("at:4,7").fixed and Placement("corner").fixed
    assert not Placement("per-image").fixed
    with pytest.raises(UserError, match="at:ROW,COL"):
        Placement("at:4")


def test_train_spec_takes_a_fixed_offset_with_a_one_line_error():
    from engine.specs import build_spec

    spec = build_spec("train", overrides={"placement": "at:8, 8"})
    assert spec.placement == "at:8,8"
    assert build_spec("train", overrides={"placement": "corner"}).placement == "corner"
    with pytest.raises(UserError) as info:
        build_spec("train", overrides={"placement": "middle"})
    assert "at:ROW,COL" in str(info.value) and "\n" not in str(info.value)


def test_numpy_position_summaries():
    pi = np.full((4, 5), 1 / 20)
    stats = position_stats(pi)
    assert stats["pos_entropy_ratio"] == pytest.approx(1.0)
    assert stats["pos_top_mass"] == pytest.approx(1 / 20)  # 5 % of 20 cells: one cell
    pi = np.zeros((4, 5))
    pi[2, 3] = 1.0
    assert position_stats(pi)["pos_top_share"] == 1.0
    assert top_positions(pi, 1) == [[2, 3, 1.0]]
