"""MesaTrainer.step against the method's equations (mesa-method.md section 3), written out here
independently of engine/ml/mesa.py's loss code.

Per (beta, target) run and step, with b images x_j, noise z_j, z'_j, jitter eps_j, placements:
    t_j   = G(z_j)                                   (G in train mode: batch-norm statistics)
    p_j   = softmax(B(normalise(stamp(x_j, clamp(t_j + eps_j, 0, 1)))))[target]
    hinge = mean_j min(p_j, beta)                    (score ce: mean_j max(0, CE_j + log beta))
    I     = mean_j T(z_j, t_j) - log(mean_j exp T(z'_j, t_j) + 1e-8)
    L_G   = -hinge - alpha * I                       (score ce: hinge - alpha * I)
then, with fresh z2, z2' and t2 = G(z2) after G's Adam step,
    e = mean exp T(z2', t2),  m = e at the first step, else (1 - rate) m + rate e  (detached)
    L_T = -(mean T(z2, t2) - log(e) * e / m)        (the gradient of log e is scaled by e / m)

As mesa-method.md says, the moving average corrects only T's step: G's entropy term is the plain
bound I (section 3, steps 6 and 7), and the hinge is min(p, beta), the poster's max(0, beta - F)
up to a constant. Only the networks' definitions, the random stream and the frozen model are
shared with the trainer: the test replays the trainer's stream (its order of draws: the epoch's
image order on the first step, z, z', eps, rows, columns, then z2, z2') so both see the same
numbers. Every MesaConfig default is used (alpha 0.1, lr 2e-4, hidden 512, batch 128, uniform
noise, jitter 0.1 clamped, per-image placement, MA rate 0.001), the three betas trained batched.
Step 2 starts the reference from the trainer's weights after step 1 (so that Adam's near-zero
gradients cannot amplify rounding) but keeps its own moving average: at step 1 m = e hides the
bias correction, at step 2 it shows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.ml.data import Normalizer
from engine.ml.mesa import MesaConfig, MesaTrainer
from tests.ml.planted import PlantedBackdoor, synthetic

TARGET = 1
TIGHT = dict(rtol=1e-4, atol=1e-7)


# -- the equations, written out ----------------------------------------------------------------


def paste(images, patterns, rows, cols):
    """Overwrite a k x k patch of each image (no mask, no blending)."""
    k = patterns.shape[-1]
    out = images.clone()
    for i in range(images.shape[0]):
        out[i, :, rows[i] : rows[i] + k, cols[i] : cols[i] + k] = patterns[i]
    return out


def hinge_term(logits, target, beta, score):
    if score == "prob":
        return logits.softmax(1)[:, target].clamp(max=beta).mean()
    ce = -logits.log_softmax(1)[:, target]
    return F.relu(ce + torch.log(torch.tensor(beta))).mean()


def dv_bound(T, z, z_marginal, t):
    """Donsker-Varadhan lower bound of I(z; t) with the marginal pairs (z', t)."""
    return T(z, t).mean() - torch.log(torch.exp(T(z_marginal, t)).mean() + 1e-8)


def statistics_loss(T, z, z_marginal, t, m_before, rate):
    """Minus MINE's bias-corrected objective, and the moving average after this step."""
    e = torch.exp(T(z_marginal, t)).mean()
    m = e.detach() if m_before is None else (1 - rate) * m_before + rate * e.detach()
    return -(T(z, t).mean() - torch.log(e) * e.detach() / m), m


def draws(stream, cfg, n_images, image_size, first):
    """The trainer's random draws of one step, in its order."""
    b, k, h = cfg.batch_size, cfg.trigger_size, image_size
    order = torch.randperm(n_images, generator=stream) if first else None
    z = torch.rand(b, cfg.noise_dim, generator=stream)
    z_marginal = torch.rand(b, cfg.noise_dim, generator=stream)
    eps = torch.randn(b, 3, k, k, generator=stream) * cfg.jitter
    rows = torch.randint(0, h - k + 1, (b,), generator=stream)
    cols = torch.randint(0, h - k + 1, (b,), generator=stream)
    z2 = torch.rand(b, cfg.noise_dim, generator=stream)
    z2_marginal = torch.rand(b, cfg.noise_dim, generator=stream)
    return order, z, z_marginal, eps, rows, cols, z2, z2_marginal


def reference_step(run, before, model, images, cfg, order, m_before, score):
    """Replays one step of ``run`` from ``before`` (G, T and the stream before the step)."""
    G, T = copy.deepcopy(before["G"]).train(), copy.deepcopy(before["T"]).train()
    stream = torch.Generator()
    stream.set_state(before["stream"])
    new_order, z, zm, eps, rows, cols, z2, z2m = draws(
        stream, cfg, images.shape[0], images.shape[-1], order is None
    )
    order = new_order if new_order is not None else order
    start = before["cursor"] if new_order is None else 0
    x = images[order[start : start + cfg.batch_size]].float() / 255
    t = G(z)
    stamped = paste(x, (t + eps).clamp(0, 1), rows, cols)  # normaliser: mean 0, std 1
    hinge = hinge_term(model(stamped), run.target, run.beta, score)
    mine = dv_bound(T, z, zm, t)
    loss_g = (-hinge if score == "prob" else hinge) - cfg.alpha * mine
    grads_g = torch.autograd.grad(loss_g, list(G.parameters()))
    # T's step sees G after its update: the trainer's G now (BN running statistics aside).
    t2 = copy.deepcopy(run.G).train()(z2).detach()
    loss_t, m = statistics_loss(T, z2, z2m, t2, m_before, cfg.ma_rate)
    grads_t = torch.autograd.grad(loss_t, list(T.parameters()))
    return dict(hinge=hinge, mine=mine, grads_g=grads_g, grads_t=grads_t, m=m, order=order)


def assert_first_adam_step(before, after, grads, lr):
    """Adam's first step is p - lr * g / (|g| + 1e-8) whatever its betas. Entries with a
    vanishing gradient (a bias just before batch norm: zero up to rounding) are left out."""
    for (name, p0), p1, g in zip(before.named_parameters(), after.parameters(), grads, strict=True):
        live = g.abs() > 1e-6
        expected = p0 - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p1[live], expected[live], **TIGHT, msg=f"Adam step: {name}")


