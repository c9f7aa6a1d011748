"""Datasets as uint8 tensors, decoded once and cached; batches built on the device.

Where a dataset is looked for, in order:
1. an imported copy under the data home (``mesa-tui data import SOURCE --name NAME``);
2. the decoded cache under the cache home (made on the first load from 3-5);
3. torchvision's files under the torchvision root (``MESA_TUI_DATA_ROOT``), downloaded when online;
4. for MNIST-style sets, the idx files where Debian's ``dataset-fashion-mnist`` puts them;
5. ``imagefolder:PATH`` decodes ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

The training loop never touches PIL or a DataLoader: augmentation (random crop with padding,
horizontal flip), trigger stamping and normalisation are batched tensor operations.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from engine import paths
from engine.catalog import (
    DEBIAN_IDX_DIRS,
    KNOWN,
    _read_meta,
    _safe_name,
    cache_path,
    imported_path,
)
from engine.errors import DatasetMissing, UnsafeFile, UserError
from store.environment import setting

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Dataset:
    """A whole dataset as tensors: images ``(N, C, H, W)`` uint8, labels int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sha256: str
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.classes,
            self.mean,
            self.std,
            self.sha256,
            self.source,
            self.meta,
        )


# ---------------------------------------------------------------------------------------------
# Storage format: one safetensors file, metadata holds classes, normalisation and the hash


def _content_hash(arrays: dict[str, np.ndarray], classes: list[str]) -> str:
    h = hashlib.sha256()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    h.update(json.dumps(classes).encode())
    return h.hexdigest()


def _save_arrays(
    path: Path, arrays: dict[str, np.ndarray], classes: list[str], mean, std, source: str
) -> str:
    digest = _content_hash(arrays, classes)
    meta = {
        "classes": json.dumps(classes),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "sha256": digest,
        "source": source,
        "format": "mesa-tui-dataset-1",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    try:
        np_save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def _load_stored(name: str, path: Path) -> Dataset:
    meta = _read_meta(path)
    arrays = np_load_file(str(path))
    classes = json.loads(meta["classes"])
    known = KNOWN.get(name)
    mean = tuple(known.mean) if known else tuple(json.loads(meta["mean"]))
    std = tuple(known.std) if known else tuple(json.loads(meta["std"]))
    return Dataset(
        name=name,
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]).long(),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]).long(),
        classes=classes,
        mean=mean,
        std=std,
        sha256=meta["sha256"],
        source=meta.get("source", str(path)),
    )


def _stats(train_x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = train_x.astype(np.float32) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)


# ---------------------------------------------------------------------------------------------
# Finding and loading


def _missing(name: str, looked: list[str], why: str) -> DatasetMissing:
    places = "; ".join(looked)
    return DatasetMissing(
        f"dataset '{name}' is not available ({why}); looked in: {places}. "
        f"Import a copy with: mesa-tui data import PATH_OR_ARCHIVE --name {name}"
    )


