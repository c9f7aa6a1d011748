"""Artifacts: round trip, hash checks, stripped ground truth, and safe import of foreign weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UnsafeFile, UserError
from engine.ml import artifacts
from engine.ml.artifacts import (
    GroundTruth,
    ModelMeta,
    load_ground_truth,
    load_model,
    read_manifest,
    save_model,
)
from engine.ml.model_import import import_model
from engine.ml.models import build_model
from engine.ml.triggers import bw_pattern

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def small_model(seed: int = 0, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small", classes, 3)
    # Non-default BatchNorm statistics, so buffers are part of what a round trip must keep.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def meta(arch: str = "small", classes: int = 10) -> ModelMeta:
    return ModelMeta(arch, classes, 3, (32, 32), CIFAR_MEAN, CIFAR_STD, "cifar10", "abc", 7)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def saved(tmp_path, truth: bool = True):
    model = small_model()
    gt = GroundTruth("bw:170", bw_pattern(170), 3, "per-image") if truth else None
    directory = tmp_path / "art"
    save_model(
        directory, model, meta(), spec={"lr": 0.1}, metrics={"eval/asr": 0.9}, ground_truth=gt
    )
    return model, directory


def test_round_trip(tmp_path):
    model, directory = saved(tmp_path)
    assert {p.name for p in directory.iterdir()} == {
        "manifest.json",
        "model.safetensors",
        "ground_truth.json",
    }
    loaded, loaded_meta, manifest = load_model(directory)
    assert same_weights(model, loaded)
    assert loaded_meta == meta()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    assert manifest["kind"] == "model"
    assert manifest["metrics"] == {"eval/asr": 0.9}
    assert manifest["spec"] == {"lr": 0.1}
    assert manifest["code_version"]
    files = manifest["files"]["model.safetensors"]
    assert files["sha256"] == artifacts.sha256_file(directory / "model.safetensors")
    assert manifest["meta"]["arch"] == "small" and manifest["meta"]["mean"] == list(CIFAR_MEAN)
    # The attacker's knowledge is not in the manifest's metadata, only apart.
    assert "target" not in json.dumps(manifest["meta"]) and "bw:170" not in json.dumps(manifest)
    truth = load_ground_truth(directory)
    assert truth is not None and truth.target == 3 and truth.trigger == "bw:170"
    assert torch.equal(truth.pattern, bw_pattern(170)) and truth.placement == "per-image"


def test_a_changed_byte_is_refused(tmp_path):
    _, directory = saved(tmp_path)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UnsafeFile, match="sha256"):
        load_model(directory)
    with pytest.raises(UnsafeFile):
        read_manifest(directory)
    assert read_manifest(directory, verify=False)["kind"] == "model"


def test_a_missing_file_is_refused(tmp_path):
    _, directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(UnsafeFile, match="missing"):
        load_model(directory)


def test_stripped_ground_truth_still_loads(tmp_path):
    model, directory = saved(tmp_path)
    (directory / "ground_truth.json").unlink()
    loaded, _, _ = load_model(directory)
    assert same_weights(model, loaded)
    assert load_ground_truth(directory) is None


def test_no_ground_truth_for_clean_models(tmp_path):
    _, directory = saved(tmp_path, truth=False)
    assert not (directory / "ground_truth.json").exists()
    assert load_ground_truth(directory) is None


def test_not_an_artifact_and_wrong_kind(tmp_path):
    with pytest.raises(UserError, match="manifest.json"):
        load_model(tmp_path)
    directory = tmp_path / "search"
    directory.mkdir()
    (directory / "x.npy").write_bytes(b"")
    artifacts.write_manifest(directory, "search", ["x.npy"])
    with pytest.raises(UserError, match="search"):
        load_model(directory)


# ---------------------------------------------------------------------------------------------
# Foreign weights


def _check_imported(
    info: dict, reference: torch.nn.Module, arch: str = "small", std=CIFAR_STD
) -> None:
    loaded, m, manifest = load_model(info["artifact"])
    assert m.arch == arch and m.num_classes == 10 and m.in_channels == 3
    assert m.mean == CIFAR_MEAN and m.std == std and m.image_size == (32, 32)
    assert same_weights(reference, loaded)
    assert info["sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_import_plain_state_dict(tmp_path, isolated_home):
    model = small_model(1)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    info = import_model(tmp_path / "plain.pt", arch="small", classes=10, normalize="cifar10")
    assert str(isolated_home) in info["artifact"]  # default: under the data home
    _check_imported(info, model)


def test_import_kuangliu_checkpoint(tmp_path):
    # kuangliu/pytorch-cifar saves {'net': DataParallel state, 'acc': ..., 'epoch': ...}.
    model = small_model(2)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"net": state, "acc": 95.1, "epoch": 199}, tmp_path / "ckpt.pth")
    info = import_model(
        tmp_path / "ckpt.pth", arch="small", classes=10, normalize="cifar10", out=tmp_path / "o"
    )
    assert info["artifact"] == str(tmp_path / "o")
    _check_imported(info, model)


def test_import_backdoorbench_result(tmp_path):
    # The minimal BackdoorBench keys; with --normalize standing in for its clean_data. The full
    # layout and its refusals: tests/ml/test_model_import_backdoorbench.py.
    torch.manual_seed(3)
    model = build_model("preact-resnet18", 10, 3)
    obj = {"model": model.state_dict(), "model_name": "preactresnet18", "num_classes": 10}
    torch.save(obj, tmp_path / "attack_result.pt")
    info = import_model(
        tmp_path / "attack_result.pt", arch="preact-resnet18", classes=10, normalize="cifar10"
    )
    # BackdoorBench's own CIFAR-10 normalisation (its get_dataset_normalization), not ours.
    _check_imported(info, model, arch="preact-resnet18", std=(0.247, 0.243, 0.261))


def test_import_safetensors(tmp_path):
    model = small_model(4)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    info = import_model(tmp_path / "w.safetensors", arch="small", classes=10, normalize="cifar10")
    _check_imported(info, model)


def test_import_an_old_checkpoint_without_batchnorm_counters(tmp_path):
    model = small_model(5)
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    info = import_model(tmp_path / "old.pt", arch="small", classes=10, normalize="cifar10")
    loaded, _, _ = load_model(info["artifact"])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


class PickledThing:
    """Loading an instance of this class needs arbitrary unpickling."""

    def __init__(self):
        self.weights = torch.zeros(3)


def test_arbitrary_pickle_is_refused(tmp_path, isolated_home):
    torch.save(PickledThing(), tmp_path / "evil.pt")
    torch.save({"net": small_model().state_dict(), "extra": PickledThing()}, tmp_path / "mix.pt")
    for name in ("evil.pt", "mix.pt"):
        with pytest.raises(UnsafeFile) as exc:
            import_model(tmp_path / name, arch="small", classes=10, normalize="cifar10")
        msg = str(exc.value)
        assert exc.value.exit_code == 2
        assert "\n" not in msg and "\x1b" not in msg
        assert name in msg and "PickledThing" in msg and "state_dict" in msg
    assert [p for p in isolated_home.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("arch", "classes", "hint"),
    [("resnet18", 10, "--arch"), ("small", 100, "--classes"), ("nosuch", 10, "nosuch")],
)
def test_wrong_arch_or_classes(tmp_path, isolated_home, arch, classes, hint):
    torch.save(small_model().state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError) as exc:
        import_model(tmp_path / "w.pt", arch=arch, classes=classes, normalize="cifar10")
    assert hint in str(exc.value) and "\n" not in str(exc.value)
    assert [p for p in isolated_home.rglob("*") if p.is_file()] == []


def test_import_refuses_other_bad_input(tmp_path):
    torch.save({"acc": 1.0, "epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(UserError, match="state dict"):
        import_model(tmp_path / "nostate.pt", arch="small", classes=10, normalize="cifar10")
    with pytest.raises(UserError, match="does not exist"):
        import_model(tmp_path / "none.pt", arch="small", classes=10, normalize="cifar10")
    (tmp_path / "junk.pt").write_bytes(b"junk" * 10)
    with pytest.raises(UserError, match="junk.pt"):
        import_model(tmp_path / "junk.pt", arch="small", classes=10, normalize="cifar10")
    torch.save(small_model().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        import_model(tmp_path / "w.pt", arch="small", classes=10, normalize="cifar10", out=out)


def test_copied_artifact_still_verifies(tmp_path):
    model, directory = saved(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    assert same_weights(model, load_model(copy)[0])


def test_manifests_with_the_retired_arch_version_field_still_load(tmp_path):
    """Models written while manifests carried ``arch_version`` (docs/results/paper-small's
    clean model among them) load as before: the field is read past."""
    model, directory = saved(tmp_path)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["meta"]["arch_version"] = 2
    path.write_text(json.dumps(manifest))
    loaded, loaded_meta, _ = load_model(directory)
    assert loaded_meta == meta() and same_weights(model, loaded)
