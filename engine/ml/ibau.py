"""I-BAU: implicit backdoor adversarial unlearning as a repair step.

Y. Zeng, S. Chen, W. Park, Z. M. Mao, M. Jin, R. Jia, "Adversarial Unlearning of Backdoors via
Implicit Hypergradient", ICLR 2022.

The minimax problem min_theta max_delta mean L(f_theta(x + delta), y) over one universal additive
perturbation delta, solved in rounds. Each round (a repair epoch here) first finds the
perturbation: delta starts at zero and takes one SGD step (lr 10) per batch over the defender's
images, maximising the cross-entropy against the model's own predictions with an L2 penalty
(1e-3 ||delta||^2). Then each batch updates the model with the implicit hypergradient of the outer
loss (cross-entropy with delta added to a ``portion`` of the batch): the direct gradient plus
(d F / d theta)^T v, where F(delta) = delta - 0.1 * grad_delta H(delta, theta) is one gradient step
of the inner objective H = -CE(f(x + delta), y) + 1e-3 ||delta||^2 and v approximates
(I - dF/d delta)^-T dL/d delta by K fixed-point (Neumann) iterations. Adam takes the step. The
model stays in eval mode throughout (BatchNorm's running statistics fixed), as in the reference.

Defaults are the authors' (``YiZeng623/I-BAU`` ``defense.py``): 5 rounds, K = 5, Adam lr 1e-3
(BackdoorBench uses 1e-4), portion 0.01, perturbation lr 10, inner step 0.1, penalty 1e-3, the
perturbation in normalised pixel space and unclamped. Where this differs:

- The fixed-point map's inner loss is computed on the current batch; the reference's
  ``loss_inner`` reads ``images_list[0]``, the first batch, for every hypergradient, which ties
  them all to 100 images where the paper's inner objective is over the same data as the outer.
- The ``portion`` of perturbed rows is ``max(1, int(portion * n))`` rows per batch, drawn from the
  method's own stream; the reference's ``int(portion * n)`` perturbs no row at all in a batch of
  fewer than 100 images, which leaves only a plain fine-tuning step.
- Batches are the repair's (128, a new order each round, paired with every other repair); the
  reference uses batches of 100 in one fixed order. The perturbation pass visits the defender's
  images in an order of its own stream.
- The fixed-point iteration starts from v = dL/d delta, which is where the reference's first
  iteration (from v = 0) arrives, and stops early on the same tolerance (1e-10).
- The unlearning data are the defender split, as for every repair here (in the paper-figure
  study the 8,000 CIFAR-10 test images not held out); the reference unlearns on the first 5,000
  test images, BackdoorBench on a share (``ratio``) of the clean training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.ml.data import Normalizer, batch_indices, to_float
from engine.ml.repair import RepairConfig
from engine.ml.runtime import autocast
from engine.reporter import Reporter, or_null, stop_point

PERTURBATION_LR = 10.0  # SGD step of the universal perturbation (the reference's batch_opt)
INNER_STEP = 0.1  # the fixed-point map's gradient step (the reference's GradientDescent(…, 0.1))
PENALTY = 1e-3  # weight of ||delta||^2 in the inner objective
TOLERANCE = 1e-10  # the fixed-point iteration stops once an update moves v less than this


class IBAUStep:
    """The I-BAU repair step (see the module's docstring). ``images_u8`` are the defender's
    images (the perturbation pass reads them all), ``generator`` the method's own stream."""

    train_mode = False

    def __init__(
        self,
        device: torch.device,
        precision: str,
        images_u8: torch.Tensor,
        normalizer: Normalizer,
        generator: torch.Generator,
        *,
        k: int = 5,
        lr: float = 1e-3,
        portion: float = 0.01,
        batch_size: int = 128,
        channels_last: bool = True,
    ):
        self.device, self.precision = device, precision
        self.images, self.normalizer, self.generator = images_u8, normalizer, generator
        self.k, self.lr, self.portion, self.batch_size = k, lr, portion, batch_size
        self.channels_last = channels_last
        self.perturbation: torch.Tensor | None = None

    def make_optimizer(self, model: nn.Module, config: RepairConfig) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def learning_rate(self, epoch: int) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.normalizer.inplace(to_float(self.images[idx]))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def start_epoch(self, model: nn.Module, epoch: int, reporter: Reporter | None) -> dict:
        """The round's universal perturbation: one pass over the defender's images."""
        model.eval()
        n = self.images.shape[0]
        shape = (1, *self.images.shape[1:])
        delta = torch.zeros(shape, device=self.device, requires_grad=True)
        optimizer = torch.optim.SGD([delta], lr=PERTURBATION_LR)
        fooled = torch.zeros((), device=self.device)
        for idx in batch_indices(n, self.batch_size, self.generator, device=self.device):
            stop_point(or_null(reporter))
            x = self._batch(idx)
            with torch.no_grad(), autocast(self.device, self.precision):
                predicted = model(x).argmax(1)
            with autocast(self.device, self.precision):
                logits = model(x + delta)
            loss = -F.cross_entropy(logits.float(), predicted) + PENALTY * delta.square().sum()
            (delta.grad,) = torch.autograd.grad(loss, delta)
            optimizer.step()
            fooled += (logits.detach().argmax(1) != predicted).sum()
        self.perturbation = delta.detach()
        return {
            "ibau/perturbation_l2": float(self.perturbation.norm()),
            "ibau/fooled": float(fooled / n),
        }

    def update(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        if self.perturbation is None:
            raise RuntimeError("I-BAU's step ran before its round's perturbation was found")
        params = [p for p in model.parameters() if p.requires_grad]
        n = x.shape[0]
        rows = max(1, int(self.portion * n)) if self.portion > 0 else 0
        chosen = torch.randperm(n, generator=self.generator)[:rows].to(x.device)
        carries = torch.zeros(n, 1, 1, 1, device=x.device)
        carries[chosen] = 1.0
        delta = self.perturbation.clone().requires_grad_(True)

        # The outer loss and its direct gradients.
        with autocast(self.device, self.precision):
            logits = model(x + carries * delta)
        outer = F.cross_entropy(logits.float(), y)
        grads = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
        g_delta = grads[0] if grads[0] is not None else torch.zeros_like(delta)
        direct = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads[1:], params, strict=True)
        ]

        # The fixed-point map: one gradient step of the inner objective, kept differentiable.
        with autocast(self.device, self.precision):
            inner_logits = model(x + delta)
        inner = -F.cross_entropy(inner_logits.float(), y) + PENALTY * delta.square().sum()
        (d_inner,) = torch.autograd.grad(inner, delta, create_graph=True)
        mapped = delta - INNER_STEP * d_inner

        # v = sum_i (dF/d delta)^T^i dL/d delta, i < K (the Neumann series of the implicit term).
        v = g_delta
        for _ in range(self.k - 1):
            (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
            updated = jv + g_delta
            moved = float(torch.linalg.vector_norm(updated - v))
            v = updated
            if moved < TOLERANCE:
                break
        implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
        for p, d, i in zip(params, direct, implicit, strict=True):
            p.grad = d if i is None else d + i
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outer.detach()
