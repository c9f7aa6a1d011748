"""Datasets: safe import, the decoded cache, splits, augmentation, batches, missing data."""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.catalog import DEBIAN_IDX_DIRS
from engine.errors import DatasetMissing, UnsafeFile, UserError
from engine.ml import data as data_mod
from engine.ml.data import (
    Normalizer,
    augment,
    batch_indices,
    defender_split,
    import_dataset,
    load_dataset,
    to_float,
)

# Deliberately not in alphabetical order on disk creation; value = the pixel value of the class.
CLASS_VALUES = {"zebra": 200, "apple": 40, "mango": 120}
ALPHABETICAL = ["apple", "mango", "zebra"]


def make_image_tree(root: Path, size: int = 8, per_class: dict[str, int] | None = None) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``; every image of a class is one
    flat grey value (``CLASS_VALUES``), so a label can be checked against its pixels."""
    per_class = per_class or {"train": 4, "test": 2}
    for split, count in per_class.items():
        for cls, value in CLASS_VALUES.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((size, size, 3), value, dtype=np.uint8)
                pixels[0, 0] = (value, i, 7)  # images of a class differ in one pixel
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def _add_tree_to_tar(tar: tarfile.TarFile, tree: Path, prefix: str = "") -> None:
    for p in sorted(tree.rglob("*.png")):
        tar.add(p, arcname=prefix + p.relative_to(tree).as_posix())


def make_tar(path: Path, tree: Path, prefix: str = "") -> Path:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        _add_tree_to_tar(tar, tree, prefix)
    return path


def make_zip(path: Path, tree: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(tree.rglob("*.png")):
            z.write(p, prefix + p.relative_to(tree).as_posix())
    return path


def files_under(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def check_labels_match_pixels(x: torch.Tensor, y: torch.Tensor) -> None:
    for img, label in zip(x, y, strict=True):
        assert int(img[0, 4, 4]) == CLASS_VALUES[ALPHABETICAL[int(label)]]


# ---------------------------------------------------------------------------------------------
# Import


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [
        ("dir", ""),
        ("tar", ""),
        ("tar.gz", ""),
        ("zip", ""),
        ("tar", "wrapped/"),
        ("tar.gz", "./cifar-jpeg/"),
        ("zip", "wrapped/"),
    ],
)
def test_import_directory_and_archives(tmp_path, isolated_home, kind, prefix):
    tree = make_image_tree(tmp_path / "tree")
    if kind == "dir":
        source = tree
        if prefix:
            source = tmp_path / "outer"
            shutil.copytree(tree, source / prefix)
    elif kind.startswith("tar"):
        source = make_tar(tmp_path / f"images.{kind}", tree, prefix)
    else:
        source = make_zip(tmp_path / "images.zip", tree, prefix)

    info = import_dataset(source, "tiny")
    assert (info["classes"], info["train"], info["test"]) == (3, 12, 6)
    assert Path(info["path"]).is_relative_to(isolated_home)

    ds = load_dataset("tiny")
    assert ds.classes == ALPHABETICAL
    assert ds.train_x.shape == (12, 3, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (6, 3, 8, 8)
    assert ds.train_y.dtype == torch.int64
    assert sorted(ds.train_y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    check_labels_match_pixels(ds.train_x, ds.train_y)
    check_labels_match_pixels(ds.test_x, ds.test_y)
    assert ds.sha256 == info["sha256"]


def test_import_hash_is_the_same_for_every_container(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    a = import_dataset(tree, "a")["sha256"]
    b = import_dataset(make_tar(tmp_path / "t.tar.gz", tree, "top/"), "b")["sha256"]
    c = import_dataset(make_zip(tmp_path / "t.zip", tree), "c")["sha256"]
    assert a == b == c


def test_import_of_a_folder_without_train_and_test_is_refused(tmp_path, isolated_home):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="train/<class>"):
        import_dataset(tmp_path / "flat", "flat")
    assert files_under(isolated_home) == []


def _hostile_tar_members(case: str) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    def regular(name: str) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.size = 3
        return info, b"abc"

    def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        return info, None

    return {
        "absolute": [regular("/tmp/evil.png")],
        "dotdot": [regular("train/cat/../../../evil.png")],
        "symlink": [special("train/apple/link.png", tarfile.SYMTYPE, "/etc/passwd")],
        "hardlink": [special("train/apple/hard.png", tarfile.LNKTYPE, "/etc/passwd")],
        "chardev": [special("train/apple/dev.png", tarfile.CHRTYPE)],
        "blockdev": [special("train/apple/blk.png", tarfile.BLKTYPE)],
        "fifo": [special("train/apple/fifo.png", tarfile.FIFOTYPE)],
    }[case]


@pytest.mark.parametrize(
    "case", ["absolute", "dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo"]
)
@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_hostile_tar_refused_and_nothing_left(tmp_path, isolated_home, case, suffix):
    tree = make_image_tree(tmp_path / "tree")
    archive = tmp_path / f"hostile.{suffix}"
    with tarfile.open(archive, "w:gz" if suffix == "tar.gz" else "w") as tar:
        _add_tree_to_tar(tar, tree)  # an otherwise valid image folder
        for info, payload in _hostile_tar_members(case):
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    with pytest.raises(UnsafeFile) as exc:
        import_dataset(archive, "x")
    assert exc.value.exit_code == 2
    reason = {"absolute": "absolute", "dotdot": "'..'", "symlink": "link", "hardlink": "link"}
    assert reason.get(case, "device or fifo") in str(exc.value)
    assert str(archive) in str(exc.value) and "refusing" in str(exc.value)
    assert files_under(isolated_home) == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink"])
def test_hostile_zip_refused_and_nothing_left(tmp_path, isolated_home, case):
    tree = make_image_tree(tmp_path / "tree")
    archive = make_zip(tmp_path / "hostile.zip", tree)
    with zipfile.ZipFile(archive, "a") as z:
        if case == "absolute":
            z.writestr(zipfile.ZipInfo("/tmp/evil.png"), b"abc")
        elif case == "dotdot":
            z.writestr("train/apple/../../../evil.png", b"abc")
        else:
            info = zipfile.ZipInfo("train/apple/link.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    with pytest.raises(
        UnsafeFile, match={"absolute": "absolute", "dotdot": "'..'"}.get(case, "link")
    ):
        import_dataset(archive, "x")
    assert files_under(isolated_home) == []


def test_bad_names_and_sources(tmp_path, isolated_home):
    tree = make_image_tree(tmp_path / "tree")
    for bad in ("../up", "a/b", ".hidden", ""):
        with pytest.raises(UserError):
            import_dataset(tree, bad)
    with pytest.raises(UserError, match="does not exist"):
        import_dataset(tmp_path / "nope", "x")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(UserError, match="junk.tar"):
        import_dataset(tmp_path / "junk.tar", "x")
    assert files_under(isolated_home) == []


# ---------------------------------------------------------------------------------------------
# The decoded cache


def test_imagefolder_loads_and_second_load_reads_the_cache(tmp_path, monkeypatch):
    tree = make_image_tree(tmp_path / "tree")
    name = f"imagefolder:{tree}"
    first = load_dataset(name)
    assert first.classes == ALPHABETICAL
    assert first.train_x.shape == (12, 3, 8, 8)
    check_labels_match_pixels(first.train_x, first.train_y)
    assert len(first.mean) == 3 and len(first.std) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_decode_image_tree", no_decoding)
    second = load_dataset(name)
    assert second.sha256 == first.sha256
    assert torch.equal(second.train_x, first.train_x)
    assert torch.equal(second.test_y, first.test_y)
    # The hash is the content's: the same images imported under another name hash the same.
    monkeypatch.undo()
    assert import_dataset(tree, "copy")["sha256"] == first.sha256


def test_missing_imagefolder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_missing_dataset_says_which_where_and_how(isolated_home):
    with pytest.raises(DatasetMissing) as exc:
        load_dataset("cifar100")
    msg = str(exc.value)
    assert "'cifar100'" in msg
    assert str(isolated_home) in msg  # where it looked (the data home and the cache)
    assert "mesa-tui data import" in msg and "--name cifar100" in msg
    assert "\n" not in msg
    assert exc.value.exit_code == 2


def test_unknown_dataset_name():
    with pytest.raises(UserError, match="nosuchset"):
        load_dataset("nosuchset")


@pytest.mark.skipif(
    not DEBIAN_IDX_DIRS["fashion-mnist"].is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make test-data installs it)",
)
def test_fashion_mnist_from_debian_then_from_the_cache(monkeypatch):
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.train_x.dtype == torch.uint8
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    assert len(ds.mean) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_load_idx_dir", fail)
    monkeypatch.setattr(data_mod, "_load_torchvision", fail)
    again = load_dataset("fashion-mnist")
    assert again.sha256 == ds.sha256
    assert torch.equal(again.test_y, ds.test_y)


# ---------------------------------------------------------------------------------------------
# Splits, batches, augmentation


def test_defender_split_of_the_paper():
    defender, held_out = defender_split(10000)
    assert (len(defender), len(held_out)) == (8000, 2000)
    assert set(defender.tolist()).isdisjoint(held_out.tolist())
    assert sorted(defender.tolist() + held_out.tolist()) == list(range(10000))
    again, _ = defender_split(10000)
    assert torch.equal(again, defender)
    other, _ = defender_split(10000, seed=1)
    assert not torch.equal(other, defender)
    half, rest = defender_split(10000, fraction=0.5)
    assert (len(half), len(rest)) == (5000, 5000)
    with pytest.raises(UserError, match="1.5"):
        defender_split(10000, fraction=1.5)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_indices_cover_every_index_once(drop_last):
    g = torch.Generator().manual_seed(0)
    batches = list(batch_indices(103, 10, g, drop_last=drop_last))
    flat = torch.cat(batches).tolist()
    assert len(flat) == len(set(flat))
    if drop_last:
        assert len(flat) == 100 and all(len(b) == 10 for b in batches)
    else:
        assert sorted(flat) == list(range(103)) and len(batches[-1]) == 3
    assert flat[:10] != list(range(10))  # shuffled
    ordered = torch.cat(list(batch_indices(25, 10, None, shuffle=False))).tolist()
    assert ordered == list(range(25))


def test_to_float_and_normalizer():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f[0, :, 0, 1], torch.tensor([1.0, 0.4]))
    out = Normalizer((0.5, 0.2), (0.5, 0.1))(f)
    assert torch.allclose(out[0, 0, 0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(out[0, 1, 0], torch.tensor([0.0, 2.0]), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_shape_and_determinism(channels):
    x = torch.rand(16, channels, 28, 28)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_on_uint8_equals_augment_on_floats():
    # Training crops and flips the uint8 batch before the float conversion; same result.
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8)
    on_bytes = augment(x, torch.Generator().manual_seed(5))
    on_floats = augment(to_float(x), torch.Generator().manual_seed(5))
    assert on_bytes.dtype == torch.uint8
    assert torch.equal(to_float(on_bytes), on_floats)


def test_normalizer_inplace_equals_the_copying_call():
    norm = Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    x = torch.rand(4, 3, 5, 5)
    expected = norm(x)
    out = norm.inplace(x)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(out, expected)


def test_augment_flip_only_mirrors_some_images():
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 54


def test_augment_crop_shifts_content_with_zero_padding():
    n, h = 200, 16
    x = torch.rand(n, 3, h, h) + 0.1  # no zeros, so padding is recognisable
    out = augment(x, torch.Generator().manual_seed(1), padding=4, flip=False)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = []
    for i in range(n):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + h])
        ]
        assert len(matches) == 1  # each output is exactly one shifted window of its own image
        shifts.append(matches[0])
    assert len(set(shifts)) > 40  # offsets vary per image
    assert {dy for dy, _ in shifts} == set(range(9))
    # A known pixel moves by the shift: a marker at (8, 8) lands at (8 - dy + 4, 8 - dx + 4).
    marker = torch.zeros(1, 1, h, h)
    marker[0, 0, 8, 8] = 1.0
    moved = augment(marker.expand(50, 1, h, h), torch.Generator().manual_seed(2), flip=False)
    for img in moved:
        assert img.sum() == 1.0
    rows = {int(img[0].nonzero()[0, 0]) for img in moved}
    assert rows <= set(range(4, 13)) and len(rows) > 3


def test_augment_crop_and_flip_together_keep_pixel_values():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = augment(x, torch.Generator().manual_seed(0), padding=2, flip=True)
    for o, i in zip(out, x, strict=True):
        nonzero = o[o != 0]
        assert set(nonzero.tolist()) <= set(i.flatten().tolist())


def test_augment_smaller_window_is_one_crop_of_the_padded_image():
    n, h, size = 120, 12, 8
    x = torch.rand(n, 3, h, h) + 0.1
    out = augment(x, torch.Generator().manual_seed(3), padding=2, flip=False, size=size)
    assert out.shape == (n, 3, size, size)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(n):
        matches = [
            (dy, dx)
            for dy in range(h + 4 - size + 1)
            for dx in range(h + 4 - size + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + size, dx : dx + size])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    # Every window position of the 16-pixel padded image is reachable: offsets 0..8.
    assert {dy for dy, _ in offsets} == set(range(9))
    # The full-size call is unchanged by the new argument (same draws, same output).
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(augment(x, g1), augment(x, g2, size=h))


def test_augment_refuses_a_window_bigger_than_the_padded_image():
    with pytest.raises(ValueError, match="crop size 20"):
        augment(torch.rand(2, 3, 8, 8), None, padding=4, size=20)


def _reference_crops(x, seed, padding, size, mode):
    """Per-image loop: pad with torch's own padding, cut the window, mirror it; same draws."""
    n, _, h_in, w_in = x.shape
    h = w = size or h_in
    g = torch.Generator().manual_seed(seed)
    span_h, span_w = h_in + 2 * padding - h, w_in + 2 * padding - w
    dy = torch.randint(0, span_h + 1, (n,), generator=g)
    dx = torch.randint(0, span_w + 1, (n,), generator=g)
    flipped = torch.rand(n, generator=g) < 0.5
    out = []
    for i in range(n):
        img = x[i : i + 1].float()
        padded = torch.nn.functional.pad(img, (padding,) * 4, mode=mode)[0]
        win = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(win.flip(-1) if flipped[i] else win)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize(("padding", "size"), [(1, None), (2, None), (3, 7), (4, 9), (2, 12)])
