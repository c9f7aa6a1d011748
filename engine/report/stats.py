"""The statistics of the paper-figure study: intervals, paired comparisons and rank tests.

numpy and the standard library only (no scipy, no torch): the report imports this module, and its
tests check every function against scipy or hand-worked values. Fractions are in [0, 1]; an
outcome is 1 where the backdoor succeeded on that held-out image, so a lower ASR is better and a
negative ``diff`` means the first method left fewer successes. Every function refuses empty input
with a ValueError.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# Bootstrap means are drawn in blocks of at most this many indices, so memory stays bounded.
_BOOTSTRAP_BLOCK = 1 << 20
# scipy.stats.wilcoxon's method="auto": exact up to 50 differences (zeros counted) without ties
# or zeros; with ties or zeros, exact enumeration of the signs up to 13 (its permutation test).
_EXACT_MAX = 50
_ENUMERATE_MAX = 13


@dataclass(frozen=True)
class PairedDifference:
    """``diff`` = mean(a) - mean(b) over ``n`` paired images, Newcombe's interval (lo, hi),
    the discordant counts (``only_a``: a succeeded and b failed; ``only_b``: the reverse) and
    the exact two-sided McNemar p-value."""

    diff: float
    lo: float
    hi: float
    n: int
    only_a: int
    only_b: int
    p_mcnemar: float


@dataclass(frozen=True)
class MeanPairedDifference:
    """``diff`` = mean over ``n`` images of a_i - mean over ``restarts`` runs of b_ri, with a
    normal-approximation interval (lo, hi) from the standard error ``se``."""

    diff: float
    lo: float
    hi: float
    se: float
    n: int
    restarts: int


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the proportion k / n.

    Method: Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22, 209-212 (method 3 of Newcombe 1998, Stat Med 17, 857-872). Without
    continuity correction; the bound at 0 (k = 0) or 1 (k = n) is exact.
    """
    if n <= 0:
        raise ValueError(f"wilson needs at least one trial (n = {n})")
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n (k = {k}, n = {n})")
    z2 = _z(level) ** 2
    p = k / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) * math.sqrt(z2) / (1 + z2 / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def paired_difference(a, b, level: float = 0.95) -> PairedDifference:
    """mean(a) - mean(b) for two boolean outcome vectors of the same images, with an interval.

    Interval: Newcombe, R. G. (1998), "Improved confidence intervals for the difference between
    binomial proportions based on paired data", Stat Med 17, 2635-2650, method 10 (square-and-add
    of the two Wilson intervals, with his continuity-corrected phi: the correlation term is
    (AD - BC - n/2) / sqrt(EFGH) when AD - BC > n/2, 0 when 0 <= AD - BC <= n/2, uncorrected
    when negative, and 0 when a margin is empty). p-value: exact McNemar test, the two-sided
    binomial test of ``only_a`` out of ``only_a + only_b`` at 1/2 (1.0 without discordant pairs).
    """
    a, b = _outcomes(a, "a"), _outcomes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same images ({a.size} and {b.size} outcomes)")
    n = a.size
    both, only_a, only_b = int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b))
    neither = n - both - only_a - only_b
    diff = (only_a - only_b) / n
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, level)
    l2, u2 = wilson(both + only_b, n, level)
    phi = _newcombe_phi(both, only_a, only_b, neither)
    lo = diff - _square_and_add(p1 - l1, u2 - p2, phi)
    hi = diff + _square_and_add(u1 - p1, p2 - l2, phi)
    return PairedDifference(diff, lo, hi, n, only_a, only_b, _mcnemar_exact(only_a, only_b))


