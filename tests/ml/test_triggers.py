"""Triggers: the 51 canonical black/white ids, every kind, placements, and vectorised stamping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import UserError
from engine.ml.triggers import (
    MaskTrigger,
    PatchTrigger,
    Placement,
    blend,
    bw_orbit,
    bw_pattern,
    canonical_bw_ids,
    parse_trigger,
    stamp,
    stamp_reference,
)

# The paper's 51 black/white 3x3 triggers (one per class of the 512 patterns under the symmetries of
# the square and colour inversion).
PAPER_IDS = [
    0, 1, 2, 3, 5, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 23, 26, 27, 28, 29, 30, 40, 41,
    42, 43, 45, 56, 57, 58, 59, 61, 68, 69, 70, 78, 84, 85, 86, 94, 97, 98, 99, 101, 106, 108, 113,
    114, 170, 186,
]  # fmt: skip


def test_canonical_ids_equal_the_papers_list():
    assert canonical_bw_ids() == PAPER_IDS


def test_orbits_partition_the_512_patterns():
    orbits = [bw_orbit(i) for i in PAPER_IDS]
    assert sum(len(o) for o in orbits) == 512
    assert set().union(*orbits) == set(range(512))
    assert all(min(o) == i for o, i in zip(orbits, PAPER_IDS, strict=True))


def test_bw_bit_order_msb_top_left_same_on_all_channels():
    p = bw_pattern(170)
    assert p.shape == (3, 3, 3)
    expected = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    for c in range(3):
        assert torch.equal(p[c], expected)
    # 256 is the top-left bit alone, 1 the bottom-right bit alone.
    assert bw_pattern(256, 1)[0, 0, 0] == 1 and bw_pattern(256, 1).sum() == 1
    assert bw_pattern(1, 1)[0, 2, 2] == 1 and bw_pattern(1, 1).sum() == 1
    assert bw_pattern(170, 1).shape == (1, 3, 3)


def test_parse_bw_and_square():
    assert torch.equal(parse_trigger("bw:170"), bw_pattern(170))
    white = parse_trigger("square:white")
    assert white.shape == (3, 3, 3) and bool((white == 1.0).all())
    assert parse_trigger("square:white", channels=1).shape == (1, 3, 3)


def test_color_seeded_deterministic_in_unit_interval():
    a, b = parse_trigger("color:7"), parse_trigger("color:7")
    c = parse_trigger("color:8")
    assert a.shape == (3, 3, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    # Values are multiples of 1/256, as randint(0, 256) / 256 in the paper.
    assert torch.equal(a * 256, (a * 256).round())


def test_file_png_any_size_rgb_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    p = parse_trigger(f"file:{tmp_path / 't.png'}")
    assert p.shape == (3, 5, 5)
    assert torch.allclose(p, torch.tensor(rgb.transpose(2, 0, 1) / 255.0, dtype=torch.float32))

    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    g3 = parse_trigger(f"file:{tmp_path / 'g.png'}")
    assert g3.shape == (3, 4, 4)
    assert torch.equal(g3[0], g3[2])
    g1 = parse_trigger(f"file:{tmp_path / 'g.png'}", channels=1)
    assert g1.shape == (1, 4, 4)
    assert torch.allclose(g1[0], torch.tensor(grey / 255.0, dtype=torch.float32))


def test_file_npy_shapes(tmp_path):
    hw = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    np.save(tmp_path / "hw.npy", hw)
    p = parse_trigger(f"file:{tmp_path / 'hw.npy'}")
    assert p.shape == (3, 4, 4) and torch.allclose(p[1], torch.from_numpy(hw))

    chw = np.random.default_rng(1).random((3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "chw.npy", chw)
    assert torch.allclose(parse_trigger(f"file:{tmp_path / 'chw.npy'}"), torch.from_numpy(chw))

    hwc = np.random.default_rng(2).random((2, 2, 3)).astype(np.float32)
    np.save(tmp_path / "hwc.npy", hwc)
    q = parse_trigger(f"file:{tmp_path / 'hwc.npy'}")
    assert torch.allclose(q, torch.from_numpy(hwc.transpose(2, 0, 1)))

    # uint8-range values are scaled into [0, 1].
    np.save(tmp_path / "u8.npy", np.full((3, 3), 255, dtype=np.uint8))
    assert bool((parse_trigger(f"file:{tmp_path / 'u8.npy'}") == 1.0).all())


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("bw:512", "512"),
        ("bw:-1", "bw:-1"),
        ("bw:abc", "bw:abc"),
        ("color:x", "color:x"),
        ("square:red", "square:red"),
        ("plaid:3", "plaid:3"),
        ("file:/nonexistent/t.png", "/nonexistent/t.png"),
    ],
)
def test_bad_specs_name_the_value(spec, named):
    with pytest.raises(UserError) as info:
        parse_trigger(spec)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_trigger_kind_is_the_spec_kind_or_none():
    from engine.triggerspec import trigger_kind

    assert [trigger_kind(t) for t in ("bw:170", "color:3", "square:white", "file:/t.png")] == [
        "bw",
        "color",
        "square",
        "file",
    ]
    assert trigger_kind("bw") is None and trigger_kind("bwx:1") is None
    assert trigger_kind("plaid:3") is None and trigger_kind(None) is None


def test_non_square_file_refused(tmp_path):
    np.save(tmp_path / "rect.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(UserError, match="square"):
        parse_trigger(f"file:{tmp_path / 'rect.npy'}")


def test_unknown_placement_refused():
    with pytest.raises(UserError, match="diagonal"):
        Placement("diagonal")


def test_per_image_covers_every_offset_independently():
    g = torch.Generator().manual_seed(0)
    pos = Placement("per-image").sample(20000, (32, 32), 3, g)
    assert pos.shape == (20000, 2) and pos.dtype == torch.long
    for axis in (0, 1):
        assert set(pos[:, axis].tolist()) == set(range(30))  # 0..29 = 0..H-k, 29 included
    # Independent per image: many distinct offsets in one call, rows and cols not tied.
    assert len({tuple(p) for p in pos[:100].tolist()}) > 50
    assert not torch.equal(pos[:, 0], pos[:, 1])


def test_per_batch_one_offset_per_batch_with_the_scripts_off_by_one():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(3000):
        pos = Placement("per-batch").sample(16, (32, 32), 3, g)
        assert bool((pos == pos[0]).all())
        seen.update(pos[0].tolist())
    assert seen == set(range(29))  # 0..28: 29 = H-k is never drawn


def test_corner_fixed_bottom_right():
    pos = Placement("corner").sample(5, (32, 28), 3)
    assert pos.tolist() == [[29, 25]] * 5


def test_placement_refuses_a_patch_bigger_than_the_image():
    with pytest.raises(UserError, match="bigger"):
        Placement().sample(2, (28, 28), 29)


def test_placement_is_deterministic_for_a_seed():
    a = Placement().sample(50, (32, 32), 3, torch.Generator().manual_seed(5))
    b = Placement().sample(50, (32, 32), 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("per_image_pattern", [False, True])
@pytest.mark.parametrize("k", [3, 5])
def test_stamp_equals_the_per_image_loop(channels, per_image_pattern, k):
    g = torch.Generator().manual_seed(channels * 10 + k)
    n, h = 37, 28 if channels == 1 else 32
    images = torch.rand(n, channels, h, h, generator=g)
    shape = (n, channels, k, k) if per_image_pattern else (channels, k, k)
    patterns = torch.rand(shape, generator=g)
    positions = Placement().sample(n, (h, h), k, g)
    out = stamp(images, patterns, positions)
    assert torch.equal(out, stamp_reference(images, patterns, positions))
    assert not torch.equal(out, images)
    assert torch.equal(images, images.clone())  # input untouched: stamp returns a new tensor


def test_stamp_touches_only_the_patch():
    images = torch.zeros(2, 3, 8, 8)
    out = stamp(images, torch.ones(3, 3, 3), torch.tensor([[0, 0], [5, 5]]))
    assert out[0, :, :3, :3].eq(1).all() and out[1, :, 5:, 5:].eq(1).all()
    assert out.sum() == 2 * 27


def test_stamp_is_differentiable_in_the_pattern():
    images = torch.rand(4, 3, 8, 8)
    pattern = torch.rand(3, 3, 3, requires_grad=True)
    pos = torch.tensor([[0, 0], [1, 2], [5, 5], [3, 0]])
    out = stamp(images, pattern, pos)
    out.sum().backward()
    # Each of the 4 images pastes the pattern once.
    assert torch.equal(pattern.grad, torch.full((3, 3, 3), 4.0))

    batch = torch.rand(4, 3, 3, 3, requires_grad=True)
    (stamp(images, batch, pos) * 2).sum().backward()
    assert torch.equal(batch.grad, torch.full((4, 3, 3, 3), 2.0))


def test_patch_trigger_apply_stamps_the_pattern():
    trig = PatchTrigger(bw_pattern(170), Placement("corner"))
    out = trig.apply(torch.full((3, 3, 8, 8), 0.5))
    assert torch.equal(out[:, :, 5:, 5:], bw_pattern(170).expand(3, -1, -1, -1))
    assert out[:, :, :5, :].eq(0.5).all()


def test_blend_mask_trigger_math():
    images = torch.rand(2, 3, 4, 4)
    pattern = torch.rand(3, 4, 4)
    mask = torch.zeros(4, 4)
    mask[0, 0], mask[1, 1] = 1.0, 0.25
    out = blend(images, mask, pattern)
    assert torch.allclose(out[:, :, 0, 0], pattern[:, 0, 0].expand(2, 3))
    assert torch.allclose(out[:, :, 1, 1], 0.75 * images[:, :, 1, 1] + 0.25 * pattern[:, 1, 1])
    untouched = mask == 0
    assert torch.equal(out[:, :, untouched], images[:, :, untouched])
    assert torch.allclose(MaskTrigger(mask, pattern).apply(images), out)
    assert torch.allclose(blend(images, mask.unsqueeze(0), pattern), out)
