"""``mesa-tui model import`` of BackdoorBench attack results (issue 28).

The files are built here in the layout SCLBD/BackdoorBench's ``utils/save_load_attack.py``
``save_attack_result`` writes (a ``torch.save`` of one dict; the poisoned sets as
``prepro_cls_DatasetBD_v2.retrieve_state()`` with numpy arrays and numpy-integer keys), from a
PreAct-ResNet-18 written in this file after BackdoorBench's ``models/preact_resnet.py``, so the
import is checked against BackdoorBench's network and not against our own. Then the malicious
files: a ``__reduce__`` payload (which must not run), pickled classes, object arrays; unknown
architectures; options that disagree with the file; and a search and a repair of the imported
model through the command line.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from mesa_tui.cli import app

runner = CliRunner()
BB_CIFAR_MEAN, BB_CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


# ---------------------------------------------------------------------------------------------
# BackdoorBench's PreAct-ResNet-18, as its models/preact_resnet.py defines it: pre-activation
# basic blocks (bn1, conv1, bn2, conv2, a 1x1 convolution as shortcut.0 where the shape changes),
# a 3x3 stem conv1 without batch norm, four stages of two blocks, 4x4 average pooling on 32 px
# inputs, and a linear head.


class BBPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.ind = None  # BackdoorBench's channel selector; not a parameter
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class BBPreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._stage(64, 1)
        self.layer2 = self._stage(128, 2)
        self.layer3 = self._stage(256, 2)
        self.layer4 = self._stage(512, 2)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(512, num_classes)

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(BBPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


def bb_network(seed: int = 0, classes: int = 10) -> BBPreActResNet18:
    torch.manual_seed(seed)
    net = BBPreActResNet18(classes)
    # Trained-looking batch-norm statistics and affine terms, so every buffer must arrive.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.num_batches_tracked.fill_(3910)
    return net.eval()


def retrieve_state(poisoned: np.ndarray, n: int, folder: str, target: int, subset=None) -> dict:
    """``prepro_cls_DatasetBD_v2.retrieve_state()`` of a set whose poisoned images BackdoorBench
    saved to disk (its default): the container maps each poisoned index (a numpy integer, as it
    iterates a numpy index array) to the PNG's path and [backdoor label, original label]."""
    indicator = np.zeros(n)
    indicator[poisoned] = 1
    rng = np.random.default_rng(0)
    original = rng.integers(0, 10, n)
    data_dict = {
        index: {
            "path": f"{folder}/{original[index]}/{index}.png",
            "other_info": [target, int(original[index])],
        }
        for index in np.arange(n)
        if indicator[index] == 1
    }
    index_array = np.arange(n) if subset is None else np.arange(n)[subset]
    return {
        "bd_data_container": {
            "save_folder_path": folder,
            "data_dict": data_dict,
            "save_file_format": ".png",
        },
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": index_array,
        "poison_indicator": indicator,
        "save_folder_path": folder,
    }


