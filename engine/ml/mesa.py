"""MESA: max-entropy staircase approximation of a backdoor's trigger distribution.

One generator per threshold beta learns to spread its samples as widely as possible (a MINE
estimate of I(z; G(z)) as the entropy term) while staying inside {t : F(t) > beta}, with F the
frozen backdoored model's target-class score on images stamped with t (mesa-method.md section 3).

Public entry points:

- ``search(model, normalizer, images_u8, target, config, *, labels=None, device="cpu",
  precision="fp32", reporter=None, true_pattern=None, bw_stats=False, seed=0, checkpoint=None)
  -> SearchResult``
  trains one generator per beta in ``config.betas`` on any model and returns the generators,
  statistics networks, samples and final statistics (``result.metrics`` is flat, keys
  ``mesa/beta=0.9/validity`` ...; ``result.validity(beta)``, ``result.best_validity``).
  ``search_targets`` does the same for several (beta, target) pairs at once (detection).
  ``checkpoint=SearchCheckpoint(path, resume)`` saves the whole state now and then (networks,
  optimisers, MINE moving averages, every random stream) and continues from it exactly.
- ``write_search_artifact(result, directory, ...)`` writes the search artifact: per beta
  ``beta=0.9/G.safetensors``, ``T.safetensors``, ``samples.npy``, ``grid.png``; ``embedding.png``,
  ``stats.json`` and the manifest (kind ``search``).
- ``open_search(directory, device="cpu") -> SearchArtifact`` reads it back;
  ``SearchArtifact.sampler(beta=None, ensemble=None) -> TriggerSampler`` gives triggers
  ``sampler.sample(n, generator)`` of shape (n, C, k, k) in [0, 1] on the search's device;
  ``sampler.set_epoch(epoch)`` switches generators for the round-robin ensemble.

All betas of a search train in one process: their stamped batches go through the frozen model as
one concatenated batch per step. Each (beta, target) pair owns its generator, statistics network,
optimisers and random stream, so a pair's arithmetic does not depend on which others train beside
it (the frozen model is in eval mode, so its images are independent).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import UserError
from engine.ml import checkpoint as ckpt
from engine.ml.data import Normalizer, to_float
from engine.ml.models import fold_batchnorm
from engine.ml.position_scan import (
    PositionScan,
    ScanConfig,
    position_prior,
    position_support,
    scan_draws,
    scan_positions,
)
from engine.ml.repair import TriggerSampler
from engine.ml.runtime import autocast, resolve_precision
from engine.ml.triggers import Placement, position_grid, sample_positions, stamp
from engine.reporter import Reporter, or_null, stop_point

ENSEMBLES = ("round-robin", "equal", "staircase")
SEARCH_PLACEMENTS = ("per-image", "per-batch", "learned")
# Share of the position grid's cells whose mass ``pos_top_mass`` reports (the top 5 %).
TOP_CELLS = 0.05
HIST_BINS = 10
# MesaConfig fields that only the ``learned`` placement reads (left out of the others' JSON).
LEARNED_ONLY = (
    "position_alpha",
    "position_prior",
    "position_memory",
    "scan_probes",
    "scan_images",
    "scan_min_lift",
)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MesaConfig:
    """Every knob of a search; defaults follow mesa-method.md section 3 (the script's choices,
    its defects corrected). They stay here so the ML layer runs alone (the GPU benchmarks);
    a job's search is built by ``MesaSpec.mesa_config()``, whose defaults a test keeps equal."""

    betas: tuple[float, ...] = (0.9, 0.8, 0.5)
    alpha: float = 0.1
    steps: int = 620
    batch_size: int = 128
    hidden: int = 512
    noise_dim: int = 64
    noise_chunks: int = 4
    lr_g: float = 2e-4
    lr_t: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    noise: str = "uniform"
    score: str = "prob"
    jitter: float = 0.1
    jitter_clamp: bool = True
    placement: str = "learned"  # the spec's default (engine.specs.MesaSpec)
    trigger_size: int = 3
    ma_rate: float = 0.001
    stats_every: int = 20
    sample_every: int = 200
    n_eval_triggers: int = 64
    eval_images: int = 128
    samples: int = 1024
    knn_k: int = 3
    channels_last: bool = True
    # ``learned`` placement only (docs/method.md): pi = softmax(r / position_alpha), the
    # maximiser of E_pi[r] + position_alpha * H(pi), with r per offset the running mean of
    # min(log F, log beta) of the stamps that landed there, shrunk towards the mean offset by
    # ``position_prior`` pseudo-visits and forgotten with a time constant of
    # ``position_memory`` steps (the generator improves; old visits count less).
    position_alpha: float = 0.5
    position_prior: float = 2.0
    position_memory: float = 100.0
    # Before the search, the position scan (engine.ml.position_scan): probe patterns at every
    # offset. A target whose map peaks (lift >= scan_min_lift) is searched only where it peaks,
    # the scan's probabilities as the first pseudo-visits; otherwise pi starts uniform.
    scan_probes: int = 16
    scan_images: int = 16
    scan_min_lift: float = 0.25

    def __post_init__(self) -> None:
        # The settings a person gives are checked by engine.specs.MesaSpec; these two are not
        # settings of any spec.
        if self.noise_dim % self.noise_chunks or self.noise_chunks < 2:
            raise UserError(
                f"noise_dim {self.noise_dim} does not split into {self.noise_chunks} chunks; "
                "use a multiple of the chunk count (at least 2 chunks)"
            )

    @property
    def learned(self) -> bool:
        return self.placement == "learned"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["adam_betas"] = list(self.adam_betas)
        if not self.learned:  # the random placements' configs read as they always did
            for key in LEARNED_ONLY:
                d.pop(key)
        return d


def beta_label(beta: float) -> str:
    """The beta as it appears in metric keys and folder names (``0.9``)."""
    return f"{beta:g}"


# ---------------------------------------------------------------------------------------------
# Networks


