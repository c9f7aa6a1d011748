"""FT-SAM: fine-tuning with sharpness-aware minimisation as a repair step.

M. Zhu, S. Wei, L. Shen, Y. Fan, B. Wu, "Enhancing Fine-Tuning Based Backdoor Defense with
Sharpness-Aware Minimization", ICCV 2023; SAM: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur,
"Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021; the adaptive
variant (ASAM): J. Kwon et al., ICML 2021.

Backdoor neurons sit in sharp directions of the loss; fine-tuning on clean data with SAM's
perturbed gradient pushes the model out of them where plain fine-tuning stays. Each step: the
label-smoothed cross-entropy's gradient g at the weights w; the ascent e = rho * T^2 g / ||T g||
with T = |w| (adaptive; T = 1 for plain SAM); the gradient again at w + e, with BatchNorm's running
statistics frozen for that second pass; back to w; one SGD step with that second gradient.

Defaults are the authors' (BackdoorBench ``defense/ft-sam.py`` and ``config/defense/ft-sam/
cifar10.yaml``, which the paper's authors wrote): adaptive, rho 2, label smoothing 0.1, SGD lr
0.01, momentum 0.9, weight decay 5e-4, cosine annealing, 100 epochs. Where this differs:

- The learning rate follows a cosine from ``lr`` to 0 over the epochs, set at each epoch's start
  (``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max`` = epochs, stepped per epoch).
  BackdoorBench builds ``CosineAnnealingLR(T_max=100)`` and steps it after every batch, so its
  rate swings between 0.01 and 0 every 200 batches; the paper's text and the config's epoch count
  say a cosine over the run was meant.
- The data are the defender's split and the repair's batches (128, no augmentation unless the
  repair's ``augment`` is set), paired with every other repair of the model; BackdoorBench
  fine-tunes on 5 % of the training set (class-balanced), batches of 256, random crop and flip.
- BackdoorBench's gradient decomposition (GSAM, ``alpha``) is not offered: its FT-SAM config sets
  alpha 0, where it does nothing.
- The loss is reported as the cross-entropy against the smoothed labels; BackdoorBench reports the
  Kullback-Leibler divergence to them, which differs by the smoothed labels' entropy (a constant),
  so the gradients are the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.ml.repair import RepairConfig, sgd
from engine.ml.runtime import autocast
from engine.reporter import Reporter

PERTURB_EPS = 1e-12  # added to the gradient norm, as BackdoorBench's SAM


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against labels with ``1 - smoothing`` on the true class and ``smoothing``
    spread evenly over the others (BackdoorBench's ``smooth_crossentropy``; torch's
    ``label_smoothing`` also gives the true class its share)."""
    if smoothing == 0.0:
        return F.cross_entropy(logits, y)
    classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / (classes - 1))
    target.scatter_(1, y[:, None], 1.0 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise with the batch's statistics (train mode) but leave their
    running statistics as they are (momentum 0), as SAM's second pass does."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for module, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum


class SAMStep:
    """The FT-SAM repair step (see the module's docstring); ``epochs`` sets the cosine's length."""

    train_mode = True

    def __init__(
        self,
        device: torch.device,
        precision: str,
        *,
        rho: float = 2.0,
        adaptive: bool = True,
        label_smoothing: float = 0.1,
        lr: float = 0.01,
        epochs: int = 100,
    ):
        self.device, self.precision = device, precision
        self.rho, self.adaptive, self.label_smoothing = rho, adaptive, label_smoothing
        self.lr, self.epochs = lr, epochs

    def make_optimizer(self, model: nn.Module, config: RepairConfig) -> torch.optim.Optimizer:
        return sgd(model, config)

    def learning_rate(self, epoch: int) -> float:
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * epoch / self.epochs))

    def start_epoch(self, model: nn.Module, epoch: int, reporter: Reporter | None) -> dict:
        return {}

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = model(x)
        return smoothed_cross_entropy(logits.float(), y, self.label_smoothing)

    def update(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        loss = self._loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            shifts = ascent(params, self.rho, self.adaptive)
            torch._foreach_add_(params, shifts)
        with frozen_batchnorm_statistics(model):
            perturbed = self._loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            perturbed.backward()
        with torch.no_grad():
            torch._foreach_sub_(params, shifts)
        optimizer.step()
        return loss.detach()


def ascent(params: list[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """SAM's weight perturbation from the gradients in ``params``: rho * g / ||g||, or for ASAM
    rho * w^2 g / ||w g|| (the norm over all parameters together)."""
    if not params:
        return []
    if adaptive:
        norms = [torch.linalg.vector_norm(p.abs() * p.grad) for p in params]
    else:
        norms = [torch.linalg.vector_norm(p.grad) for p in params]
    scale = rho / (torch.linalg.vector_norm(torch.stack(norms)) + PERTURB_EPS)
    if adaptive:
        return [p.grad * scale * p.square() for p in params]
    return [p.grad * scale for p in params]