def snapshot(run):
    return dict(
        G=copy.deepcopy(run.G),
        T=copy.deepcopy(run.T),
        stream=run.stream.get_state(),
        cursor=run.cursor,
    )


@pytest.mark.parametrize("score", ["prob", "ce"])
def test_first_steps_follow_the_equations(score):
    model = PlantedBackdoor(target=TARGET).eval()
    with torch.no_grad():  # a weaker backdoor: p lands on both sides of every beta
        model.threshold.fill_(0.0)
    images, _ = synthetic(256, seed=3)
    cfg = MesaConfig(score=score, placement="per-image")  # the paper's equations
    pairs = [(beta, TARGET, f"beta={beta}") for beta in cfg.betas]
    trainer = MesaTrainer(model, Normalizer((0.0,) * 3, (1.0,) * 3), images, pairs, cfg, seed=5)
    orders, averages = [None] * len(pairs), [None] * len(pairs)
    for step in (1, 2):
        before = [snapshot(run) for run in trainer.runs]
        row = trainer.step()
        for i, run in enumerate(trainer.runs):
            ref = reference_step(run, before[i], model, images, cfg, orders[i], averages[i], score)
            if step == 1:  # the updates: Adam, lr 2e-4, on both networks
                assert_first_adam_step(before[i]["G"], run.G, ref["grads_g"], cfg.lr_g)
                assert_first_adam_step(before[i]["T"], run.T, ref["grads_t"], cfg.lr_t)
            orders[i], averages[i] = ref["order"], ref["m"]
            where = f"step {step}, beta {run.beta}"
            torch.testing.assert_close(row[i, 0], ref["hinge"].detach(), **TIGHT, msg=where)
            torch.testing.assert_close(row[i, 1], ref["mine"].detach(), **TIGHT, msg=where)
            for (name, p), g in zip(run.G.named_parameters(), ref["grads_g"], strict=True):
                torch.testing.assert_close(p.grad, g, **TIGHT, msg=f"{where}: G.{name}")
            for (name, p), g in zip(run.T.named_parameters(), ref["grads_t"], strict=True):
                torch.testing.assert_close(p.grad, g, **TIGHT, msg=f"{where}: T.{name}")
            ma = run.mine_objective.moving_average
            torch.testing.assert_close(ma, ref["m"], **TIGHT, msg=where)
    # The hinge was active and saturated somewhere, so both of its branches were checked.
    assert float(row[:, 3].min()) > 0.0 and float(row[:, 3].max()) < 1.0
