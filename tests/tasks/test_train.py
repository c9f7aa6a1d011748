"""The train task (the attack): a real smoke run on tiny real data, determinism, resume,
schedules, poisoning and fine-tuning."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import Cancelled, UserError
from engine.ml import artifacts
from engine.ml.models import build_model
from engine.ml.triggers import PatchTrigger, Placement, bw_pattern
from engine.reporter import MemoryReporter
from engine.specs import TrainSpec
from engine.tasks import train
from engine.tasks.train import lr_factor, poison_batch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def tiny_spec(**overrides) -> TrainSpec:
    values = dict(
        dataset="cifar10",
        arch="small",
        epochs=1,
        batch_size=8,
        lr=0.05,
        schedule="onecycle",
        max_train_images=32,  # 4 steps per epoch: this CPU is shared, keep runs tiny
        max_test_images=16,
        trigger="bw:170",
        target=0,
        poison_rate=0.2,
        precision="fp32",
        device="cpu",
        seed=3,
    )
    values.update(overrides)
    return TrainSpec(**values)


def final_state(workdir) -> dict[str, torch.Tensor]:
    model, _, _ = artifacts.load_model(workdir)
    return model.state_dict()


# ---------------------------------------------------------------------------------------------
# Real runs on a few hundred CIFAR-10 images


@pytest.mark.slow
def test_smoke_run_writes_an_artifact_with_metrics(cifar10, tmp_path):
    spec = tiny_spec(max_train_images=512, max_test_images=256, batch_size=128)
    reporter = MemoryReporter(tmp_path / "run")
    result = train.run(spec, reporter)

    workdir = tmp_path / "run"
    assert result.artifact == str(workdir)
    names = {p.name for p in workdir.iterdir()}
    assert {"manifest.json", "model.safetensors", "ground_truth.json"} <= names
    assert "checkpoints" not in names  # removed once the artifact is complete
    assert reporter.artifacts == [(str(workdir), "model")]

    m = result.metrics
    for key in ("eval/acc_clean", "eval/asr", "eval/ra", "eval/asr_corner", "eval/asr_invert"):
        assert 0.0 <= m[key] <= 1.0, key
    assert all(f"eval/acc_class/{c}" in m for c in range(10))
    assert m["time/train_s"] > 0 and m["memory/peak_mb"] > 0
    # The reporter saw the contract's metric keys, at increasing steps.
    losses = reporter.series("train/loss")
    assert losses and all(math.isfinite(v) for _, v in losses)
    assert [s for s, _ in losses] == sorted(s for s, _ in losses)
    assert reporter.last("eval/acc_clean") == m["eval/acc_clean"]
    # The last epoch is evaluated once (by the final evaluation), not twice.
    assert len(reporter.series("eval/acc_clean")) == 1
    assert reporter.last("train/epoch") == 1
    assert reporter.progress_calls > 0 and reporter.check_ins

    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["spec_hash"] == spec.spec_hash()
    assert manifest["meta"]["arch"] == "small" and manifest["meta"]["num_classes"] == 10
    assert manifest["meta"]["dataset_sha256"] == result.extra["dataset_sha256"]
    assert manifest["metrics"]["eval/asr"] == m["eval/asr"]
    truth = artifacts.load_ground_truth(workdir)
    assert truth is not None and truth.target == 0 and torch.equal(truth.pattern, bw_pattern(170))
    model, meta, _ = artifacts.load_model(workdir)
    assert meta.mean == CIFAR_MEAN and meta.seed == spec.seed
    assert json.dumps(result.to_json())  # JSON-safe


@pytest.mark.slow
def test_same_seed_same_run_and_resume_continues_where_it_stopped(cifar10, tmp_path):
    """One test for determinism and resume, to keep the number of real runs small."""
    spec = tiny_spec(epochs=2)  # 32 images / 8 = 4 steps per epoch
    straight = MemoryReporter(tmp_path / "straight")
    train.run(spec, straight)

    # should_stop is polled once per step: the 6th poll (epoch 2, second step) says stop.
    workdir = tmp_path / "run"
    first = MemoryReporter(workdir, stop_after=5)
    with pytest.raises(Cancelled):
        train.run(spec, first)
    assert (workdir / train.CHECKPOINT).exists()
    assert not (workdir / "manifest.json").exists()
    assert first.series("train/epoch") == [(4, 1.0)]
    shutil.copytree(workdir, tmp_path / "copy")

    # Without resume the checkpoint is ignored; the same seed gives the same run (fp32).
    again = MemoryReporter(workdir, resume=False)
    train.run(spec, again)
    assert [v for _, v in again.series("train/epoch")] == [1.0, 2.0]
    assert again.series("train/loss") == straight.series("train/loss")
    assert again.last("eval/asr") == straight.last("eval/asr")
    reference = final_state(tmp_path / "straight")
    rerun = final_state(workdir)
    assert all(torch.equal(rerun[k], reference[k]) for k in reference)

    # With resume it continues after epoch 1: no epoch repeated, steps go on, same result.
    resumed = MemoryReporter(tmp_path / "copy", resume=True)
    result = train.run(spec, resumed)
    assert any("resumed" in line for _, line in resumed.lines)
    assert [v for _, v in resumed.series("train/epoch")] == [2.0]
    steps = [s for s, _ in resumed.series("train/loss")]
    assert steps and min(steps) > 4 and max(steps) == 8
    assert resumed.series("train/loss") == [
        (s, v) for s, v in straight.series("train/loss") if s > 4
    ]
    assert result.artifact == str(tmp_path / "copy")
    state = final_state(tmp_path / "copy")
    assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_a_checkpoint_made_at_another_precision_is_not_continued(cifar10, tmp_path, monkeypatch):
    """A job moved from a bf16 machine to an fp32 one starts over: no model mixes the two."""
    spec = tiny_spec(epochs=2, precision="auto")
    workdir = tmp_path / "run"
    monkeypatch.setattr(train, "resolve_precision", lambda wanted, device: "bf16")
    with pytest.raises(Cancelled):
        train.run(spec, MemoryReporter(workdir, stop_after=5))  # in epoch 2
    monkeypatch.setattr(train, "resolve_precision", lambda wanted, device: "fp32")
    moved = MemoryReporter(workdir, resume=True)
    result = train.run(spec, moved)
    assert not any("resumed" in line for _, line in moved.lines)
    assert any(
        level == "warning" and "other settings (precision); starting from the beginning" in line
        for level, line in moved.lines
    )
    assert [v for _, v in moved.series("train/epoch")] == [1.0, 2.0]
    assert result.extra["precision"] == "fp32"


@pytest.mark.slow
def test_fine_tune_from_a_model_artifact(cifar10, tmp_path):
    torch.manual_seed(0)
    init = build_model("small", 10, 3)
    meta = artifacts.ModelMeta("small", 10, 3, (32, 32), CIFAR_MEAN, CIFAR_STD, "cifar10")
    artifacts.save_model(tmp_path / "init", init, meta)
    # A vanishing learning rate: the weights must stay the initial ones (BN statistics move).
    spec = tiny_spec(
        init_from=str(tmp_path / "init"),
        arch="resnet18",  # the artifact's architecture wins
        lr=1e-9,
        momentum=0.0,
        weight_decay=0.0,
        trigger="none",
        augment=False,
    )
    result = train.run(spec, MemoryReporter(tmp_path / "ft"))
    manifest = artifacts.read_manifest(tmp_path / "ft")
    assert manifest["meta"]["arch"] == "small"
    assert manifest["upstream"][0]["path"] == str((tmp_path / "init").resolve())
    tuned = final_state(tmp_path / "ft")
    for key, value in init.state_dict().items():
        if key.endswith("weight") and value.dim() > 1:
            assert torch.allclose(tuned[key], value, atol=1e-6), key
    # A clean run has no ground truth and no attack metrics.
    assert not (tmp_path / "ft" / "ground_truth.json").exists()
    assert "eval/asr" not in result.metrics and "eval/acc_clean" in result.metrics


def test_fine_tune_refuses_a_model_of_other_shape(cifar10, tmp_path):
    meta = artifacts.ModelMeta("small", 100, 3, (32, 32), CIFAR_MEAN, CIFAR_STD, "cifar100")
    artifacts.save_model(tmp_path / "init", build_model("small", 100, 3), meta)
    with pytest.raises(UserError, match="--init-from"):
        train.run(tiny_spec(init_from=str(tmp_path / "init")), MemoryReporter(tmp_path / "ft"))


def test_task_validates_target_and_trigger_size(cifar10, tmp_path):
    with pytest.raises(UserError, match="--target 10"):
        train.run(tiny_spec(target=10), MemoryReporter(tmp_path / "a"))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(UserError, match="bigger"):
        train.run(tiny_spec(trigger=f"file:{tmp_path / 'big.png'}"), MemoryReporter(tmp_path / "b"))
    assert not any((tmp_path / d).joinpath("model.safetensors").exists() for d in ("a", "b"))


def test_crop_epochs_train_on_smaller_windows_then_full_images(cifar10, tmp_path, monkeypatch):
    """The first crop_epochs see crop_size windows with the trigger stamped inside them."""
    seen: list[tuple[int, int]] = []
    stamped_inside: list[bool] = []
    real_poison = train.poison_batch

    def spy(x, y, trigger, target, rate, generator):
        x2, y2, mask = real_poison(x, y, trigger, target, rate, generator)
        seen.append(tuple(x.shape[2:]))
        # A stamped image differs from its input only where the patch went, inside the window.
        stamped_inside.extend(bool((x2[i] != x[i]).any()) for i in mask.nonzero().flatten())
        return x2, y2, mask

    monkeypatch.setattr(train, "poison_batch", spy)
    spec = tiny_spec(epochs=3, crop_epochs=2, crop_size=20, poison_rate=0.5)
    result = train.run(spec, MemoryReporter(tmp_path / "run"))
    assert seen[:8] == [(20, 20)] * 8 and seen[8:] == [(32, 32)] * 4
    assert stamped_inside and all(stamped_inside)
    assert 0.0 <= result.metrics["eval/acc_clean"] <= 1.0
    # More crop epochs than epochs: the last epoch still trains on whole images.
    seen.clear()
    train.run(tiny_spec(epochs=2, crop_epochs=5), MemoryReporter(tmp_path / "run2"))
    assert seen == [(24, 24)] * 4 + [(32, 32)] * 4


def test_compile_switch_compiles_the_training_step_and_saves_the_plain_model(
    cifar10, tmp_path, monkeypatch
):
    """MESA_TUI_COMPILE=1 sends the training step through torch.compile (faked here: compiling
    on this CPU takes minutes); evaluation and the saved weights use the model itself."""
    compiled, calls = [], []

    def fake_compile(model):
        compiled.append(model)
        return lambda x: calls.append(x.shape[0]) or model(x)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setenv("MESA_TUI_COMPILE", "1")
    reporter = MemoryReporter(tmp_path / "run")
    result = train.run(tiny_spec(), reporter)
    assert len(compiled) == 1 and calls == [8, 8, 8, 8]  # the 4 training steps, no evaluation
    assert result.extra["compiled"] is True
    assert any("compiled" in line for _, line in reporter.lines)
    assert not any(k.startswith("_orig_mod") for k in final_state(tmp_path / "run"))
    monkeypatch.setenv("MESA_TUI_COMPILE", "0")
    compiled.clear()
    assert train.run(tiny_spec(), MemoryReporter(tmp_path / "eager")).extra["compiled"] is False
    assert compiled == []


def test_crop_size_must_fit_the_images_and_hold_the_trigger(cifar10, tmp_path):
    with pytest.raises(UserError, match="--crop-size 40"):
        train.run(tiny_spec(crop_epochs=1, crop_size=40), MemoryReporter(tmp_path / "a"))
    with pytest.raises(UserError, match="--crop-size 2: smaller than the 3x3 trigger"):
        train.run(tiny_spec(crop_epochs=1, crop_size=2), MemoryReporter(tmp_path / "b"))
    # Without crop epochs the size is not used, so it is not checked either.
    train.run(tiny_spec(crop_size=40, max_train_images=8), MemoryReporter(tmp_path / "c"))
    assert not any((tmp_path / d).joinpath("model.safetensors").exists() for d in ("a", "b"))


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_lr_factor_for_each_schedule():
    total, per_epoch = 100, 10
    assert [lr_factor("constant", s, total, per_epoch, []) for s in (0, 50, 99)] == [1.0] * 3
    assert lr_factor("cosine", 0, total, per_epoch, []) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, total, per_epoch, []) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, total, per_epoch, []) == pytest.approx(0.0, abs=1e-12)
    cos = [lr_factor("cosine", s, total, per_epoch, []) for s in range(total)]
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))
    multistep = [lr_factor("multistep", s, total, per_epoch, [3, 6]) for s in (0, 29, 30, 59, 60)]
    assert multistep == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_factor("onecycle", 0, total, per_epoch, []) == pytest.approx(0.1)
    assert lr_factor("onecycle", 10, total, per_epoch, []) == pytest.approx(0.55)
    assert lr_factor("onecycle", 20, total, per_epoch, []) == pytest.approx(1.0)
    assert lr_factor("onecycle", 60, total, per_epoch, []) == pytest.approx(0.5)
    assert lr_factor("onecycle", 100, total, per_epoch, []) == pytest.approx(0.0)
    with pytest.raises(UserError, match="sawtooth"):
        lr_factor("sawtooth", 0, total, per_epoch, [])


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_poison_batch_poisons_about_rate_of_the_images(rate):
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5 + 0.25  # no pure black or white pixels
    y = torch.randint(1, 10, (n,), generator=g)
    trigger = PatchTrigger(bw_pattern(170), Placement("per-image"))
    px, py, mask = poison_batch(x, y, trigger, target=0, rate=rate, generator=g)
    assert px.shape == x.shape and py.shape == y.shape and mask.dtype == torch.bool
    share = float(mask.float().mean())
    assert abs(share - rate) <= 3 * math.sqrt(rate * (1 - rate) / n) + 1e-9
    assert bool((py[mask] == 0).all())
    assert torch.equal(py[~mask], y[~mask]) and torch.equal(px[~mask], x[~mask])
    if mask.any():
        # Each poisoned image holds exactly 9 pure pixels per channel: the 3x3 pattern.
        pure = ((px[mask] == 0) | (px[mask] == 1)).sum(dim=(2, 3))
        assert bool((pure == 9).all())
        assert not torch.equal(px[mask], x[mask])


def test_poison_batch_is_deterministic_for_a_seed():
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 10, (64,))
    trigger = PatchTrigger(bw_pattern(5), Placement("per-image"))
    a = poison_batch(x, y, trigger, 1, 0.3, torch.Generator().manual_seed(9))
    b = poison_batch(x, y, trigger, 1, 0.3, torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_reflect_padding_must_be_smaller_than_the_images():
    from engine.specs import check_padding

    spec = tiny_spec(crop_padding=8, padding_mode="reflect")
    with pytest.raises(
        UserError, match="--crop-padding 8: .* use at most 7 or --padding-mode zeros"
    ):
        check_padding(spec, (8, 8))
    check_padding(spec, (9, 9))  # fits
    check_padding(tiny_spec(crop_padding=8), (8, 8))  # zeros pad any amount


def test_training_passes_its_padding_to_the_crop(cifar10, tmp_path, monkeypatch):
    calls = []
    real = train.augment

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "augment", spy)
    train.run(tiny_spec(crop_padding=3, padding_mode="reflect"), MemoryReporter(tmp_path))
    assert calls and all(c["padding"] == 3 and c["padding_mode"] == "reflect" for c in calls)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("eval_every", "evaluated_epochs"), [(1, [1, 2, 3]), (2, [2, 3]), (0, [3])]
)
def test_eval_every_sets_the_mid_run_evaluations(cifar10, tmp_path, eval_every, evaluated_epochs):
    reporter = MemoryReporter(tmp_path)
    train.run(tiny_spec(epochs=3, eval_every=eval_every), reporter)
    steps = [s for s, _ in reporter.series("eval/acc_clean")]
    assert steps == [4 * e for e in evaluated_epochs]  # 4 steps per epoch; the last always


def test_whitened_stem_stays_fixed_while_the_rest_trains(cifar10, tmp_path, monkeypatch):
    stems = []
    real = train.whiten_first_conv_

    def spy(model, images):
        layer = model.layer1.conv1.weight.detach().clone()
        stems.append((images.shape, real(model, images).weight.detach().clone(), layer))
        return model.stem[0]

    monkeypatch.setattr(train, "whiten_first_conv_", spy)
    train.run(tiny_spec(whiten_stem=True), MemoryReporter(tmp_path / "w"))
    ((shape, stem, layer),) = stems
    assert shape == (32, 3, 32, 32)  # every image of this tiny set (at most 5,000)
    trained = final_state(tmp_path / "w")
    assert torch.equal(trained["stem.0.weight"], stem)
    assert torch.equal(trained["stem.1.weight"], torch.ones(16))  # its BatchNorm is fixed too
    assert torch.equal(trained["stem.1.bias"], torch.zeros(16))
    assert not torch.allclose(trained["layer1.conv1.weight"], layer)
    # Fine-tuning keeps the model's own stem, and says so.
    reporter = MemoryReporter(tmp_path / "ft")
    train.run(tiny_spec(whiten_stem=True, init_from=str(tmp_path / "w")), reporter)
    assert len(stems) == 1 and any("keeps its stem" in line for _, line in reporter.lines)


def test_parameter_groups_take_the_norm_weight_decay_apart():
    model = build_model("resnet18", 10)  # BatchNorm scales and shifts, and a linear bias
    (one,) = train.parameter_groups(model, 5e-4, None)
    assert one["weight_decay"] == 5e-4 and len(one["params"]) == len(list(model.parameters()))
    assert len(train.parameter_groups(model, 5e-4, 5e-4)) == 1  # equal: the same single group
    filters, vectors = train.parameter_groups(model, 5e-4, 0.0)
    assert (filters["weight_decay"], vectors["weight_decay"]) == (5e-4, 0.0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = {id(p) for m in norms for p in (m.weight, m.bias)} | {id(model.linear.bias)}
    assert {id(p) for p in vectors["params"]} == expected
    assert {id(p) for p in filters["params"]} == {
        id(p) for p in model.parameters() if p.ndim == 4
    } | {id(model.linear.weight)}
    assert len(filters["params"]) + len(vectors["params"]) == len(list(model.parameters()))


def test_norm_weight_decay_leaves_batchnorm_undecayed(cifar10, tmp_path, monkeypatch):
    """With every gradient zero, one SGD step is the weight decay alone: with norm_weight_decay 0
    the BatchNorm parameters stay where they were and the filters shrink."""
    steps = []

    class ZeroGradSGD(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.zero_()
            before = {id(p): p.detach().clone() for g in self.param_groups for p in g["params"]}
            super().step(closure)
            steps.append([(p.ndim, torch.equal(before[id(p)], p)) for g in self.param_groups
                          for p in g["params"] if p.grad is not None])  # fmt: skip

    monkeypatch.setattr(train.torch.optim, "SGD", ZeroGradSGD)
    spec = tiny_spec(norm_weight_decay=0.0, weight_decay=5e-3, lr=0.1, momentum=0.0)
    train.run(spec, MemoryReporter(tmp_path / "n"))
    first = steps[0]
    assert all(same for ndim, same in first if ndim == 1)  # BatchNorm: no decay
    assert not any(same for ndim, same in first if ndim > 1)  # filters: decayed
    assert TrainSpec(norm_weight_decay=None).norm_weight_decay is None
    with pytest.raises(ValueError):
        TrainSpec(norm_weight_decay=-1)
