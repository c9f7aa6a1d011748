"""CLP: channel Lipschitzness-based pruning (data-free).

R. Zheng, R. Tang, J. Li, L. Liu, "Data-free Backdoor Removal based on Channel Lipschitzness",
ECCV 2022.

A channel that reacts strongly to a small trigger has a large Lipschitz constant from the input to
its output. Its upper bound (UCLC) needs no data: for a convolution followed by BatchNorm, channel
k's is the largest singular value of its filter W_k (reshaped to in_channels x kernel pixels)
times |gamma_k / sigma_k|, sigma_k the square root of BatchNorm's running variance. In every
layer, the channels whose UCLC exceeds mean + u * std (the layer's channels; std with Bessel's
correction) are pruned: their BatchNorm scale and shift are set to 0. No data, no training.

Default u = 3 (the paper's and both implementations'). Where this differs from the reference
(``rkteddy/channel-Lipschitzness-based-pruning`` ``defense.py``; BackdoorBench ``defense/clp.py``
is the same code):

- Each BatchNorm is paired with the convolution whose output it normalises, found by tracing the
  network (``torch.fx``), also through a max pooling in between (max pooling over disjoint windows
  is 1-Lipschitz per channel, so the bound holds; the ``small`` network pools between its
  convolution and BatchNorm). A BatchNorm fed by anything else (a residual sum in a
  pre-activation ResNet) is left alone. The reference pairs each BatchNorm with the convolution
  registered last before it, which is the same pairing for ``small``, ``resnet18`` and
  ``vgg11-bn`` but in ``preact-resnet18`` pairs each block's first BatchNorm with the previous
  block's last convolution (its README asks users to adapt the code for PreAct-ResNet).
  ``pairing="registration"`` reproduces the reference, and so BackdoorBench's PreAct-ResNet-18
  numbers.
- The singular values are computed for all channels of a layer at once
  (``torch.linalg.matrix_norm(ord=2)``) rather than one ``torch.svd`` per channel: the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from engine.ml.models import max_pool2

# Channel-wise 1-Lipschitz operations a convolution's output may pass before its BatchNorm.
_PASS_FUNCTIONS = (max_pool2, F.max_pool2d, torch.max_pool2d)
_PASS_MODULES = (nn.MaxPool2d, nn.Identity)


@dataclass
class Layer:
    """One (convolution, BatchNorm) pair, its channels' UCLC and the channels pruned."""

    conv: str
    bn: str
    uclc: torch.Tensor
    pruned: torch.Tensor  # bool per channel


def conv_bn_pairs(model: nn.Module, pairing: str = "traced") -> list[tuple[str, str]]:
    """(convolution name, BatchNorm name) pairs, in the BatchNorms' module order."""
    modules = dict(model.named_modules())
    if pairing == "registration":
        pairs, conv = [], None
        for name, module in modules.items():
            if isinstance(module, nn.BatchNorm2d) and conv is not None:
                pairs.append((conv, name))
            elif isinstance(module, nn.Conv2d):
                conv = name
        return [(c, b) for c, b in pairs if _fits(modules[c], modules[b])]
    if pairing != "traced":
        raise ValueError(f"pairing {pairing!r} is unknown; use traced or registration")
    graph = torch.fx.symbolic_trace(model).graph
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        while isinstance(source, torch.fx.Node):
            if source.op == "call_module":
                module = modules[source.target]
                if isinstance(module, nn.Conv2d):
                    found.setdefault(node.target, source.target)
                    break
                if not isinstance(module, _PASS_MODULES):
                    break
            elif not (source.op == "call_function" and _passes(source.target)):
                break
            source = source.args[0] if source.args else None
    order = [name for name, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    return [(found[b], b) for b in order if b in found and _fits(modules[found[b]], modules[b])]


def _passes(target) -> bool:
    return any(target is f for f in _PASS_FUNCTIONS) or getattr(target, "__name__", "") in (
        "max_pool2d",
        "_max_pool2d",
        "max_pool2d_with_indices",
    )


def _fits(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
    )


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """The UCLC of each output channel: ||W_k||_2 * |gamma_k / sqrt(running_var_k)|."""
    weight = conv.weight.detach().float().cpu()
    spectral = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1), ord=2)
    std = bn.running_var.detach().float().cpu().sqrt()
    return spectral * (bn.weight.detach().float().cpu() / std).abs()


def clp_prune(model: nn.Module, u: float = 3.0, pairing: str = "traced") -> list[Layer]:
    """Prune ``model`` in place (see the module's docstring); returns each pair's UCLC and
    choice."""
    modules = dict(model.named_modules())
    layers = []
    for conv_name, bn_name in conv_bn_pairs(model, pairing):
        conv, bn = modules[conv_name], modules[bn_name]
        uclc = channel_lipschitz(conv, bn)
        if uclc.numel() > 1:
            pruned = uclc > uclc.mean() + u * uclc.std()
        else:
            pruned = torch.zeros_like(uclc, dtype=torch.bool)
        with torch.no_grad():
            index = pruned.to(bn.weight.device)
            bn.weight[index] = 0.0
            bn.bias[index] = 0.0
        layers.append(Layer(conv_name, bn_name, uclc, pruned))
    return layers