def test_augment_padding_modes_equal_a_per_image_loop(mode, padding, size):
    x = torch.randint(0, 256, (40, 3, 9, 9), dtype=torch.uint8)
    if size is not None and size > 9 + 2 * padding:
        pytest.skip("window bigger than the padded image")
    padding_mode = "zeros" if mode == "constant" else "reflect"
    if padding_mode == "reflect" and padding >= 9:
        pytest.skip("reflect needs a pad smaller than the image")
    out = augment(x, torch.Generator().manual_seed(7), padding, True, size, padding_mode)
    assert out.dtype == torch.uint8  # reflection is index arithmetic: bytes stay bytes
    expected = _reference_crops(x, 7, padding, size, mode)
    assert torch.equal(out.float(), expected)


def test_augment_reflect_mirrors_without_repeating_the_edge():
    # A 1x4 ramp padded by 2 on the left reads 2 1 | 0 1 2 3: the edge pixel is not repeated.
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(64, 1, 4, 4).contiguous()
    out = augment(x, torch.Generator().manual_seed(0), 2, False, None, "reflect")
    rows = {tuple(o[0, 0].tolist()) for o in out}
    assert (2, 1, 0, 1) in rows and (2, 3, 2, 1) in rows
    assert all(set(r) <= {0, 1, 2, 3} for r in rows)


def test_augment_refuses_a_reflect_pad_as_big_as_the_image():
    with pytest.raises(ValueError, match="reflect padding 4"):
        augment(torch.rand(2, 3, 4, 4), None, padding=4, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding mode 'mirror'"):
        augment(torch.rand(2, 3, 8, 8), None, padding_mode="mirror")