def mean_paired_difference(a, restarts, level: float = 0.95) -> MeanPairedDifference:
    """mean(a) - mean(restarts) where ``restarts`` (r, n) are r independent runs of one method on
    the same n images as the boolean vector ``a``.

    Per image d_i = a_i - mean_r restarts[r, i]; the interval is the normal approximation
    mean(d) +- z * s_d / sqrt(n), s_d with n - 1 degrees of freedom (the paired-differences
    interval of e.g. Altman, "Practical Statistics for Medical Research", 1991, section 9.4, with
    z for t; n is in the thousands here), clipped to [-1, 1]. With no variation in d (all
    differences equal) the interval is that point.
    """
    a, runs = _outcomes(a, "a"), _outcomes(restarts, "restarts", ndim=2)
    if runs.shape[1] != a.size:
        raise ValueError(f"restarts must be (runs, {a.size}) like a, not {runs.shape}")
    n, r = a.size, runs.shape[0]
    if n < 2:
        raise ValueError("mean_paired_difference needs at least two images for a standard error")
    diff = (r * int(a.sum()) - int(runs.sum())) / (r * n)  # from counts: equal values tie exactly
    se = float(np.std(a - runs.mean(axis=0), ddof=1)) / math.sqrt(n)
    half = _z(level) * se
    return MeanPairedDifference(diff, max(-1.0, diff - half), min(1.0, diff + half), se, n, r)