def _load_torchvision(name: str, download: bool) -> dict[str, np.ndarray] | None:
    """Decode a torchvision dataset; returns None when its files are absent and not downloadable."""
    import torchvision.datasets as tvd

    known = KNOWN[name]
    cls = getattr(tvd, known.torchvision_class)
    root = paths.torchvision_root()
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except Exception:  # missing files, no network, failed integrity check
            return None
        data = np.asarray(ds.data)
        if data.ndim == 3:  # MNIST-style (N, H, W)
            data = data[:, None]
        else:  # CIFAR-style (N, H, W, C)
            data = data.transpose(0, 3, 1, 2)
        out[f"{split}_x"] = np.ascontiguousarray(data.astype(np.uint8))
        out[f"{split}_y"] = np.asarray(ds.targets, dtype=np.int64)
        out["classes"] = list(ds.classes)
    return out


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte idx file; re-import the dataset")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_dir(directory: Path, classes: list[str]) -> dict[str, np.ndarray] | None:
    def find(stem: str) -> Path | None:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.exists():
                return p
        return None

    files = {
        "train_x": find("train-images-idx3-ubyte"),
        "train_y": find("train-labels-idx1-ubyte"),
        "test_x": find("t10k-images-idx3-ubyte"),
        "test_y": find("t10k-labels-idx1-ubyte"),
    }
    if not all(files.values()):
        return None
    out: dict = {k: _read_idx(p) for k, p in files.items() if p is not None}
    out["train_x"] = np.ascontiguousarray(out["train_x"][:, None])
    out["test_x"] = np.ascontiguousarray(out["test_x"][:, None])
    out["train_y"] = out["train_y"].astype(np.int64)
    out["test_y"] = out["test_y"].astype(np.int64)
    out["classes"] = classes
    return out


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of every image: any added, removed or changed file
    makes the decoded cache stale (a directory's own mtime misses changes in subfolders)."""
    h = hashlib.sha256()
    for dirpath, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for n in sorted(names):
            if Path(n).suffix.lower() in IMAGE_SUFFIXES:
                st = os.stat(os.path.join(dirpath, n))
                h.update(
                    f"{os.path.relpath(os.path.join(dirpath, n), folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode()
                )
    return h.hexdigest()[:32]


def load_dataset(name: str, download: bool | None = None) -> Dataset:
    """Load a dataset by name (see the module docstring for where it is looked for).

    ``download`` defaults to True unless ``MESA_TUI_OFFLINE=1``.
    """
    if download is None:
        download = (setting("MESA_TUI_OFFLINE") or "") not in ("1", "true", "yes")
    looked = []
    if name.startswith("imagefolder:"):
        folder = Path(name[12:]).expanduser()
        cached = cache_path(name)
        if not folder.is_dir():
            raise UserError(
                f"image folder '{folder}' does not exist; give a directory with train/ and test/"
            )
        source = f"{folder.resolve()}#{_folder_fingerprint(folder)}"
        if cached.exists() and _read_meta(cached).get("source") == source:
            return _load_stored(name, cached)
        arrays, classes = _decode_image_tree(_DirSource(folder))
        mean, std = _stats(arrays["train_x"])
        _save_arrays(cached, arrays, classes, mean, std, source)
        return _load_stored(name, cached)

    imported = imported_path(name)
    looked.append(str(imported))
    if imported.exists():
        return _load_stored(name, imported)
    cached = cache_path(name)
    looked.append(str(cached))
    if cached.exists():
        return _load_stored(name, cached)
    if name not in KNOWN:
        raise UserError(
            f"dataset '{name}' is unknown; use one of {', '.join(KNOWN)}, imagefolder:PATH, "
            f"or import it first with: mesa-tui data import PATH --name {name}"
        )
    arrays = None
    if name in DEBIAN_IDX_DIRS:
        looked.append(str(DEBIAN_IDX_DIRS[name]))
        classes = FASHION_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
        if DEBIAN_IDX_DIRS[name].is_dir():
            arrays = _load_idx_dir(DEBIAN_IDX_DIRS[name], classes)
    if arrays is None:
        looked.append(str(paths.torchvision_root()))
        arrays = _load_torchvision(name, download)
    if arrays is None:
        why = "download failed or is switched off" if download else "downloads are switched off"
        raise _missing(name, looked, why)
    classes = arrays.pop("classes")
    known = KNOWN[name]
    _save_arrays(cached, arrays, classes, known.mean, known.std, f"torchvision:{name}")
    return _load_stored(name, cached)


# ---------------------------------------------------------------------------------------------
# Safe import of an image folder from a directory or an archive


class _Source:
    """A read-only view of files: names relative to the root, and their bytes."""

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        return {n: self.read(n) for n in names}


class _DirSource(_Source):
    def __init__(self, root: Path):
        self.root = root

    def files(self) -> list[str]:
        out = []
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                p = Path(dirpath) / n
                if p.is_file() and not p.is_symlink():
                    out.append(p.relative_to(self.root).as_posix())
        return out

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _check_member_name(archive: Path, name: str) -> None:
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeFile(f"archive {archive} has an absolute path '{name}'; refusing to import it")
    if ".." in Path(name).parts or ".." in name.replace("\\", "/").split("/"):
        raise UnsafeFile(
            f"archive {archive} has a path with '..' ('{name}'); refusing to import it"
        )


class _TarSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(
                f"{path} is not a readable tar archive ({exc}); give a .tar, .tar.gz or .zip"
            ) from None
        self.members = {}
        for m in members:
            _check_member_name(path, m.name)
            if m.issym() or m.islnk():
                raise UnsafeFile(f"archive {path} has a link '{m.name}'; refusing to import it")
            if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
                raise UnsafeFile(
                    f"archive {path} has a device or fifo '{m.name}'; refusing to import it"
                )
            if m.isfile():
                self.members[m.name.removeprefix("./")] = m

    def files(self) -> list[str]:
        return list(self.members)

    def read(self, name: str) -> bytes:
        f = self.tar.extractfile(self.members[name])
        assert f is not None
        return f.read()

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        # One pass in archive order: random access into a compressed tar re-reads it from the start.
        wanted = set(names)
        out = {}
        for name, member in self.members.items():
            if name in wanted:
                f = self.tar.extractfile(member)
                assert f is not None
                out[name] = f.read()
        return out


class _ZipSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(
                f"{path} is not a readable zip archive ({exc}); give a .tar, .tar.gz or .zip"
            ) from None
        self.members = {}
        for info in infos:
            _check_member_name(path, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeFile(
                    f"archive {path} has a link '{info.filename}'; refusing to import it"
                )
            if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
                raise UnsafeFile(
                    f"archive {path} has a device or fifo '{info.filename}'; refusing to import it"
                )
            if not info.is_dir():
                self.members[info.filename] = info

    def files(self) -> list[str]:
        return list(self.members)

    def read(self, name: str) -> bytes:
        return self.zip.read(self.members[name])


def _open_source(source: Path) -> _Source:
    if source.is_dir():
        return _DirSource(source)
    if not source.exists():
        raise UserError(
            f"source '{source}' does not exist; give a directory or a .tar/.tar.gz/.zip"
        )
    lower = source.name.lower()
    if lower.endswith(".zip"):
        return _ZipSource(source)
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return _TarSource(source)
    raise UserError(f"source '{source}' is neither a directory nor a .tar/.tar.gz/.zip archive")


def _decode_one(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L") if img.mode in ("L", "1", "I;16") else img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise UserError(
            f"image '{name}' could not be decoded ({exc.__class__.__name__}); remove or fix it"
        ) from None


def _decode_image_tree(
    source: _Source, progress: Callable[[int, int], None] | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    files = [f for f in source.files() if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    # Find the prefix below which train/ and test/ sit (archives often wrap them in one folder).
    prefixes = {}
    for f in files:
        parts = f.split("/")
        for i, part in enumerate(parts[:-2]):
            if part in ("train", "test"):
                prefixes.setdefault("/".join(parts[:i]), set()).add(part)
                break
    roots = [p for p, splits in prefixes.items() if splits == {"train", "test"}]
    if len(roots) != 1:
        raise UserError(
            "the source must hold an image folder laid out as train/<class>/* and test/<class>/* "
            f"(found {len(files)} images, {'no' if not roots else len(roots)} matching roots)"
        )
    root = roots[0]
    lead = f"{root}/" if root else ""
    split_files: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for f in files:
        if not f.startswith(lead):
            continue
        parts = f[len(lead) :].split("/")
        if len(parts) >= 3 and parts[0] in split_files:
            split_files[parts[0]].append((parts[1], f))
    classes = sorted({c for c, _ in split_files["train"]})
    test_classes = {c for c, _ in split_files["test"]}
    if not classes or not test_classes <= set(classes):
        extra = sorted(test_classes - set(classes))
        raise UserError(
            f"test/ has classes missing from train/ ({', '.join(extra[:5])}); make the class folders match"
        )
    index = {c: i for i, c in enumerate(classes)}
    total = sum(len(v) for v in split_files.values())
    done = 0
    arrays: dict[str, np.ndarray] = {}
    shape = None
    blobs = source.read_many([f for items in split_files.values() for _, f in items])
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for split in ("train", "test"):
            items = sorted(split_files[split], key=lambda t: t[1])
            images = []
            chunk = 4096
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                # PIL releases the GIL while decoding, so threads use every core.
                images += list(pool.map(lambda t: _decode_one(blobs[t[1]], t[1]), part))
                done += len(part)
                if progress:
                    progress(done, total)
            for img, (_, f) in zip(images, items, strict=True):
                if shape is None:
                    shape = img.shape
                elif img.shape != shape:
                    raise UserError(
                        f"image '{f}' is {img.shape[1]}x{img.shape[0]}, others are {shape[1]}x{shape[0]}; "
                        "all images must have one size"
                    )
            stacked = (
                np.stack(images) if images else np.zeros((0, *(shape or (32, 32, 3))), np.uint8)
            )
            stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
            labels = np.array([index[c] for c, _ in items], dtype=np.int64)
            # A fixed shuffle, so that the first N images of a split are a fair sample of classes.
            order = np.random.default_rng(0).permutation(len(items))
            arrays[f"{split}_x"] = np.ascontiguousarray(stacked[order])
            arrays[f"{split}_y"] = labels[order]
    return arrays, classes


def import_dataset(
    source: str | Path, name: str, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Decode an image folder (directory or archive) into the data home; nothing is extracted.

    Archive members are validated before anything is decoded: absolute paths, ``..``, links and
    device files refuse the whole archive. The result is written atomically.
    """
    safe = _safe_name(name)
    src = _open_source(Path(source).expanduser())
    arrays, classes = _decode_image_tree(src, progress)
    mean, std = (KNOWN[name].mean, KNOWN[name].std) if name in KNOWN else _stats(arrays["train_x"])
    if name in KNOWN and len(classes) != KNOWN[name].classes:
        raise UserError(
            f"'{source}' has {len(classes)} classes but {name} has {KNOWN[name].classes}; "
            "import it under another --name"
        )
    target = paths.datasets_dir() / f"{safe}.safetensors"
    digest = _save_arrays(target, arrays, classes, mean, std, str(source))
    return {
        "name": name,
        "path": str(target),
        "classes": len(classes),
        "train": int(arrays["train_x"].shape[0]),
        "test": int(arrays["test_x"].shape[0]),
        "sha256": digest,
    }


# ---------------------------------------------------------------------------------------------
# Splits and batches (tensor operations only)


def defender_split(
    n_test: int, fraction: float = 0.8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's split of the test set: a fixed permutation into defender and held-out indices
    (8,000 and 2,000 on CIFAR-10 with the default fraction)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"defender fraction {fraction} must be between 0 and 1 (exclusive)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_test, generator=g)
    cut = int(round(n_test * fraction))
    return perm[:cut], perm[cut:]


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : min(start + batch_size, stop)]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` to pixel-space floats in [0, 1]."""
    return x.float().div_(255.0)


class Normalizer:
    """Per-channel normalisation as one broadcast operation (kept with the model's artifact)."""

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu"
    ):
        self.mean_values = tuple(float(m) for m in mean)
        self.std_values = tuple(float(s) for s in std)
        self.mean = torch.tensor(self.mean_values, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.std_values, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inplace(self, x: torch.Tensor) -> torch.Tensor:
        """The same values written into ``x`` (a batch the caller owns): no new allocation."""
        return x.sub_(self.mean).div_(self.std)


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None,
    padding: int = 4,
    flip: bool = True,
    size: int | None = None,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Random crop of the padded image and random horizontal flip, per image, as one gather.

    ``padding_mode`` is ``zeros`` (the usual CIFAR crop) or ``reflect`` (the border mirrored
    without repeating the edge pixel, as ``torch.nn.functional.pad`` does; the pad must be smaller
    than the image). Reflection is computed in the gather's indices, so it works on uint8 and
    copies nothing. ``size`` (default: the image's own) is the side of the square window cut from
    the padded image: a smaller window is a cheaper training input at the same pixel scale (no
    resizing). On uint8 batches (before the float conversion) it moves a quarter of the bytes.
    The random draws are, in order: row offsets, column offsets, flips.
    """
    n, c, in_h, in_w = x.shape
    h, w = (in_h, in_w) if size is None else (size, size)
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding mode {padding_mode!r} is unknown; use zeros or reflect")
    if padding_mode == "reflect" and padding >= min(in_h, in_w):
        raise ValueError(
            f"reflect padding {padding} needs images bigger than it, not {in_h}x{in_w}"
        )
    if h > in_h + 2 * padding or w > in_w + 2 * padding:
        raise ValueError(f"crop size {size} is bigger than the padded {in_h}x{in_w} images")
    device = x.device
    span_h, span_w = in_h + 2 * padding - h, in_w + 2 * padding - w
    if span_h > 0 or span_w > 0:
        dy = torch.randint(0, span_h + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, span_w + 1, (n,), generator=generator).to(device)
    else:
        dy = dx = torch.zeros(n, dtype=torch.long, device=device)
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    cols = ar_w.expand(n, w)
    if flip:
        # A flipped crop reads its window's columns in reverse order.
        flipped = (torch.rand(n, generator=generator) < 0.5).to(device)
        cols = torch.where(flipped[:, None], (w - 1 - ar_w).expand(n, w), cols)
    # Each output pixel's row and column in the padded image.
    rows = dy[:, None] + ar_h  # (n, h)
    cols = dx[:, None] + cols  # (n, w)
    if padding_mode == "reflect":
        # Back to the unpadded image, mirrored at its borders: -1 -> 1, in_h -> in_h - 2.
        rows = _reflect(rows - padding, in_h)
        cols = _reflect(cols - padding, in_w)
        src_w = in_w
    else:
        if padding > 0:
            x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        src_w = x.shape[3]
    # One flat index per output pixel into the source image: row * W + col.
    flat = (rows[:, :, None] * src_w + cols[:, None, :]).view(n, 1, h * w)
    return x.reshape(n, c, -1).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in [-size + 1, 2 * size - 2] mirrored into [0, size - 1] (edge not repeated)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)