def attack_result(net: nn.Module, **changes) -> dict:
    """The dict ``save_attack_result`` hands to ``torch.save`` (a badnet run on CIFAR-10)."""
    save = "./record/badnet_0_1"
    result = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": net.state_dict(),
        "data_path": "./data/cifar10",
        "img_size": (32, 32, 3),
        "clean_data": "cifar10",
        "bd_train": retrieve_state(np.arange(0, 200, 10), 200, f"{save}/bd_train_dataset", 0),
        "bd_test": retrieve_state(
            np.arange(1, 50), 50, f"{save}/bd_test_dataset", 0, subset=np.arange(1, 50)
        ),
    }
    result.update(changes)
    return {k: v for k, v in result.items() if v is not ...}


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_under(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# A file in BackdoorBench's layout


def test_backdoorbench_and_our_preact_resnet18_name_their_layers_alike():
    """The key mapping for preactresnet18 is the identity (engine.ml.backdoorbench.KEY_RULES):
    every tensor of BackdoorBench's network has the same name and shape in ours."""
    from engine.ml.models import build_model

    theirs = {k: v.shape for k, v in BBPreActResNet18(10).state_dict().items()}
    ours = {k: v.shape for k, v in build_model("preact-resnet18", 10, 3).state_dict().items()}
    assert theirs == ours


def test_a_backdoorbench_attack_result_imports_with_its_own_metadata(tmp_path, isolated_home):
    net = bb_network(1)
    torch.save(attack_result(net), tmp_path / "attack_result.pt")
    result = invoke("model", "import", tmp_path / "attack_result.pt", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["source"] == "backdoorbench" and info["arch"] == "preact-resnet18"
    assert str(isolated_home) in info["artifact"]

    from engine.ml.artifacts import load_model, read_manifest

    model, meta, manifest = load_model(info["artifact"])
    assert (meta.arch, meta.num_classes, meta.in_channels) == ("preact-resnet18", 10, 3)
    assert meta.image_size == (32, 32) and meta.dataset == "cifar10"
    # BackdoorBench's CIFAR-10 normalisation (its get_transform's Normalize), not mesa-tui's.
    assert meta.mean == BB_CIFAR_MEAN and meta.std == BB_CIFAR_STD
    provenance = manifest["spec"]["backdoorbench"]
    assert provenance["model_name"] == "preactresnet18" and provenance["clean_data"] == "cifar10"
    assert provenance["data_path"] == "./data/cifar10" and provenance["img_size"] == [32, 32, 3]
    assert provenance["poisoned_train"] == 20 and provenance["poisoned_test"] == 49
    assert read_manifest(info["artifact"])["kind"] == "model"

    # The same function: BackdoorBench's network and ours give the same logits.
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected, got = net(x), model.eval()(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-5), (expected - got).abs().max()

    shown = invoke("model", "show", info["artifact"])
    assert shown.exit_code == 0 and '"arch": "preact-resnet18"' in shown.stdout


def test_variants_backdoorbench_writes_also_import(tmp_path):
    """A DataParallel-trained model ('module.' keys), no bd_train (save_attack_result's default),
    keys the attack added, extra numpy scalars, and no img_size (taken from BackdoorBench's
    input shape of the dataset)."""
    net = bb_network(2)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    obj = attack_result(
        net,
        model=state,
        bd_train=None,
        img_size=...,
        num_classes=np.int64(10),
        extra_cross_ratio=np.float64(2.0),
        clean_acc=np.float32(0.93),
    )
    torch.save(obj, tmp_path / "attack_result.pt")
    out = tmp_path / "art"
    result = invoke("model", "import", tmp_path / "attack_result.pt", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    from engine.ml.artifacts import load_model

    model, meta, _ = load_model(out)
    assert meta.image_size == (32, 32) and meta.num_classes == 10
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_file_written_with_numpy_1_imports(tmp_path):
    """numpy 1.x pickles its arrays as numpy.core.multiarray, numpy 2 as numpy._core.multiarray:
    a BackdoorBench file from either loads."""
    net = bb_network(3)
    torch.save(attack_result(net), tmp_path / "new.pt")
    with (
        zipfile.ZipFile(tmp_path / "new.pt") as zin,
        zipfile.ZipFile(tmp_path / "old.pt", "w") as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item.filename, data)
    result = invoke("model", "import", tmp_path / "old.pt", "--out", tmp_path / "art")
    assert result.exit_code == 0, result.output
    assert "BackdoorBench" in result.stdout and "preact-resnet18" in result.stdout


def test_missing_clean_data_needs_normalize_and_options_must_agree(tmp_path, isolated_home):
    net = bb_network(4)
    torch.save(attack_result(net, clean_data=...), tmp_path / "nodata.pt")
    one_line_error(invoke("model", "import", tmp_path / "nodata.pt"), "clean_data", "--normalize")
    ok = invoke("model", "import", tmp_path / "nodata.pt", "--normalize", "cifar10", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["std"] == list(BB_CIFAR_STD)

    torch.save(attack_result(net), tmp_path / "attack_result.pt")
    before = files_under(isolated_home)
    for args, fragment in [
        (("--arch", "resnet18"), "--arch resnet18"),
        (("--classes", "100"), "--classes 100"),
        (("--normalize", "cifar100"), "--normalize cifar100"),
        (("--channels", "1"), "--channels 1"),
    ]:
        line = one_line_error(
            invoke("model", "import", tmp_path / "attack_result.pt", *args), fragment
        )
        assert "attack_result.pt" in line
    assert files_under(isolated_home) == before
    # Options that agree with the file (ours or BackdoorBench's name) are fine.
    agree = ("--arch", "preactresnet18", "--classes", "10", "--normalize", "cifar10")
    assert invoke("model", "import", tmp_path / "attack_result.pt", *agree).exit_code == 0


def test_a_backdoorbench_defense_result_imports_with_its_dataset_named(tmp_path):
    """save_defense_result writes only model_name, num_classes and model: the dataset comes from
    --normalize, the input size from BackdoorBench's shape of that dataset."""
    net = bb_network(11)
    obj = {"model_name": "preactresnet18", "num_classes": 10, "model": net.state_dict()}
    torch.save(obj, tmp_path / "defense_result.pt")
    one_line_error(invoke("model", "import", tmp_path / "defense_result.pt"), "--normalize")
    done = invoke(
        "model", "import", tmp_path / "defense_result.pt", "--normalize", "cifar10", "--json"
    )
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["image_size"] == [32, 32] and info["std"] == list(BB_CIFAR_STD)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("vgg19_bn", "torchvision"),
        ("resnet18", "ImageNet"),
        ("mobilenet_v3_large", ""),
        ("x" * 5, ""),
    ],
)
def test_unknown_architectures_are_refused_in_one_line(tmp_path, isolated_home, name, why):
    torch.save(attack_result(bb_network(5), model_name=name), tmp_path / "attack_result.pt")
    line = one_line_error(
        invoke("model", "import", tmp_path / "attack_result.pt"), f"'{name}'", "preactresnet18", why
    )
    assert "supported" in line
    assert files_under(isolated_home) == []


def test_weights_that_do_not_fit_the_named_architecture_are_refused(tmp_path, isolated_home):
    from engine.ml.models import build_model

    small = build_model("small", 10, 3).state_dict()
    torch.save(attack_result(bb_network(6), model=small), tmp_path / "attack_result.pt")
    one_line_error(
        invoke("model", "import", tmp_path / "attack_result.pt"), "preact-resnet18", "missing"
    )
    assert files_under(isolated_home) == []


def test_a_plain_state_dict_still_needs_its_options(tmp_path):
    torch.save(bb_network(7).state_dict(), tmp_path / "plain.pt")
    one_line_error(
        invoke("model", "import", tmp_path / "plain.pt", "--classes", "10"), "--arch", "--normalize"
    )
    args = ("--arch", "preact-resnet18", "--classes", "10", "--normalize", "cifar10", "--json")
    result = invoke("model", "import", tmp_path / "plain.pt", *args)
    assert result.exit_code == 0 and json.loads(result.stdout)["source"] == "state-dict"


# ---------------------------------------------------------------------------------------------
# Malicious files: nothing runs, one line, exit 2, nothing written


class Payload:
    """Unpickling this runs code: ``__reduce__`` returns a call of ``exec`` on a script that
    writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class Pickled:
    """A plain class instance: loading it needs the class itself."""

    def __init__(self):
        self.weights = torch.zeros(2)


def test_a_pickle_that_runs_code_is_refused_and_its_code_does_not_run(tmp_path, isolated_home):
    # The payload is live: an unsafe load runs it.
    control = tmp_path / "control-ran"
    torch.save({"x": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "ran"

    marker = tmp_path / "payload-ran"
    net = bb_network(8)
    hidden = attack_result(net)
    hidden["bd_test"]["bd_data_container"]["data_dict"][np.int64(3)]["other_info"].append(
        Payload(marker)
    )
    cases = {
        "reduce.pt": hidden,
        "toplevel.pt": Payload(marker),
        "class.pt": attack_result(net, bd_train=Pickled()),
        "objects.pt": attack_result(net, data_path=np.array([Pickled], dtype=object)),
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    for name in cases:
        line = one_line_error(invoke("model", "import", tmp_path / name), name, "refusing")
        assert "\x1b" not in line
    assert not marker.exists()
    assert files_under(isolated_home) == []


def test_numpy_arrays_of_other_dtypes_are_refused(tmp_path, isolated_home):
    net = bb_network(9)
    for name, value in [
        ("strings.pt", np.array(["a", "b"])),
        ("records.pt", np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])),
        ("dates.pt", np.array(["2024-01-01"], dtype="datetime64[D]")),
    ]:
        torch.save(attack_result(net, data_path=value), tmp_path / name)
        one_line_error(invoke("model", "import", tmp_path / name), name, "refusing")
    assert files_under(isolated_home) == []


def test_the_second_fence_refuses_what_the_unpickler_let_through(tmp_path):
    """Behind the unpickler's allow-list, what loaded is walked once more: an object array (say,
    from a dtype whose state was never set) or any other object is refused."""
    from engine.errors import UnsafeFile
    from engine.ml.artifacts import _check_plain

    _check_plain(
        {"a": [np.arange(3), np.float32(1), (1, "x", b"y", None)], 2: torch.ones(1)}, tmp_path
    )
    for bad in (np.array([1, "a"], dtype=object), {"k": [object()]}):
        with pytest.raises(UnsafeFile):
            _check_plain(bad, tmp_path)


# ---------------------------------------------------------------------------------------------
# The imported model flows through the tool: a MESA search and a MESA repair


@pytest.fixture
def tiny_cifar(isolated_home, monkeypatch) -> str:
    """A stand-in 'cifar10' of 48 synthetic 32 px images (the search and the repair read the
    dataset the model names)."""
    from engine.catalog import imported_path
    from engine.ml.data import _save_arrays

    monkeypatch.setattr("engine.ml.runtime.configure_threads", lambda: None)
    g = torch.Generator().manual_seed(0)
    arrays = {}
    for split, n in (("train", 24), ("test", 24)):
        arrays[f"{split}_x"] = (
            torch.randint(0, 256, (n, 3, 32, 32), generator=g).to(torch.uint8).numpy()
        )
        arrays[f"{split}_y"] = (torch.arange(n) % 10).numpy()
    names = [str(i) for i in range(10)]
    _save_arrays(imported_path("cifar10"), arrays, names, BB_CIFAR_MEAN, BB_CIFAR_STD, "test")
    return "cifar10"


@pytest.mark.slow  # a PreAct-ResNet-18 on the CPU: about a minute on two busy cores
def test_an_imported_backdoorbench_model_is_searched_and_repaired(tiny_cifar, tmp_path):
    torch.save(attack_result(bb_network(10)), tmp_path / "attack_result.pt")
    imported = invoke("model", "import", tmp_path / "attack_result.pt", "--json")
    assert imported.exit_code == 0, imported.output
    model = json.loads(imported.stdout)["artifact"]

    search = invoke(
        "run", "mesa", "--model", model, "--target", "0", "--betas", "0.9", "--steps", "2",
        "--batch-size", "4", "--hidden", "8", "--n-eval-triggers", "2", "--eval-images", "4",
        "--samples", "8", "--device", "cpu", "--precision", "fp32", "--json",
        "--scan-probes", "1", "--scan-images", "2",  # the default scan: 230k forward passes
    )  # fmt: skip
    assert search.exit_code == 0, search.output
    found = json.loads(search.stdout.strip().splitlines()[-1])
    assert Path(found["artifact"], "beta=0.9", "grid.png").exists()
    assert "mesa/beta=0.9/validity" in found["metrics"]

    repair = invoke(
        "run", "defend", "--model", model, "--method", "mesa", "--search", found["artifact"],
        "--epochs", "1", "--batch-size", "16", "--stamp-rate", "0.5", "--residual-steps", "0",
        "--device", "cpu", "--precision", "fp32", "--json",
    )  # fmt: skip
    assert repair.exit_code == 0, repair.output
    repaired = json.loads(repair.stdout.strip().splitlines()[-1])
    from engine.ml.artifacts import load_model

    _, meta, manifest = load_model(repaired["artifact"])
    assert manifest["kind"] == "repaired-model" and meta.arch == "preact-resnet18"
    assert meta.mean == BB_CIFAR_MEAN and meta.std == BB_CIFAR_STD  # carried through
    assert 0.0 <= repaired["metrics"]["eval/acc_clean"] <= 1.0