def bootstrap_mean(
    values, level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` with a percentile bootstrap interval.

    Method: Efron, B. & Tibshirani, R. (1993), "An Introduction to the Bootstrap", chapter 13:
    ``resamples`` means of n values drawn with replacement by numpy's ``default_rng(seed)``, and
    their (1 - level) / 2 and (1 + level) / 2 quantiles (numpy's linear interpolation).
    Deterministic for a seed.
    """
    x = _vector(values, "values")
    _z(level)
    if resamples < 1:
        raise ValueError(f"bootstrap_mean needs at least one resample ({resamples})")
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // x.size)
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(block, resamples - start), x.size))].mean(axis=1)
            for start in range(0, resamples, block)
        ]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(lo), float(hi)


def wilcoxon(d) -> tuple[float, float]:
    """(statistic, p): the two-sided Wilcoxon signed-rank test that the differences d are
    centred on 0, as ``scipy.stats.wilcoxon(d)`` computes it with its defaults (scipy 1.17).

    Method: Wilcoxon, F. (1945), "Individual comparisons by ranking methods", Biometrics
    Bulletin 1, 80-83. Zeros are dropped (zero_method "wilcox"), tied |d| get average ranks, and
    the statistic is min(R+, R-). The p-value is exact (every sign assignment counted) when d has
    at most 50 values and neither ties nor zeros, or at most 13 values; otherwise it is the normal
    approximation with the tie-corrected variance and no continuity correction. All differences
    zero: (0.0, 1.0).
    """
    d = _vector(d, "d")
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    ranks, ties = _average_ranks(np.abs(nonzero))
    r_plus = float(ranks[nonzero > 0].sum())
    statistic = min(r_plus, float(ranks.sum()) - r_plus)
    clean = ties.max() == 1 and nonzero.size == d.size
    if d.size <= _ENUMERATE_MAX or (d.size <= _EXACT_MAX and clean):
        return statistic, _signed_rank_exact_p(ranks, r_plus)
    return statistic, _signed_rank_normal_p(ranks, ties, r_plus)


# ---------------------------------------------------------------------------------------------
# The across-trigger table


def summarize(
    records: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    threshold: float = 0.10,
    implanted_min: float = 0.5,
    reference: str = "mesa",
    finetune: str = "finetune",
    level: float = 0.95,
) -> dict[str, Any]:
    """The study's table from its per-trigger result records (schema 1), as a JSON-ready dict.

    Triggers whose attack ASR is below ``implanted_min`` are listed under ``not_implanted`` and
    left out of every mean and test. ``methods`` says which repairs to summarise and in what
    order; a method missing from a record is skipped there (its ``n`` counts the rest). A repair
    with ``restarts`` counts as the mean of its runs. Per method: the mean ASR over triggers with
    a bootstrap interval (``bootstrap_mean``), the worst trigger (and the worst single restart),
    the triggers above ``threshold`` and the mean clean accuracy. Per trigger: each method's ASR
    with its Wilson interval (restarts: mean and spread) and ``reference`` minus each other method,
    paired image by image (``paired_difference``, where ``only_a`` counts images the reference
    left backdoored and the other method did not; ``mean_paired_difference`` for restarts).
    ``wilcoxon``: the signed-rank test of those per-trigger differences. ``finetune_removes``:
    triggers where ``finetune`` (when it is among ``methods``) leaves an ASR below ``threshold``
    or below twice the clean model's ASR (``floor``; a record's ``floor`` may be None where the
    clean model was not evaluated, and then only the threshold counts). ASRs and accuracies come
    from the outcome strings where a record has them, so a value, its interval and its tests
    always agree.
    """
    if reference not in methods:
        raise ValueError(f"the reference method {reference!r} is not among {list(methods)}")
    triggers = [_read_trigger(record, methods) for record in records]
    names = [t.name for t in triggers]
    if len(set(names)) < len(names):
        raise ValueError(f"a trigger appears twice among {names}")
    used = [t for t in triggers if t.attack_asr >= implanted_min]
    implanted = {t.name for t in used}
    rows = {t.name: _trigger_row(t, t.name in implanted, reference, level) for t in triggers}
    return {
        "reference": reference,
        "threshold": threshold,
        "implanted_min": implanted_min,
        "level": level,
        "methods": {m: _method_summary(m, used, threshold, level) for m in methods},
        "per_trigger": rows,
        "wilcoxon": {m: _rank_test(m, rows, used) for m in methods if m != reference},
        "not_implanted": _listing([n for n in names if n not in implanted]),
        "finetune_removes": _listing(
            [t.name for t in used if finetune in t.runs and _removed(t, finetune, threshold)]
        ),
    }


def check_record(record: Mapping[str, Any], reference: str = "mesa") -> None:
    """Raise the ValueError ``summarize`` would meet in one record, before any computing: its
    outcome strings and accuracies, and repairs scored on different numbers of images (they
    are paired image by image)."""
    t = _read_trigger(record, list(record.get("repairs") or ()))
    sizes = {m: run.outcomes.shape[1] for m, run in t.runs.items()}
    if len(set(sizes.values())) > 1:
        usual = Counter(sizes.values()).most_common(1)[0][0]
        odd = " and ".join(f"{m} {n}" for m, n in sizes.items() if n != usual)
        raise ValueError(
            f"trigger {t.name}: repairs are paired on the same images, yet {odd} where the "
            f"others scored {usual}"
        )
    if reference in t.runs and t.runs[reference].restarts:
        raise ValueError(f"trigger {t.name}: the reference {reference} must be one run")


@dataclass(frozen=True, eq=False)
class _Run:
    """One repair of one trigger: ASR outcomes (runs, images) and each run's clean accuracy."""

    outcomes: np.ndarray
    acc_clean: tuple[float, ...]
    restarts: bool

    @property
    def asr(self) -> float:
        """The ASR over every run and image, from counts."""
        return int(self.outcomes.sum()) / self.outcomes.size


@dataclass(frozen=True, eq=False)
class _Trigger:
    name: str
    target: Any
    rate: Any
    floor: float | None
    attack_asr: float
    runs: dict[str, _Run]


@contextmanager
def _about(trigger: str) -> Iterator[None]:
    """Name the trigger in any error about its record."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"trigger {trigger}: {detail}") from error


def _read_trigger(record: Mapping[str, Any], methods: Sequence[str]) -> _Trigger:
    name = str(record.get("trigger", "?"))
    with _about(name):
        if record.get("schema", 1) != 1:
            raise ValueError(f"schema {record['schema']} is not 1")
        repairs = record.get("repairs", {})
        return _Trigger(
            name,
            record.get("target"),
            record.get("rate"),
            None if record["floor"] is None else _fraction(record["floor"], "asr", "asr_outcomes"),
            _fraction(record["attack"], "asr", "asr_outcomes"),
            {m: _read_run(repairs[m]) for m in methods if m in repairs},
        )


def _read_run(entry: Mapping[str, Any]) -> _Run:
    runs = entry.get("restarts", [entry])
    if not runs:
        raise ValueError("a repair lists no restarts")
    return _Run(
        np.stack([_bits(run["asr_outcomes"]) for run in runs]),
        tuple(_fraction(run, "acc_clean", "clean_outcomes") for run in runs),
        "restarts" in entry,
    )


def _bits(text: Any) -> np.ndarray:
    """Boolean outcomes from a non-empty string of '0' and '1'."""
    if not isinstance(text, str) or not text or text.strip("01"):
        raise ValueError("outcomes must be a non-empty string of '0' and '1'")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def _fraction(entry: Mapping[str, Any], key: str, outcomes_key: str) -> float:
    """The share of 1s in ``entry[outcomes_key]``, else the recorded ``entry[key]``."""
    if outcomes_key in entry:
        return float(_bits(entry[outcomes_key]).mean())
    return float(entry[key])


def _trigger_row(t: _Trigger, implanted: bool, reference: str, level: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "target": t.target,
        "rate": t.rate,
        "floor": t.floor,
        "attack_asr": t.attack_asr,
        "implanted": implanted,
    }
    if not implanted:
        return row
    ref = t.runs.get(reference)
    with _about(t.name):
        row["methods"] = {m: _cell(run, level) for m, run in t.runs.items()}
        row["versus_reference"] = {
            m: _versus(ref, run, level)
            for m, run in t.runs.items()
            if ref is not None and m != reference
        }
    return row


def _cell(run: _Run, level: float) -> dict[str, Any]:
    """A method's ASR on one trigger: Wilson interval for one run, spread for restarts."""
    if run.restarts:
        asrs = run.outcomes.mean(axis=1)
        return {
            "asr": run.asr,
            "spread": [float(asrs.min()), float(asrs.max())],
            "restarts": len(asrs),
            "acc_clean": float(np.mean(run.acc_clean)),
        }
    k, n = int(run.outcomes.sum()), run.outcomes.shape[1]
    lo, hi = wilson(k, n, level)
    return {"asr": k / n, "lo": lo, "hi": hi, "n": n, "acc_clean": run.acc_clean[0]}


def _versus(ref: _Run, run: _Run, level: float) -> dict[str, Any]:
    """The reference minus ``run`` on the same images."""
    if ref.restarts:
        raise ValueError("the reference method must be a single run, not restarts")
    if run.restarts:
        return asdict(mean_paired_difference(ref.outcomes[0], run.outcomes, level))
    return asdict(paired_difference(ref.outcomes[0], run.outcomes[0], level))


def _method_summary(
    method: str, used: Sequence[_Trigger], threshold: float, level: float
) -> dict[str, Any]:
    runs = {t.name: t.runs[method] for t in used if method in t.runs}
    asr = np.array([run.asr for run in runs.values()])
    summary: dict[str, Any] = {
        "n": len(runs),
        "asr_mean": None,
        "worst": None,
        "above_threshold": _listing([n for n, a in zip(runs, asr, strict=True) if a > threshold]),
        "acc_clean_mean": None,
    }
    if not runs:
        return summary
    mean, lo, hi = bootstrap_mean(asr, level)
    summary["asr_mean"] = {"mean": mean, "lo": lo, "hi": hi}
    summary["worst"] = _worst(list(runs), asr)
    summary["acc_clean_mean"] = float(np.mean([np.mean(run.acc_clean) for run in runs.values()]))
    if any(run.restarts for run in runs.values()):
        single = [run.outcomes.mean(axis=1).max() for run in runs.values()]
        summary["worst_restart"] = _worst(list(runs), single)
    return summary


def _worst(names: list[str], asr: Sequence[float] | np.ndarray) -> dict[str, Any]:
    i = int(np.argmax(asr))
    return {"trigger": names[i], "asr": float(asr[i])}


def _rank_test(method: str, rows: Mapping[str, Any], used: Sequence[_Trigger]) -> dict[str, Any]:
    """Wilcoxon signed-rank test of the per-trigger differences reference - ``method``, and the
    triggers whose paired interval lies wholly below zero (``lower``: the reference left less)
    or wholly above it (``higher``)."""
    found = (rows[t.name]["versus_reference"].get(method) for t in used)
    compared = [v for v in found if v is not None]
    d = [v["diff"] for v in compared]
    counts = {
        "lower": sum(v["hi"] < 0 for v in compared),
        "higher": sum(v["lo"] > 0 for v in compared),
    }
    if not d:
        return {
            "n": 0,
            "mean_diff": None,
            "median_diff": None,
            "statistic": None,
            "p": None,
        } | counts
    statistic, p = wilcoxon(d)
    return {
        "n": len(d),
        "mean_diff": float(np.mean(d)),
        "median_diff": float(np.median(d)),
        "statistic": statistic,
        "p": p,
    } | counts


def _removed(t: _Trigger, method: str, threshold: float) -> bool:
    asr = t.runs[method].asr
    return asr < threshold or (t.floor is not None and asr < 2 * t.floor)


def _listing(names: list[str]) -> dict[str, Any]:
    return {"count": len(names), "triggers": names}


# ---------------------------------------------------------------------------------------------
# Helpers


def _z(level: float) -> float:
    """The two-sided standard normal quantile for a confidence level in (0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (got {level})")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _vector(values, name: str) -> np.ndarray:
    """A non-empty 1-D float array without NaN."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (shape {x.shape})")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _outcomes(values, name: str, ndim: int = 1) -> np.ndarray:
    """A non-empty boolean array of ``ndim`` dimensions from 0/1 or bool values."""
    x = np.asarray(values)
    if x.ndim != ndim or x.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array of outcomes (shape {x.shape})")
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or False/True) outcomes")
    return x.astype(bool)


def _newcombe_phi(both: int, only_a: int, only_b: int, neither: int) -> float:
    """Newcombe's (1998) continuity-corrected phi of a paired 2x2 table (A, B, C, D)."""
    n = both + only_a + only_b + neither
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    if margins == 0:
        return 0.0
    cross = both * neither - only_a * only_b
    if cross > n / 2:
        return (cross - n / 2) / math.sqrt(margins)
    return min(cross, 0) / math.sqrt(margins)


def _square_and_add(x: float, y: float, phi: float) -> float:
    """sqrt(x^2 - 2 phi x y + y^2), never negative through rounding."""
    return math.sqrt(max(0.0, x * x - 2 * phi * x * y + y * y))


def _mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial p of the discordant pairs at 1/2: 2 P(X <= min), at most 1."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    term, tail = 1, 1  # C(m, 0); Python integers keep the sum exact for any m
    for i in range(min(only_a, only_b)):
        term = term * (m - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**m)


def _average_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ranks from 1 with ties averaged, the size of each tie group)."""
    order = np.argsort(x, kind="stable")
    _, first, sizes = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(first + (sizes + 1) / 2, sizes)
    return ranks, sizes


def _signed_rank_exact_p(ranks: np.ndarray, r_plus: float) -> float:
    """Two-sided p of R+ over all 2^n equally likely signs, counted exactly (ranks may be
    halves, so the sums are counted in half units)."""
    counts = np.ones(1, dtype=np.int64)
    for w in np.rint(2 * ranks).astype(int):
        pad = np.zeros(w, dtype=np.int64)
        counts = np.concatenate([counts, pad]) + np.concatenate([pad, counts])
    k = int(round(2 * r_plus))
    tail = min(int(counts[: k + 1].sum()), int(counts[k:].sum()))
    return min(1.0, 2 * tail / 2**ranks.size)


def _signed_rank_normal_p(ranks: np.ndarray, ties: np.ndarray, r_plus: float) -> float:
    """Two-sided normal-approximation p of R+ with the tie-corrected variance, no continuity
    correction."""
    n = ranks.size
    variance = (n * (n + 1) * (2 * n + 1) - float(np.sum(ties**3 - ties)) / 2) / 24
    z = (r_plus - n * (n + 1) / 4) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))