class TriggerGenerator(nn.Module):
    """G: noise split into chunks; each layer sees the previous hidden state and a fresh chunk;
    a sigmoid maps to a (C, k, k) patch in pixel space."""

    def __init__(
        self,
        hidden: int = 512,
        channels: int = 3,
        size: int = 3,
        noise_dim: int = 64,
        chunks: int = 4,
    ):
        super().__init__()
        self.hidden, self.channels, self.size = hidden, channels, size
        self.noise_dim, self.chunks = noise_dim, chunks
        self.chunk = noise_dim // chunks
        widths = [self.chunk] + [hidden + self.chunk] * (chunks - 2)
        self.layers = nn.ModuleList(nn.Linear(w, hidden) for w in widths)
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in widths)
        self.out = nn.Linear(hidden + self.chunk, channels * size * size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.split(self.chunk, dim=1)
        h = F.leaky_relu(self.norms[0](self.layers[0](parts[0])), 0.2)
        for i in range(1, self.chunks - 1):
            h = F.leaky_relu(self.norms[i](self.layers[i](torch.cat([h, parts[i]], 1))), 0.2)
        out = torch.sigmoid(self.out(torch.cat([h, parts[-1]], 1)))
        return out.view(-1, self.channels, self.size, self.size)


class StatisticsNetwork(nn.Module):
    """T(z, t): a1 = LReLU(Wz z + Wt t + b), a2 = LReLU(Linear(a1)), T = LReLU(Linear(a2))."""

    def __init__(self, noise_dim: int = 64, trigger_dim: int = 27, hidden: int = 512):
        super().__init__()
        self.wz = nn.Linear(noise_dim, hidden, bias=False)
        self.wt = nn.Linear(trigger_dim, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a1 = F.leaky_relu(self.wz(z) + self.wt(t.flatten(1)) + self.bias, 0.2)
        a2 = F.leaky_relu(self.fc2(a1), 0.2)
        return F.leaky_relu(self.fc3(a2), 0.2).squeeze(1)


def draw_noise(
    n: int,
    dim: int,
    kind: str,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generator input: U[0,1)^dim (the script) or N(0, I) (the poster)."""
    if kind == "gaussian":
        return torch.randn(n, dim, generator=generator, device=device)
    return torch.rand(n, dim, generator=generator, device=device)


# ---------------------------------------------------------------------------------------------
# MINE


def mine_estimate(
    stat_net: nn.Module, z: torch.Tensor, z_marginal: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Donsker-Varadhan lower bound on I(z; t): mean T(z,t) - log(mean exp T(z',t) + 1e-8)."""
    joint = stat_net(z, t).mean()
    marginal = torch.exp(stat_net(z_marginal, t)).mean()
    return joint - torch.log(marginal + 1e-8)


class MineObjective:
    """The bias-corrected objective for T's step: mean T(z,t) - log(e) * e.detach() / m, with
    m an exponential moving average of e = mean exp T(z',t) (rate 0.001, starts at the first e)."""

    def __init__(self, rate: float = 0.001):
        self.rate = rate
        self.moving_average: torch.Tensor | None = None

    def __call__(
        self, stat_net: nn.Module, z: torch.Tensor, z_marginal: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        joint = stat_net(z, t).mean()
        e = torch.exp(stat_net(z_marginal, t)).mean()
        if self.moving_average is None:
            self.moving_average = e.detach()
        else:
            self.moving_average = (1 - self.rate) * self.moving_average + self.rate * e.detach()
        return joint - torch.log(e) * e.detach() / self.moving_average


# ---------------------------------------------------------------------------------------------
# Sample statistics


def knn_entropy(samples: torch.Tensor, k: int = 3) -> float:
    """Kozachenko-Leonenko k-NN differential entropy estimate in nats of (N, ...) samples."""
    x = samples.detach().flatten(1).double().cpu()
    n, d = x.shape
    if n <= k:
        return float("nan")
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    radius = dist.kthvalue(k, dim=1).values.clamp_min(1e-12)
    log_unit_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    digamma = torch.special.digamma
    return float(
        digamma(torch.tensor(float(n), dtype=torch.float64))
        - digamma(torch.tensor(float(k), dtype=torch.float64))
        + log_unit_ball
        + d * torch.log(radius).mean()
    )


def bw_ids(samples: torch.Tensor) -> torch.Tensor:
    """Binarise (N, C, 3, 3) samples (channel mean > 0.5) to black/white ids 0..511."""
    bits = (samples.detach().float().mean(dim=1).flatten(1) > 0.5).long()
    weights = 2 ** torch.arange(bits.shape[1] - 1, -1, -1, device=bits.device)
    return (bits * weights).sum(1)


def diversity_stats(
    samples: torch.Tensor,
    *,
    k: int = 3,
    true_pattern: torch.Tensor | None = None,
    bw: bool = False,
) -> dict[str, float]:
    """Mean pairwise L2, mean per-pixel std, k-NN entropy; bw_distinct and nearest_to_true when
    asked for (the latter needs the true trigger, so only evaluation passes it)."""
    flat = samples.detach().float().flatten(1).cpu()
    out = {
        "pairwise_l2": float(torch.pdist(flat).mean()) if flat.shape[0] > 1 else 0.0,
        "pixel_std": float(flat.std(dim=0).mean()) if flat.shape[0] > 1 else 0.0,
        "knn_entropy": knn_entropy(flat, k),
    }
    if bw and samples.shape[-1] == 3:
        out["bw_distinct"] = float(bw_ids(samples).unique().numel())
    if true_pattern is not None:
        truth = true_pattern.detach().float().flatten().cpu()
        if truth.numel() == flat.shape[1]:
            out["nearest_to_true"] = float((flat - truth).norm(dim=1).min())
    return out


@torch.no_grad()
def trigger_success(
    model: nn.Module,
    normalizer: Normalizer,
    triggers: torch.Tensor,
    images_u8: torch.Tensor,
    positions: torch.Tensor,
    target: int,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    max_batch: int = 2048,
    per_image: bool = False,
) -> torch.Tensor:
    """Each trigger's own ASR: share of ``images_u8`` stamped with it (at fixed ``positions``)
    that the model classifies as ``target``. Returns (K,) floats on the CPU; with ``per_image``
    the (K, M) hits (1.0: image m stamped with trigger k went to ``target``) instead."""
    device = images_u8.device
    m = images_u8.shape[0]
    x = to_float(images_u8)
    per_chunk = max(1, max_batch // max(m, 1))
    out = []
    for start in range(0, triggers.shape[0], per_chunk):
        chunk = triggers[start : start + per_chunk].to(device)
        kc = chunk.shape[0]
        xs = x.repeat(kc, 1, 1, 1)
        pats = chunk.repeat_interleave(m, dim=0)
        xs = normalizer(stamp(xs, pats, positions.repeat(kc, 1)))
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            pred = model(xs).argmax(1)
        hits = (pred == target).float().view(kc, m)
        out.append(hits.cpu() if per_image else hits.mean(1).cpu())
    if not out:
        return torch.zeros(0, m) if per_image else torch.zeros(0)
    return torch.cat(out)


def position_stats(probs: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Summary of a distribution over the position grid (Hp, Wp): its entropy in nats and as a
    share of the uniform's (1.0: uniform), the mass of the top 5 % of cells, the largest cell's
    mass and that cell (row, col of the patch's top-left pixel)."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    flat = p.flatten()
    flat = flat / flat.sum().clamp_min(1e-300)
    n = flat.numel()
    entropy = float(-(flat * flat.clamp_min(1e-300).log()).sum())
    top = max(1, math.ceil(TOP_CELLS * n))
    best = int(flat.argmax())
    return {
        "pos_entropy": entropy,
        "pos_entropy_ratio": entropy / math.log(n) if n > 1 else 1.0,
        "pos_top_mass": float(flat.topk(top).values.sum()),
        "pos_top_share": float(flat[best]),
        "pos_top_row": float(best // p.shape[-1]),
        "pos_top_col": float(best % p.shape[-1]),
    }


def top_positions(probs: torch.Tensor | np.ndarray, count: int = 5) -> list[list[float]]:
    """The ``count`` most likely cells as [row, col, mass], most likely first."""
    p = np.asarray(probs, dtype=np.float64)
    flat = p.reshape(-1) / max(p.sum(), 1e-300)
    order = np.argsort(-flat, kind="stable")[:count]
    return [[int(i // p.shape[-1]), int(i % p.shape[-1]), float(flat[i])] for i in order]


def validity_stats(success: torch.Tensor, beta: float) -> tuple[dict[str, float], list[int]]:
    """Validity share (own ASR >= beta), mean own ASR, and a 10-bin histogram over [0, 1]."""
    hist = torch.histc(success.float(), bins=HIST_BINS, min=0.0, max=1.0)
    return (
        {
            "validity": float((success >= beta).float().mean()),
            "validity_mean": float(success.mean()),
        },
        [int(v) for v in hist.tolist()],
    )


# ---------------------------------------------------------------------------------------------
# Training


def _run_seed(seed: int, beta: float, target: int) -> int:
    """A stream seed that depends on the pair, not on its position among the others."""
    return (seed * 1_000_003 + round(beta * 1_000_000) * 7919 + target * 104_729) % (2**62)


@dataclass
class _Run:
    """One (beta, target) pair: its networks, optimisers and random stream."""

    beta: float
    target: int
    key: str
    G: TriggerGenerator
    T: StatisticsNetwork
    opt_g: torch.optim.Optimizer
    opt_t: torch.optim.Optimizer
    stream: torch.Generator
    mine_objective: MineObjective
    order: torch.Tensor | None = None
    cursor: int = 0
    # ``learned`` placement: per offset (flat grid, float64 on the CPU) the decayed sum of the
    # capped log scores of the stamps that landed there, and the decayed count of them.
    pos_sums: torch.Tensor | None = None
    pos_counts: torch.Tensor | None = None
    # The offsets the scan allowed (flat bool), None for all of them.
    support: torch.Tensor | None = None

    @property
    def learned(self) -> bool:
        return self.pos_sums is not None

    def position_probs(self, grid: tuple[int, int], config: MesaConfig) -> torch.Tensor:
        """pi (Hp, Wp) float32: softmax of the offsets' shrunk mean rewards / position_alpha."""
        assert self.pos_sums is not None and self.pos_counts is not None
        return position_distribution(self.pos_sums, self.pos_counts, config, self.support).view(
            grid
        )


def position_distribution(
    sums: torch.Tensor,
    counts: torch.Tensor,
    config: MesaConfig,
    support: torch.Tensor | None = None,
) -> torch.Tensor:
    """The max-entropy position distribution for the current reward estimates (flat, float32).

    r_j = (sum_j + n0 * m) / (count_j + n0), with m the mean of the visited offsets' own means
    (an offset never visited, or long ago, reads as an average one) and n0 = position_prior;
    pi = softmax(r / position_alpha) maximises E_pi[r] + position_alpha * H(pi). Before any
    visit every r_j is equal: pi is uniform, the paper's per-image placement. Offsets outside
    ``support`` (the position scan's peak) get no mass."""
    allowed = torch.ones_like(sums, dtype=torch.bool) if support is None else support
    visited = (counts > 1e-6) & allowed
    if not bool(visited.any()):
        return (allowed.float() / allowed.sum()).float()
    mean = float((sums[visited] / counts[visited]).mean())
    reward = (sums + config.position_prior * mean) / (counts + config.position_prior)
    reward = reward.masked_fill(~allowed, float("-inf"))
    return torch.softmax(reward / config.position_alpha, 0).float()


class MesaTrainer:
    """Alternating generator and statistics-network steps for several (beta, target) pairs, their
    stamped batches concatenated into one forward/backward pass of the frozen model.

    ``step()`` leaves each generator's gradients of the step in place (until the next step), so
    tests can compare them.
    """

    def __init__(
        self,
        model: nn.Module,
        normalizer: Normalizer,
        images_u8: torch.Tensor,
        pairs: list[tuple[float, int, str]],
        config: MesaConfig,
        *,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        seed: int = 0,
        position_scan: PositionScan | None = None,
        pi_without_peak: bool = False,
    ):
        self.device = torch.device(device)
        self.pi_without_peak = pi_without_peak
        self.precision = resolve_precision(precision, self.device)
        self.config = config
        # Frozen: eval-mode BN (images independent) and no weight gradients, only input gradients;
        # BN folded into the convolutions (the same function, less work each way).
        self.model = fold_batchnorm(model).requires_grad_(False)
        if config.channels_last and self.device.type != "mps":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalizer = normalizer
        self.images = images_u8.to(self.device)
        if self.images.dtype != torch.uint8:
            raise UserError("search images must be uint8 (N, C, H, W); pass the dataset tensors")
        self.channels = int(self.images.shape[1])
        self.image_size = (int(self.images.shape[2]), int(self.images.shape[3]))
        if self.images.shape[0] < config.batch_size:
            raise UserError(
                f"the defender split has {self.images.shape[0]} images, fewer than the batch size "
                f"{config.batch_size}; lower --batch-size"
            )
        self.learned = config.learned
        self.placement = Placement("per-image" if self.learned else config.placement)
        self.grid = position_grid(self.image_size, config.trigger_size)
        self.use_channels_last = config.channels_last and self.device.type != "mps"
        self.step_count = 0
        self.runs: list[_Run] = []
        k = config.trigger_size
        for beta, target, key in pairs:
            run_seed = _run_seed(seed, beta, target)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run_seed)
                G = TriggerGenerator(
                    config.hidden, self.channels, k, config.noise_dim, config.noise_chunks
                )
                T = StatisticsNetwork(config.noise_dim, self.channels * k * k, config.hidden)
            G, T = G.to(self.device).train(), T.to(self.device).train()
            pos_sums = pos_counts = support = None
            if self.learned:
                pos_sums, pos_counts, support = self._position_start(position_scan, beta, target)
            self.runs.append(
                _Run(
                    beta=beta,
                    target=target,
                    key=key,
                    G=G,
                    T=T,
                    opt_g=torch.optim.Adam(G.parameters(), lr=config.lr_g, betas=config.adam_betas),
                    opt_t=torch.optim.Adam(T.parameters(), lr=config.lr_t, betas=config.adam_betas),
                    stream=torch.Generator().manual_seed(run_seed),
                    mine_objective=MineObjective(config.ma_rate),
                    pos_sums=pos_sums,
                    pos_counts=pos_counts,
                    support=support,
                )
            )
        self.targets = torch.tensor(
            [r.target for r in self.runs], device=self.device
        ).repeat_interleave(config.batch_size)
        # Per-run sums since the last log: hinge, mine, p_target, above_beta (no host sync per step).
        self._window = torch.zeros(len(self.runs), 4, device=self.device)
        self._window_steps = 0

    # -- one step ----------------------------------------------------------------------------

    def _next_indices(self, run: _Run) -> torch.Tensor:
        b, n = self.config.batch_size, self.images.shape[0]
        if run.order is None or run.cursor + b > n:  # a new epoch; drop_last
            run.order = torch.randperm(n, generator=run.stream)
            run.cursor = 0
        idx = run.order[run.cursor : run.cursor + b]
        run.cursor += b
        return idx

    def _noise(self, run: _Run, n: int) -> torch.Tensor:
        return draw_noise(n, self.config.noise_dim, self.config.noise, run.stream)

    def step(self) -> torch.Tensor:
        """One generator step and one statistics-network step for every run.

        Returns per-run (hinge, mine, p_target, above_beta) of the generator step, shape (R, 4).
        """
        cfg, dev = self.config, self.device
        b, k = cfg.batch_size, cfg.trigger_size
        idx, zs, zms, eps, pos = [], [], [], [], []
        for run in self.runs:
            idx.append(self._next_indices(run))
            zs.append(self._noise(run, b))
            zms.append(self._noise(run, b))
            eps.append(torch.randn(b, self.channels, k, k, generator=run.stream) * cfg.jitter)
            if run.learned:
                probs = run.position_probs(self.grid, cfg)
                pos.append(sample_positions(probs, b, run.stream))
            else:
                pos.append(self.placement.sample(b, self.image_size, k, run.stream))
        idx_all = torch.cat(idx).to(dev, non_blocking=True)
        eps_all = torch.cat(eps).to(dev, non_blocking=True)
        pos_all = torch.cat(pos).to(dev, non_blocking=True)

        for run in self.runs:
            run.opt_g.zero_grad(set_to_none=True)
        triggers, mines = [], []
        for run, z, zm in zip(self.runs, zs, zms, strict=True):
            z, zm = z.to(dev, non_blocking=True), zm.to(dev, non_blocking=True)
            t = run.G(z)
            triggers.append(t)
            mines.append(mine_estimate(run.T, z, zm, t))
        t_all = torch.cat(triggers)
        stamped_patterns = t_all + eps_all
        if cfg.jitter_clamp:
            stamped_patterns = stamped_patterns.clamp(0.0, 1.0)
        x = stamp(to_float(self.images[idx_all]), stamped_patterns, pos_all)
        x = self.normalizer(x)
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, self.precision):
            logits = self.model(x)
        logits = logits.float()
        p = logits.softmax(1).gather(1, self.targets[:, None]).squeeze(1).view(len(self.runs), b)
        betas = torch.tensor([r.beta for r in self.runs], device=dev)
        mine = torch.stack(mines)
        if cfg.score == "ce":
            ce = F.cross_entropy(logits, self.targets, reduction="none").view(len(self.runs), b)
            hinge = (ce + torch.log(betas)[:, None]).clamp_min(0.0).mean(1)
            loss = hinge - cfg.alpha * mine
        else:
            hinge = torch.minimum(p, betas[:, None]).mean(1)
            loss = -hinge - cfg.alpha * mine
        loss.sum().backward()
        for run in self.runs:
            run.opt_g.step()
        if any(run.learned for run in self.runs):
            self._update_positions(p.detach(), betas, torch.cat(pos).view(len(self.runs), b, 2))

        for run in self.runs:
            z2, zm2 = self._noise(run, b).to(dev), self._noise(run, b).to(dev)
            with torch.no_grad():
                t2 = run.G(z2)
            run.opt_t.zero_grad(set_to_none=True)
            objective = run.mine_objective(run.T, z2, zm2, t2)
            (-objective).backward()
            run.opt_t.step()

        with torch.no_grad():
            row = torch.stack(
                [hinge, mine, p.mean(1), (p >= betas[:, None]).float().mean(1)], dim=1
            ).detach()
            self._window += row
        self._window_steps += 1
        self.step_count += 1
        return row

    def _position_start(
        self, scan: PositionScan | None, beta: float, target: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Sums, counts and support of a learned pi before the first step, when the scan found
        a peak for ``target``: only the peak's offsets, each with ``position_prior`` pseudo-visits
        at the scan's capped log score. Without a peak, ``pi_without_peak`` decides: a pi over
        every offset from uniform (detection and the residual check, which ask whether any
        trigger works: such a pi settles where triggers work best), or none (all three None),
        the paper's search stamped per image at uniform places (a search whose samples repair:
        a pi over the whole image collapses onto a few offsets and the repair stamped there
        leaves more of a random-position backdoor; docs/method.md)."""
        cells = self.grid[0] * self.grid[1]
        if scan is not None and scan.grid != self.grid:
            raise UserError(
                f"the position scan covers a {scan.grid[0]}x{scan.grid[1]} grid, the search "
                f"a {self.grid[0]}x{self.grid[1]} one; scan with the search's trigger size"
            )
        support = (
            None if scan is None else position_support(scan, target, self.config.scan_min_lift)
        )
        if support is None:
            if not self.pi_without_peak:
                return None, None, None
            zeros = torch.zeros(cells, dtype=torch.float64)
            return zeros, zeros.clone(), None
        visits = self.config.position_prior
        prior = position_prior(scan, target, beta)
        sums = torch.where(support, visits * prior, torch.zeros(cells, dtype=torch.float64))
        counts = torch.where(support, visits, 0.0).to(torch.float64)
        return sums, counts, support

    def _update_positions(
        self, p: torch.Tensor, betas: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Each stamp's reward min(log F, log beta) joins the running sums of its offset."""
        reward = torch.minimum(p.float().clamp_min(1e-12).log(), betas.float().log()[:, None])
        reward = reward.double().cpu()
        cells = positions[..., 0] * self.grid[1] + positions[..., 1]
        keep = 1.0 - 1.0 / self.config.position_memory
        for i, run in enumerate(self.runs):
            if run.pos_sums is None or run.pos_counts is None:  # a pair without a peak
                continue
            run.pos_sums.mul_(keep).index_add_(0, cells[i], reward[i])
            run.pos_counts.mul_(keep).index_add_(0, cells[i], torch.ones_like(reward[i]))

    def take_window(self) -> dict[str, float]:
        """Means of the live statistics since the last call, keyed ``<run key>/<name>``."""
        if self._window_steps == 0:
            return {}
        means = (self._window / self._window_steps).cpu()
        self._window.zero_()
        self._window_steps = 0
        out = {}
        for run, row in zip(self.runs, means, strict=True):
            for name, value in zip(("hinge", "mine", "p_target", "above_beta"), row, strict=True):
                out[f"{run.key}/{name}"] = float(value)
            if run.learned:
                stats = position_stats(run.position_probs(self.grid, self.config))
                out[f"{run.key}/pos_entropy"] = stats["pos_entropy"]
                out[f"{run.key}/pos_top_mass"] = stats["pos_top_mass"]
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the next steps depend on: per run the networks, optimisers, random stream,
        MINE moving average and place in the epoch; the statistics window and the step count."""
        return {
            "step": self.step_count,
            "window": self._window,
            "window_steps": self._window_steps,
            "runs": [
                {
                    "beta": r.beta,
                    "target": r.target,
                    "G": r.G.state_dict(),
                    "T": r.T.state_dict(),
                    "opt_g": r.opt_g.state_dict(),
                    "opt_t": r.opt_t.state_dict(),
                    "stream": r.stream.get_state(),
                    "moving_average": r.mine_objective.moving_average,
                    "order": r.order,
                    "cursor": r.cursor,
                    **(
                        {"pos_sums": r.pos_sums.clone(), "pos_counts": r.pos_counts.clone()}
                        if r.pos_sums is not None and r.pos_counts is not None
                        else {}
                    ),
                }
                for r in self.runs
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a trainer built with the same pairs and config."""
        if len(state["runs"]) != len(self.runs):
            raise ValueError(f"{len(state['runs'])} runs in the state, {len(self.runs)} here")
        for run, s in zip(self.runs, state["runs"], strict=True):
            if not (math.isclose(s["beta"], run.beta) and s["target"] == run.target):
                raise ValueError(f"state of beta {s['beta']} target {s['target']} for {run.key}")
            run.G.load_state_dict(s["G"])
            run.T.load_state_dict(s["T"])
            run.opt_g.load_state_dict(s["opt_g"])
            run.opt_t.load_state_dict(s["opt_t"])
            run.stream.set_state(s["stream"])
            ma = s["moving_average"]
            run.mine_objective.moving_average = None if ma is None else ma.to(self.device)
            run.order = s["order"]
            run.cursor = int(s["cursor"])
            if run.pos_sums is not None and run.pos_counts is not None:
                run.pos_sums.copy_(s["pos_sums"])
                run.pos_counts.copy_(s["pos_counts"])
        self._window = state["window"].to(self.device)
        self._window_steps = int(state["window_steps"])
        self.step_count = int(state["step"])

    # -- sampling and evaluation ---------------------------------------------------------------

    @torch.no_grad()
    def sample(self, run: _Run, n: int, generator: torch.Generator) -> torch.Tensor:
        """Triggers from a generator in eval mode (BN running statistics), on the device."""
        was_training = run.G.training
        run.G.eval()
        z = draw_noise(n, self.config.noise_dim, self.config.noise, generator).to(self.device)
        out = run.G(z)
        run.G.train(was_training)
        return out


@dataclass
class _EvalSet:
    images: torch.Tensor
    positions: torch.Tensor


def _validity_order(n: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The fixed order in which validity checks take the defender's images, and its stream
    (which goes on to draw their per-image places)."""
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randperm(n, generator=g), g


def _eval_sets(
    trainer: MesaTrainer,
    labels: torch.Tensor | None,
    seed: int,
) -> dict[int, _EvalSet]:
    """A fixed clean batch of non-target images per target, with fixed per-image positions."""
    cfg = trainer.config
    images = trainer.images
    perm, g = _validity_order(images.shape[0], seed)
    if labels is None:
        from engine.ml.metrics import predict

        labels = predict(
            trainer.model, images, trainer.normalizer, precision=trainer.precision
        ).cpu()
    labels = labels.cpu()[perm]
    sets = {}
    for target in sorted({r.target for r in trainer.runs}):
        keep = perm[labels != target][: cfg.eval_images]
        if keep.numel() == 0:
            raise UserError(
                f"the defender split has no images outside class {target}; validity needs some"
            )
        positions = Placement("per-image").sample(
            keep.numel(), trainer.image_size, cfg.trigger_size, g
        )
        sets[target] = _EvalSet(images[keep.to(images.device)], positions.to(images.device))
    return sets


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class SearchResult:
    """What a finished search returns. Index i refers to the i-th (beta, target) pair."""

    betas: list[float]
    targets: list[int]
    keys: list[str]
    generators: list[TriggerGenerator]
    statistics: list[StatisticsNetwork]
    samples: list[torch.Tensor]  # (N, C, k, k) float32 on the CPU
    metrics: dict[str, float]
    histograms: dict[str, list[int]]
    config: MesaConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    pca: dict[str, list] | None = None
    seconds: float = 0.0
    device: str = "cpu"
    # ``learned`` placement: per pair pi (Hp, Wp) and where its evaluated stamps hit the target
    # (counts per offset); None for the random placements.
    positions: list[torch.Tensor | None] = field(default_factory=list)
    landing: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def target(self) -> int:
        return self.targets[0]

    def index(self, beta: float, target: int | None = None) -> int:
        for i, (b, t) in enumerate(zip(self.betas, self.targets, strict=True)):
            if math.isclose(b, beta) and (target is None or t == target):
                return i
        raise UserError(f"beta {beta} is not in this search ({self.betas}); use one of those")

    def validity(self, beta: float, target: int | None = None) -> float:
        return self.metrics[f"{self.keys[self.index(beta, target)]}/validity"]

    @property
    def best_validity(self) -> float:
        return max(self.metrics[f"{k}/validity"] for k in self.keys)

    def entropies(self) -> list[float]:
        return [knn_entropy(s, self.config.knn_k) for s in self.samples]

    def sampler(self, beta: float | None = None, ensemble: str | None = None) -> TriggerSampler:
        gens = {b: g for b, g in zip(self.betas, self.generators, strict=True)}
        return _make_sampler(
            self.betas,
            gens,
            self.entropies(),
            self.config.noise,
            self.config.noise_dim,
            beta,
            ensemble,
            torch.device(self.device),
            positions={
                b: p for b, p in zip(self.betas, self.positions, strict=False) if p is not None
            },
        )


@dataclass
class SearchCheckpoint:
    """Where and how often a search saves its state (``engine.ml.checkpoint``), and whether it
    continues from the file already there. ``every_steps`` fixes the steps (tests); without it
    the search saves at most every ``every_s`` seconds, and never so often that saving costs
    more than 2 % of the time. No checkpoint is written at the last step (the search is done)."""

    path: Path
    resume: bool = False
    every_steps: int | None = None
    every_s: float = 60.0


CHECKPOINT_KIND = "mesa-search"


def scan_for(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    cfg: MesaConfig,
    precision: str,
    seed: int,
    reporter: Reporter | None = None,
) -> PositionScan:
    """The position scan with a search's settings (the model in eval mode, as searched)."""
    or_null(reporter).text(
        f"position scan: {cfg.scan_probes} probe patterns at every offset on "
        f"{cfg.scan_images} images"
    )
    model.eval()
    scan_cfg = ScanConfig(probes=cfg.scan_probes, images=cfg.scan_images, seed=seed)
    return scan_positions(
        model, normalizer, images_u8, cfg.trigger_size, scan_cfg, precision=precision
    )


def _fingerprint(
    trainer: MesaTrainer, pairs: list[tuple[float, int, str]], seed: int, pca_step: int
) -> dict[str, Any]:
    """What a checkpoint must have been written by to continue this search."""
    return {
        "config": trainer.config.to_json(),
        "pairs": [[b, t, key] for b, t, key in pairs],
        "seed": seed,
        "images": list(trainer.images.shape),
        "precision": trainer.precision,
        "pca_step": pca_step,
        # Which pairs learn pi (the scan's peaks): a checkpoint of an older rule is not continued.
        "learned_pairs": [run.learned for run in trainer.runs],
    }


@dataclass
class _SearchLoop:
    """One running search: its trainer, what it has recorded so far, and where it reports and
    saves. ``search_targets`` sets it up; its methods are the search's stages (resume, train,
    evaluate, save, finish)."""

    trainer: MesaTrainer
    eval_sets: dict[int, _EvalSet]
    reporter: Reporter
    stage: str
    seed: int
    true_pattern: torch.Tensor | None
    bw_stats: bool
    fingerprint: dict[str, Any]
    pca_step: int
    checkpoint: SearchCheckpoint | None
    cadence: ckpt.Cadence | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    pca_basis: dict[str, list] | None = None
    start_step: int = 0
    seconds_before: float = 0.0
    last_eval_s: float = 0.0
    started: float = 0.0
    # Per pair, where the last evaluation's stamps hit the target (learned placement; else None).
    landing: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def config(self) -> MesaConfig:
        return self.trainer.config

    # -- checkpoints ---------------------------------------------------------------------------

    def resume(self, fresh_trainer: Callable[[], MesaTrainer]) -> None:
        """Continue after the checkpoint's step when its file fits this search; a state that
        does not load is reported and the search starts from step 0 on ``fresh_trainer()``."""
        assert self.checkpoint is not None
        path = self.checkpoint.path
        state = ckpt.load_or_none(path, CHECKPOINT_KIND, self.fingerprint, self.reporter)
        if state is None:
            return
        try:
            self.trainer.load_state_dict(state["trainer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            self.reporter.text(
                f"checkpoint {path} does not fit this search "
                f"({str(exc)[:100]}); starting from the beginning",
                "warning",
            )
            self.trainer = fresh_trainer()
            return
        ckpt.set_global_rng_state(state["rng"])
        self.history, self.evaluations = state["history"], state["evaluations"]
        self.pca_basis = state["pca"]
        self.start_step = self.trainer.step_count
        self.seconds_before = float(state["seconds"])
        self.reporter.text(f"{self.stage}: resumed from the checkpoint at step {self.start_step}")

    def save(self, step: int) -> None:
        """Write the whole state after ``step``; the check-in first flushes the metrics so far."""
        assert self.checkpoint is not None and self.cadence is not None
        per_step = (time.monotonic() - self.started) / max(step - self.start_step, 1)
        self.reporter.check_in(
            max(
                60.0,
                5 * per_step * self.config.stats_every
                + 3 * self.last_eval_s
                + 3 * self.cadence.cost,
            )
        )
        state = {
            "trainer": self.trainer.state_dict(),
            "rng": ckpt.global_rng_state(),
            "history": self.history,
            "evaluations": self.evaluations,
            "pca": self.pca_basis,
            "seconds": self.seconds_before + time.monotonic() - self.started,
        }
        self.cadence.wrote(
            ckpt.save_checkpoint(self.checkpoint.path, CHECKPOINT_KIND, state, self.fingerprint)
        )

    # -- training ------------------------------------------------------------------------------

    def train(self) -> None:
        """The steps after ``start_step``: statistics, evaluations and checkpoints on their
        cadences, progress after every step (none of them at the last step but statistics)."""
        cfg = self.config
        for step in range(self.start_step + 1, cfg.steps + 1):
            stop_point(self.reporter)
            self.trainer.step()
            if step % cfg.stats_every == 0 or step == cfg.steps:
                self._log_window(step)
            if step % cfg.sample_every == 0 and step != cfg.steps:
                self._evaluate_between_steps(step)
            if self.cadence is not None and step < cfg.steps and self.cadence.due(step):
                self.save(step)
            rate = (step - self.start_step) / max(time.monotonic() - self.started, 1e-9)
            self.reporter.progress(self.stage, step, cfg.steps, {"step/s": rate})

    def _log_window(self, step: int) -> None:
        """The live statistics' means since the last log, into the history and the reporter."""
        window = self.trainer.take_window()
        self.history.append({"step": step, **window})
        self.reporter.log(window, step)
        per_step = (time.monotonic() - self.started) / (step - self.start_step)
        self.reporter.check_in(
            max(60.0, 5 * per_step * self.config.stats_every + 3 * self.last_eval_s)
        )

    def _evaluate_between_steps(self, step: int) -> None:
        """An evaluation during training; the first one at or after ``pca_step`` fixes the PCA
        axes of the embedding picture."""
        t0 = time.monotonic()
        flat, hists, all_samples = self.evaluate(self.config.samples)
        self.last_eval_s = time.monotonic() - t0
        self.evaluations.append({"step": step, "metrics": flat, "histograms": hists})
        self.reporter.log(flat, step)
        if self.pca_basis is None and step >= self.pca_step:
            self.pca_basis = pca_fit(torch.cat(all_samples))

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, n: int) -> tuple[dict[str, float], dict[str, list[int]], list[torch.Tensor]]:
        """Every pair's statistics (flat, keyed ``<run key>/<name>``), validity histograms and
        ``n`` samples (float32 on the CPU); ``landing`` is refilled."""
        flat: dict[str, float] = {}
        hists: dict[str, list[int]] = {}
        all_samples = []
        self.landing.clear()
        runs = self.trainer.runs
        for i, run in enumerate(runs):
            samples, hists[run.key] = self._evaluate_run(run, n, flat)
            all_samples.append(samples.float().cpu())
            self.reporter.progress(f"{self.stage}: sampling", i + 1, len(runs), {})
        return flat, hists, all_samples

    def _evaluate_run(
        self, run: _Run, n: int, flat: dict[str, float]
    ) -> tuple[torch.Tensor, list[int]]:
        """One pair: ``n`` samples from a fixed stream (the same generator gives the same
        numbers whenever it is evaluated), the first ``n_eval_triggers`` stamped on the pair's
        evaluation images. Adds its statistics to ``flat`` and its landing counts to
        ``landing``; returns the samples and the validity histogram."""
        trainer, cfg = self.trainer, self.config
        g = torch.Generator().manual_seed(_run_seed(self.seed + 1, run.beta, run.target))
        samples = trainer.sample(run, n, g)
        ev = self.eval_sets[run.target]
        positions, probs = self._eval_positions(run, ev)
        hits = trigger_success(
            trainer.model,  # the frozen copy (BN folded, channels_last) the search uses
            trainer.normalizer,
            samples[: cfg.n_eval_triggers],
            ev.images,
            positions,
            run.target,
            precision=trainer.precision,
            channels_last=trainer.use_channels_last,
            per_image=True,
        )
        success = hits.mean(1)
        if probs is not None:
            self.landing.append(self._landing_counts(positions, hits))
            for name, value in position_stats(probs).items():
                flat[f"{run.key}/{name}"] = value
        else:
            self.landing.append(None)
        vstats, hist = validity_stats(success, run.beta)
        dstats = diversity_stats(
            samples, k=cfg.knn_k, true_pattern=self.true_pattern, bw=self.bw_stats
        )
        for name, value in {**vstats, **dstats}.items():
            flat[f"{run.key}/{name}"] = value
        return samples, hist

    def _eval_positions(self, run: _Run, ev: _EvalSet) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where a pair's evaluation stamps, and its pi when learned (else None): a learned
        pair's validity is that of its distribution, so its patterns go to places drawn from
        pi; the random placements use the fixed per-image places."""
        if not run.learned:
            return ev.positions, None
        gp = torch.Generator().manual_seed(_run_seed(self.seed + 2, run.beta, run.target))
        probs = run.position_probs(self.trainer.grid, self.config)
        positions = sample_positions(probs, ev.images.shape[0], gp)
        return positions.to(ev.images.device), probs

    def _landing_counts(self, positions: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        """Per offset (Hp, Wp), how many evaluated stamps there sent their image to the target."""
        grid = self.trainer.grid
        cells = positions[:, 0].cpu() * grid[1] + positions[:, 1].cpu()
        counts = torch.zeros(grid[0] * grid[1])
        counts.index_add_(0, cells, hits.sum(0))
        return counts.view(grid)

    # -- the end -------------------------------------------------------------------------------

    def finish(self, device: torch.device) -> SearchResult:
        """The last evaluation (at the last step, always) and the result."""
        cfg, runs = self.config, self.trainer.runs
        train_seconds = self.seconds_before + time.monotonic() - self.started
        flat, hists, final_samples = self.evaluate(cfg.samples)
        self.evaluations.append({"step": cfg.steps, "metrics": flat, "histograms": hists})
        self.reporter.log(flat, cfg.steps)
        if self.pca_basis is None:
            self.pca_basis = pca_fit(torch.cat(final_samples))
        metrics = dict(self.history[-1]) if self.history else {}
        metrics.pop("step", None)
        metrics.update(flat)
        return SearchResult(
            betas=[r.beta for r in runs],
            targets=[r.target for r in runs],
            keys=[r.key for r in runs],
            generators=[r.G.eval() for r in runs],
            statistics=[r.T.eval() for r in runs],
            samples=final_samples,
            metrics=metrics,
            histograms=hists,
            config=cfg,
            history=self.history,
            evaluations=self.evaluations,
            pca=self.pca_basis,
            seconds=train_seconds,
            device=str(device),
            positions=[
                r.position_probs(self.trainer.grid, cfg) if r.learned else None for r in runs
            ],
            landing=list(self.landing),
        )


def search_targets(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    pairs: list[tuple[float, int, str]],
    config: MesaConfig,
    *,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    reporter: Reporter | None = None,
    true_pattern: torch.Tensor | None = None,
    bw_stats: bool = False,
    seed: int = 0,
    stage: str = "mesa",
    pca_warmup: int | None = None,
    checkpoint: SearchCheckpoint | None = None,
    position_scan: PositionScan | None = None,
    pi_without_peak: bool = True,
) -> SearchResult:
    """Train one generator per (beta, target, metric-key prefix) in one process; see ``search``.
    A ``learned`` search first scans the positions (``engine.ml.position_scan``) unless
    ``position_scan`` is given (a detection scans once for all its classes). A pair whose target
    has no scan peak learns pi over every offset when ``pi_without_peak`` (the default here:
    detection and the residual check measure validity), else it is the paper's search
    (``search``, whose samples repair).

    With ``checkpoint``, the state is saved now and then; with ``checkpoint.resume`` a usable
    file there is loaded and the search continues after its step, logging only later steps, and
    ends with exactly the generators an uninterrupted search would have (same device and
    precision). A damaged or foreign file is reported and the search starts from step 0."""
    device = torch.device(device)
    # Checkpoints depend on ``checkpoint`` alone, never on the reporter, so the null one is safe.
    reporter = or_null(reporter)
    frozen_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        if config.learned and position_scan is None:
            position_scan = scan_for(
                model, normalizer, images_u8, config, precision, seed, reporter
            )

        def new_trainer(scan: PositionScan | None) -> MesaTrainer:
            return MesaTrainer(
                model,
                normalizer,
                images_u8,
                pairs,
                config,
                device=device,
                precision=precision,
                seed=seed,
                position_scan=scan,
                pi_without_peak=pi_without_peak,
            )

        trainer = new_trainer(position_scan)
        pca_step = pca_warmup if pca_warmup is not None else min(config.sample_every, config.steps)
        loop = _SearchLoop(
            trainer=trainer,
            eval_sets=_eval_sets(trainer, labels, seed),
            reporter=reporter,
            stage=stage,
            seed=seed,
            true_pattern=true_pattern,
            bw_stats=bw_stats,
            fingerprint=_fingerprint(trainer, pairs, seed, pca_step),
            pca_step=pca_step,
            checkpoint=checkpoint,
        )
        if checkpoint is not None and checkpoint.resume:
            # The restart after a state that does not load has always been built without the
            # position scan; kept so (a refactor), though it differs from the first trainer.
            loop.resume(lambda: new_trainer(None))
        if checkpoint is not None:
            loop.cadence = ckpt.Cadence(checkpoint.every_steps, checkpoint.every_s)
        loop.started = time.monotonic()
        loop.train()
        return loop.finish(device)
    finally:
        for p, flag in zip(model.parameters(), frozen_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def search(
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    target: int,
    config: MesaConfig,
    *,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    reporter: Reporter | None = None,
    true_pattern: torch.Tensor | None = None,
    bw_stats: bool = False,
    seed: int = 0,
    checkpoint: SearchCheckpoint | None = None,
    position_scan: PositionScan | None = None,
) -> SearchResult:
    """A MESA search on any classifier: one generator per beta in ``config.betas``.

    images_u8: the defender's clean images (N, C, H, W) uint8 (never the held-out split).
    labels: their labels, used only to pick the non-target images of the validity check (without
    them the model's clean predictions decide). true_pattern: the original trigger, for the
    ``nearest_to_true`` evaluation metric only; the search itself never sees it.
    position_scan: a ``learned`` search's scan made already (a detection's), else it scans.
    Without a scan peak for ``target`` it is the paper's per-image search (no pi).
    The model is left as it came (training mode and requires_grad flags restored).
    """
    pairs = [(b, target, f"mesa/beta={beta_label(b)}") for b in config.betas]
    return search_targets(
        model,
        normalizer,
        images_u8,
        pairs,
        config,
        labels=labels,
        device=device,
        precision=precision,
        reporter=reporter,
        true_pattern=true_pattern,
        bw_stats=bw_stats,
        seed=seed,
        checkpoint=checkpoint,
        position_scan=position_scan,
        pi_without_peak=False,  # its samples repair: the paper's placement where no peak is
    )


# ---------------------------------------------------------------------------------------------
# PCA embedding and pictures


def pca_fit(samples: torch.Tensor) -> dict[str, list]:
    """A 2-D PCA basis of flattened samples (fitted once, after warm-up, then kept fixed)."""
    flat = samples.detach().double().flatten(1).cpu()
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    return {"mean": mean.tolist(), "components": v[:2].tolist()}


def pca_project(samples: torch.Tensor | np.ndarray, basis: dict[str, list]) -> np.ndarray:
    flat = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    return (flat - np.asarray(basis["mean"])) @ np.asarray(basis["components"]).T


def trigger_grid(
    samples: np.ndarray, true_pattern: np.ndarray | None = None, cols: int = 8, scale: int = 8
) -> np.ndarray:
    """Tile up to cols x cols samples (N, C, k, k) with a grey border; the original trigger, when
    known, stands to the right. Returns an (H, W, 3) uint8 image."""
    samples = np.asarray(samples, dtype=np.float32)[: cols * cols]
    c, k = samples.shape[1], samples.shape[-1]
    cell, border = k * scale, 2
    rows = max(1, math.ceil(len(samples) / cols))
    grid_w = cols * (cell + border) + border
    extra = (cell + 3 * border) if true_pattern is not None else 0
    height = max(rows * (cell + border) + border, cell + 2 * border)
    canvas = np.full((height, grid_w + extra, 3), 0.5, dtype=np.float32)

    def to_rgb(pattern: np.ndarray) -> np.ndarray:
        img = np.repeat(np.repeat(pattern, scale, axis=1), scale, axis=2).transpose(1, 2, 0)
        return np.repeat(img, 3, axis=2) if c == 1 else img[..., :3]

    for i, s in enumerate(samples):
        r, col = divmod(i, cols)
        y, x = border + r * (cell + border), border + col * (cell + border)
        canvas[y : y + cell, x : x + cell] = to_rgb(s)
    if true_pattern is not None:
        x = grid_w + 2 * border
        canvas[:, grid_w : grid_w + border] = 1.0  # a white rule separates the original
        canvas[border : border + cell, x : x + cell] = to_rgb(np.asarray(true_pattern, np.float32))
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def plot_embedding(
    path: str | Path,
    samples_by_beta: dict[str, np.ndarray],
    basis: dict[str, list],
    true_pattern: np.ndarray | None = None,
) -> None:
    """A scatter of every beta's samples on the fixed PCA axes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for label, samples in samples_by_beta.items():
        xy = pca_project(samples, basis)
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, label=f"beta={label}")
    if true_pattern is not None:
        xy = pca_project(np.asarray(true_pattern)[None], basis)
        ax.scatter(xy[:, 0], xy[:, 1], marker="*", s=200, c="black", label="original")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("MESA samples (PCA axes fixed after warm-up)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The search artifact


def _save_module(path: Path, module: nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".part")
    save_file(state, str(tmp), metadata={"mesa_tui_meta": json.dumps(meta)})
    tmp.replace(path)


def write_search_artifact(
    result: SearchResult,
    directory: str | Path,
    *,
    spec: dict[str, Any] | None = None,
    spec_hash: str | None = None,
    upstream: list[str | Path] | None = None,
    meta: dict[str, Any] | None = None,
    true_pattern: torch.Tensor | None = None,
) -> Path:
    """Write weights, samples, pictures, stats.json and the manifest (written last)."""
    from engine.ml.artifacts import write_manifest

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    truth = true_pattern.detach().float().cpu().numpy() if true_pattern is not None else None
    files: list[str] = []
    samples_by_beta: dict[str, np.ndarray] = {}
    position_summary: dict[str, dict[str, Any]] = {}
    entropies = result.entropies()
    for i, beta in enumerate(result.betas):
        label = beta_label(beta)
        samples_by_beta[label] = _write_pair(result, i, directory, truth, files)
        summary = _write_pair_positions(result, i, directory, files)
        if summary is not None:
            position_summary[label] = summary
    if result.pca is not None:
        plot_embedding(directory / "embedding.png", samples_by_beta, result.pca, truth)
        files.append("embedding.png")
    stats = _search_stats(result, entropies, position_summary)
    (directory / "stats.json").write_text(json.dumps(stats, indent=1, allow_nan=True))
    files.append("stats.json")
    manifest_meta = {
        "betas": result.betas,
        "target": result.target,
        "config": result.config.to_json(),
        **(meta or {}),
    }
    write_manifest(
        directory,
        "search",
        files,
        spec=spec,
        spec_hash=spec_hash,
        upstream=upstream,
        meta=manifest_meta,
        metrics=result.metrics,
    )
    return directory


def _write_pair(
    result: SearchResult, i: int, directory: Path, truth: np.ndarray | None, files: list[str]
) -> np.ndarray:
    """Pair ``i``'s networks, samples and sample grid under ``beta=<label>/`` (their names join
    ``files``); returns the samples for the embedding picture."""
    from engine.ml.artifacts import save_array

    cfg = result.config
    label = beta_label(result.betas[i])
    sub = directory / f"beta={label}"
    sub.mkdir(exist_ok=True)
    G = result.generators[i]
    net_meta = {
        "beta": result.betas[i],
        "target": result.targets[i],
        "hidden": cfg.hidden,
        "channels": G.channels,
        "size": G.size,
        "noise_dim": cfg.noise_dim,
        "noise_chunks": cfg.noise_chunks,
        "noise": cfg.noise,
    }
    _save_module(sub / "G.safetensors", G, net_meta)
    _save_module(sub / "T.safetensors", result.statistics[i], net_meta)
    samples = result.samples[i].numpy().astype(np.float32)
    save_array(sub / "samples.npy", samples)
    write_png(sub / "grid.png", trigger_grid(samples, truth))
    files += [
        f"beta={label}/{name}"
        for name in ("G.safetensors", "T.safetensors", "samples.npy", "grid.png")
    ]
    return samples


def _write_pair_positions(
    result: SearchResult, i: int, directory: Path, files: list[str]
) -> dict[str, Any] | None:
    """A learned pair's pi and where its stamps hit the target (``positions.npy``,
    ``landing.npy``); returns pi's summary for stats.json, None for the random placements."""
    from engine.ml.artifacts import save_array

    pi = result.positions[i] if i < len(result.positions) else None
    if pi is None:
        return None
    label = beta_label(result.betas[i])
    sub = directory / f"beta={label}"
    save_array(sub / "positions.npy", pi.float().numpy())
    files.append(f"beta={label}/positions.npy")
    land = result.landing[i] if i < len(result.landing) else None
    if land is not None:
        save_array(sub / "landing.npy", land.float().numpy())
        files.append(f"beta={label}/landing.npy")
    return {**position_stats(pi), "grid": list(pi.shape), "top": top_positions(pi)}


def _search_stats(
    result: SearchResult, entropies: list[float], position_summary: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """stats.json: the final statistics, their history and the search's settings."""
    stats = {
        "betas": result.betas,
        "target": result.target,
        "config": result.config.to_json(),
        "final": result.metrics,
        "histograms": result.histograms,
        "knn_entropy": {beta_label(b): h for b, h in zip(result.betas, entropies, strict=True)},
        "history": result.history,
        "evaluations": result.evaluations,
        "pca": result.pca,
        "seconds": result.seconds,
    }
    if position_summary:
        stats["positions"] = position_summary
    return stats


# ---------------------------------------------------------------------------------------------
# Sampling from a finished search (the repair loop's contract)


class _GeneratorSampler(TriggerSampler):
    def __init__(
        self,
        generators: list[TriggerGenerator],
        noise: str,
        noise_dim: int,
        device: torch.device,
        positions: list[torch.Tensor | None] | None = None,
    ):
        self.generators = [g.to(device).eval() for g in generators]
        self.noise, self.noise_dim, self.device = noise, noise_dim, device
        self.size = generators[0].size
        self.channels = generators[0].channels
        # The learned position distribution of each generator (None: random places).
        self.positions = positions if positions and all(p is not None for p in positions) else None

    def _position_probs(self) -> torch.Tensor | None:
        return None if self.positions is None else self.positions[0]

    def sample_positions(
        self, n: int, image_size: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor | None:
        """Top-left offsets (n, 2) from the search's learned position distribution, drawn from
        ``generator`` (the trigger source's stream); None when the search placed its triggers at
        random (the repair's own placement then stands)."""
        probs = self._position_probs()
        if probs is None:
            return None
        grid = position_grid(image_size, self.size)
        if tuple(probs.shape) != grid:
            raise UserError(
                f"the search's positions cover a {probs.shape[0]}x{probs.shape[1]} grid, these "
                f"images a {grid[0]}x{grid[1]} one; repair images of the size searched"
            )
        return sample_positions(probs, n, generator)

    @torch.no_grad()
    def _from(self, i: int, n: int, generator: torch.Generator) -> torch.Tensor:
        z = draw_noise(n, self.noise_dim, self.noise, generator, generator.device)
        return self.generators[i](z.to(self.device)).float()


class SingleSampler(_GeneratorSampler):
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._from(0, n, generator)


class RoundRobinSampler(_GeneratorSampler):
    """The script's ensemble: one generator per repair epoch, in the order of the betas."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._from(self.epoch % len(self.generators), n, generator)

    def _position_probs(self) -> torch.Tensor | None:
        if self.positions is None:
            return None
        return self.positions[self.epoch % len(self.generators)]


class MixtureSampler(_GeneratorSampler):
    """Per-sample mixing: each trigger comes from generator i with probability weights[i]."""

    def __init__(self, generators, noise, noise_dim, device, weights: list[float], positions=None):
        super().__init__(generators, noise, noise_dim, device, positions)
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def _position_probs(self) -> torch.Tensor | None:
        """The mixture's marginal over positions (each generator's pi, weighted)."""
        if self.positions is None:
            return None
        mixed = [w * p.double() for w, p in zip(self.weights.tolist(), self.positions, strict=True)]
        return torch.stack(mixed).sum(0)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        weights = self.weights.to(generator.device)
        choice = torch.multinomial(weights, n, replacement=True, generator=generator)
        out = torch.empty(n, self.channels, self.size, self.size, device=self.device)
        for i in range(len(self.generators)):
            where = (choice == i).nonzero().flatten()
            if where.numel():
                out[where.to(self.device)] = self._from(i, where.numel(), generator)
        return out


def staircase_weights(betas: list[float], entropies: list[float]) -> list[float]:
    """gamma_i proportional to (b_i - b_{i-1}) * exp(H_i), betas sorted ascending, b_0 = 0;
    computed in log space. Returned in the order of ``betas``."""
    order = sorted(range(len(betas)), key=lambda i: betas[i])
    logs = torch.empty(len(betas), dtype=torch.float64)
    previous = 0.0
    for i in order:
        logs[i] = math.log(betas[i] - previous) + entropies[i]
        previous = betas[i]
    return torch.softmax(logs, 0).tolist()


def _make_sampler(
    betas: list[float],
    generators: dict[float, TriggerGenerator],
    entropies: list[float],
    noise: str,
    noise_dim: int,
    beta: float | None,
    ensemble: str | None,
    device: torch.device,
    positions: dict[float, torch.Tensor] | None = None,
) -> TriggerSampler:
    if beta is not None and ensemble is not None:
        raise UserError("give either a beta or an ensemble, not both")
    if beta is None and ensemble is None:
        if len(betas) == 1:
            beta = betas[0]
        else:
            ensemble = "round-robin"
    if beta is not None:
        match = [b for b in betas if math.isclose(b, beta)]
        if not match:
            raise UserError(
                f"beta {beta} is not in this search; use one of {', '.join(map(beta_label, betas))}"
            )
        pi = positions.get(match[0]) if positions else None
        return SingleSampler([generators[match[0]]], noise, noise_dim, device, [pi])
    gens = [generators[b] for b in betas]
    pis = [positions.get(b) for b in betas] if positions else None
    if ensemble == "round-robin":
        return RoundRobinSampler(gens, noise, noise_dim, device, pis)
    if ensemble == "equal":
        return MixtureSampler(
            gens, noise, noise_dim, device, [1.0 / len(gens)] * len(gens), positions=pis
        )
    if ensemble == "staircase":
        return MixtureSampler(
            gens, noise, noise_dim, device, staircase_weights(betas, entropies), positions=pis
        )
    raise UserError(f"ensemble '{ensemble}' is unknown; use one of {', '.join(ENSEMBLES)}")


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> TriggerGenerator:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["mesa_tui_meta"])
    G = TriggerGenerator(
        meta["hidden"], meta["channels"], meta["size"], meta["noise_dim"], meta["noise_chunks"]
    )
    G.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return G.to(device).eval()


@dataclass
class SearchArtifact:
    """A finished search read back from disk (hashes verified)."""

    directory: Path
    betas: list[float]
    target: int
    manifest: dict[str, Any]
    device: torch.device
    generators: dict[float, TriggerGenerator]
    noise: str
    noise_dim: int
    # ``learned`` placement: pi (Hp, Wp) per beta; empty for the random placements.
    positions: dict[float, torch.Tensor] = field(default_factory=dict)

    def samples(self, beta: float) -> np.ndarray:
        from engine.ml.artifacts import load_array

        return load_array(self.directory / f"beta={beta_label(beta)}" / "samples.npy")

    def entropies(self) -> list[float]:
        k = int(self.manifest["meta"].get("config", {}).get("knn_k", 3))
        return [knn_entropy(torch.from_numpy(self.samples(b)), k) for b in self.betas]

    def sampler(self, beta: float | None = None, ensemble: str | None = None) -> TriggerSampler:
        entropies = self.entropies() if ensemble == "staircase" else [0.0] * len(self.betas)
        return _make_sampler(
            self.betas,
            self.generators,
            entropies,
            self.noise,
            self.noise_dim,
            beta,
            ensemble,
            self.device,
            positions=self.positions,
        )


def open_search(directory: str | Path, device: torch.device | str = "cpu") -> SearchArtifact:
    """Read a search artifact; generators come back in eval mode on ``device``."""
    from engine.ml.artifacts import read_manifest

    directory = Path(directory)
    manifest = read_manifest(directory, kind="search")
    meta = manifest["meta"]
    betas = [float(b) for b in meta["betas"]]
    device = torch.device(device)
    generators = {
        b: load_generator(directory / f"beta={beta_label(b)}" / "G.safetensors", device)
        for b in betas
    }
    cfg = meta.get("config", {})
    from engine.ml.artifacts import load_array

    listed = set(manifest.get("files", {}))
    positions = {
        b: torch.from_numpy(load_array(directory / f"beta={beta_label(b)}" / "positions.npy"))
        for b in betas
        if f"beta={beta_label(b)}/positions.npy" in listed
    }
    return SearchArtifact(
        directory=directory,
        betas=betas,
        target=int(meta["target"]),
        manifest=manifest,
        device=device,
        generators=generators,
        noise=cfg.get("noise", "uniform"),
        noise_dim=int(cfg.get("noise_dim", 64)),
        positions=positions,
    )


@dataclass(frozen=True)
class ProbeValidity:
    """The position scan's probes judged as a search's triggers: per beta, each probe's own ASR
    at places drawn from that beta's pi, on the images the search's validity check uses."""

    probes: torch.Tensor  # (P, C, k, k), the scan's probes in its order
    success: dict[float, torch.Tensor]  # beta -> (P,)

    @property
    def valid(self) -> torch.Tensor:
        """(P,) bool: valid for at least one beta (own ASR >= beta, the search's rule)."""
        hits = [s >= b for b, s in self.success.items()]
        return torch.stack(hits).any(0)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid.nonzero().flatten().tolist(),
            "success": {
                beta_label(b): [round(float(v), 4) for v in s] for b, s in self.success.items()
            },
        }


@torch.no_grad()
def probe_validity(
    search: SearchArtifact,
    betas: list[float],
    model: nn.Module,
    normalizer: Normalizer,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    scanned_images: int,
    *,
    precision: str = "fp32",
) -> ProbeValidity | None:
    """The search's validity test applied to its scan's probes (drawn again from the search's
    seed; ``scanned_images``: the size of the defender split the search scanned), for each of
    ``betas`` with that beta's learned pi. The same images and places as the search's last
    validity check when ``images_u8`` and ``labels`` are the search's defender split. None for
    a search at random places (it had no scan). The model is put in eval mode."""
    if not search.positions:
        return None
    meta = search.manifest["meta"]
    cfg, seed, target = meta["config"], int(meta["seed"]), search.target
    scan = ScanConfig(probes=int(cfg["scan_probes"]), images=int(cfg["scan_images"]), seed=seed)
    channels, size = int(meta["channels"]), int(cfg.get("trigger_size", 3))
    _, probes = scan_draws(scan, scanned_images, channels, size)
    perm, _ = _validity_order(images_u8.shape[0], seed)
    keep = perm[labels.cpu()[perm] != target][: int(cfg["eval_images"])]
    images = images_u8[keep.to(images_u8.device)]
    model.eval()
    success = {}
    for beta in betas:
        g = torch.Generator().manual_seed(_run_seed(seed + 2, beta, target))
        where = sample_positions(search.positions[beta], images.shape[0], g)
        success[beta] = trigger_success(
            model, normalizer, probes, images, where.to(images.device), target, precision=precision
        )
    return ProbeValidity(probes, success)
