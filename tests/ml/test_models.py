"""Models: output shapes for every architecture and input, and reference state-dict layouts."""

from __future__ import annotations

import pytest
import torch

from engine.errors import UserError
from engine.ml.models import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    fold_batchnorm,
    max_pool2,
    stem_modules,
    whiten_first_conv_,
)

ARCHS = ["resnet18", "preact-resnet18", "vgg11-bn", "small", "small-wide"]


def test_every_named_architecture_is_registered():
    assert set(ARCHS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape(arch, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(arch, classes, channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_train_mode_backward_and_channels_last():
    model = build_model("small", 10, 3).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2_without_autograd_equals_max_pool2d(size, dtype, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *size).to(dtype)
    x[0, 0, :2, :2] = 1.0  # a tie inside one window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = max_pool2(x)
    assert torch.equal(out, torch.nn.functional.max_pool2d(x, 2))
    if out.shape[-2] * out.shape[-1] > 1:  # a 1x1 map is contiguous in either format
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_max_pool2_with_autograd_keeps_max_pool2d_gradient(monkeypatch):
    calls = []
    real = torch.nn.functional.max_pool2d
    monkeypatch.setattr(
        torch.nn.functional, "max_pool2d", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    max_pool2(x).sum().backward()
    assert calls and x.grad is not None and int(x.grad.sum()) == 2 * 3 * 9
    calls.clear()
    with torch.no_grad():
        max_pool2(x)
    assert not calls  # evaluation takes the strided path


def test_small_network_scores_the_same_with_and_without_autograd():
    torch.manual_seed(0)
    model = build_model("small", 10, 3).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
    assert torch.equal(fast, model(x).detach())


# Keys (and parameter counts) of the reference implementations, so their checkpoints import:
# kuangliu/pytorch-cifar for resnet18 and vgg11-bn, BackdoorBench for preact-resnet18.
REFERENCE_KEYS = {
    "resnet18": [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_var",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    ],
    "preact-resnet18": [
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.running_mean",
        "linear.weight",
    ],
    "vgg11-bn": [
        "features.0.weight",
        "features.1.running_mean",
        "features.25.weight",
        "features.26.running_var",
        "classifier.weight",
    ],
}
REFERENCE_PARAMS = {"resnet18": 11_173_962, "preact-resnet18": 11_171_146, "vgg11-bn": 9_231_114}


@pytest.mark.parametrize("arch", list(REFERENCE_KEYS))
def test_reference_state_dict_layout(arch):
    model = build_model(arch, 10, 3)
    keys = set(model.state_dict())
    assert set(REFERENCE_KEYS[arch]) <= keys
    assert count_parameters(model) == REFERENCE_PARAMS[arch]
    # No prefix that a foreign checkpoint would lack.
    assert not any(k.startswith(("module.", "model.", "net.")) for k in keys)


def test_resnet18_is_the_cifar_variant():
    model = build_model("resnet18", 10, 3)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize(
    ("args", "named"),
    [(("resnet50", 10, 3), "resnet50"), (("small", 1, 3), "1"), (("small", 10, 4), "4")],
)
def test_bad_arguments(args, named):
    with pytest.raises(UserError, match=named):
        build_model(*args)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_batchnorm_keeps_the_function_and_the_input_gradient(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    # float64: in float32 a rounding-sized change can flip a ReLU or a max-pool's choice, which
    # moves a gradient (a search sees that as noise); in float64 the functions must agree.
    model = model.double().eval()
    folded = fold_batchnorm(model)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    ref, out = model(x), folded(y)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    ref[:, 0].sum().backward()
    out[:, 0].sum().backward()
    assert (y.grad - x.grad).abs().max() <= 1e-9 * x.grad.abs().max()
    # the original is untouched; the copy lost the BatchNorm layers that follow a convolution
    bns = lambda m: sum(isinstance(k, torch.nn.BatchNorm2d) for k in m.modules())  # noqa: E731
    assert bns(model) > 0
    if arch != "preact-resnet18":  # there BN comes before the convolution: nothing to fold
        assert bns(folded) < bns(model)


def correlated_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are correlated, as natural images are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    x = x + torch.roll(x, 1, dims=-1) + 0.5 * torch.roll(x, 1, dims=-2)  # neighbours
    mix = torch.eye(channels) + 0.7 * torch.rand(channels, channels, generator=g)
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.3  # channels, and a mean


def patch_features(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution's responses to every unpadded patch of ``x``, one row per patch."""
    patches = torch.nn.functional.unfold(x, conv.kernel_size).transpose(1, 2)
    return patches.reshape(-1, patches.shape[-1]) @ conv.weight.detach().flatten(1).T


def test_whitened_stem_has_decorrelated_unit_variance_responses_and_their_negatives():
    torch.manual_seed(0)
    model = build_model("small", 10, 3)
    x = correlated_images(64, 3, 12)
    conv = whiten_first_conv_(model, x, eps=1e-6)
    assert conv is model.stem[0]
    w = conv.weight.detach().flatten(1)
    assert torch.equal(w[8:], -w[:8])  # 16 filters: the top 8 components and their negatives
    features = patch_features(conv, x)[:, :8].double()
    assert torch.allclose(torch.cov(features.T), torch.eye(8, dtype=torch.float64), atol=1e-3)
    # The top components: no other direction of the patches has more variance than the 8th.
    patches = torch.nn.functional.unfold(x, 3).transpose(1, 2).reshape(-1, 27).double()
    variances = torch.linalg.eigvalsh(torch.cov(patches.T))
    raw = w[:8].double() / w[:8].double().norm(dim=1, keepdim=True)
    explained = torch.cov((patches @ raw.T).T).diagonal()
    assert torch.allclose(explained, variances.flip(0)[:8], rtol=1e-4)


def test_whitening_keeps_the_filters_beyond_the_patch_dimensions_and_ignores_chunking():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 1)  # 64 filters, 9 patch dimensions: 18 written
    before = model.conv1.weight.detach().clone()
    x = correlated_images(40, 1, 10, seed=1)
    conv = whiten_first_conv_(model, x, chunk=7)
    assert conv is model.conv1
    assert torch.equal(conv.weight[18:], before[18:]) and not torch.equal(conv.weight, before)
    other = build_model("resnet18", 10, 1)
    whiten_first_conv_(other, x, chunk=1000)
    assert torch.allclose(other.conv1.weight[:18], conv.weight[:18], atol=1e-5)


def test_whitening_refuses_images_of_other_channels():
    with pytest.raises(ValueError, match="3 channels"):
        whiten_first_conv_(build_model("small", 10, 3), torch.rand(4, 1, 8, 8))


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("small", ["stem.0", "stem.1"]),
        ("small-wide", ["stem.0", "stem.1"]),
        ("resnet18", ["conv1", "bn1"]),
        ("vgg11-bn", ["features.0", "features.1"]),
        ("preact-resnet18", ["conv1"]),  # its next BatchNorm sits inside a block, on a branch
    ],
)
def test_stem_is_the_first_convolution_and_the_batchnorm_beside_it(arch, names):
    model = build_model(arch, 10, 3)
    by_module = {id(m): n for n, m in model.named_modules()}
    assert [by_module[id(m)] for m in stem_modules(model)] == names
