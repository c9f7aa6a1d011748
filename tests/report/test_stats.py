"""engine.report.stats against scipy, published values and hand-worked numbers, edge cases
included (all zeros, all ones, empty input, ties, zero differences)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from engine.report import stats
from engine.report.stats import (
    bootstrap_mean,
    mean_paired_difference,
    paired_difference,
    summarize,
    wilcoxon,
    wilson,
)

scipy_stats = pytest.importorskip("scipy.stats")
Z95 = scipy_stats.norm.ppf(0.975)
ROOT = Path(__file__).resolve().parents[2]


def paired_table(
    both: int, only_a: int, only_b: int, neither: int
) -> tuple[np.ndarray, np.ndarray]:
    """Outcome vectors a, b of a paired 2x2 table (rows: a, columns: b)."""
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


# ---------------------------------------------------------------------------------------------
# wilson


@pytest.mark.parametrize(
    "k, n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (81, 263), (17, 9000)]
)
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, level):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    assert wilson(k, n, level) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)


def test_wilson_hand_worked_bounds_at_zero_and_one():
    # k = 0: (0, z^2 / (n + z^2)); k = n: the mirror image. Exactly 0 and 1 at the ends.
    n = 20
    edge = Z95**2 / (n + Z95**2)
    assert wilson(0, n) == (0.0, pytest.approx(edge, rel=1e-12))
    assert wilson(n, n) == (pytest.approx(1 - edge, rel=1e-12), 1.0)


@pytest.mark.parametrize(
    "k, n, level", [(0, 0, 0.95), (1, 0, 0.95), (-1, 5, 0.95), (6, 5, 0.95), (1, 5, 1.0)]
)
def test_wilson_refuses_bad_input(k, n, level):
    with pytest.raises(ValueError):
        wilson(k, n, level)


def test_wilson_refuses_no_trials_clearly():
    with pytest.raises(ValueError, match="at least one trial"):
        wilson(0, 0)


# ---------------------------------------------------------------------------------------------
# paired_difference


def newcombe_10_reference(both, only_a, only_b, neither, level=0.95):
    """Newcombe (1998) method 10 written out from the paper with scipy's Wilson intervals."""
    n = both + only_a + only_b + neither
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    ci1 = scipy_stats.binomtest(both + only_a, n).proportion_ci(level, method="wilson")
    ci2 = scipy_stats.binomtest(both + only_b, n).proportion_ci(level, method="wilson")
    e, f, g, h = both + only_a, only_b + neither, both + only_b, only_a + neither
    ad_bc = both * neither - only_a * only_b
    if e * f * g * h == 0:
        phi = 0.0
    elif ad_bc > n / 2:
        phi = (ad_bc - n / 2) / math.sqrt(e * f * g * h)
    elif ad_bc >= 0:
        phi = 0.0
    else:
        phi = ad_bc / math.sqrt(e * f * g * h)
    d1, e1 = p1 - ci1.low, ci1.high - p1
    d2, e2 = p2 - ci2.low, ci2.high - p2
    delta = math.sqrt(d1**2 - 2 * phi * d1 * e2 + e2**2)
    epsilon = math.sqrt(e1**2 - 2 * phi * e1 * d2 + d2**2)
    return p1 - p2 - delta, p1 - p2 + epsilon


def test_paired_difference_published_example():
    # Cavo et al. (2012), complete response before/after consolidation: 59, 6, 16, 80. Newcombe's
    # square-and-add interval as published by Fagerland, Lydersen & Laake (2014, Stat Med 33,
    # 2850-2875; their book's chapter 8): -0.0621 (-0.1186 to -0.0046).
    result = paired_difference(*paired_table(59, 6, 16, 80))
    assert round(result.diff, 4) == -0.0621
    assert (round(result.lo, 4), round(result.hi, 4)) == (-0.1186, -0.0046)
    assert (result.n, result.only_a, result.only_b) == (161, 6, 16)


@pytest.mark.parametrize(
    "table",
    [
        (59, 6, 16, 80),  # AD - BC > n/2: the corrected phi
        (1, 1, 7, 12),  # 0 <= AD - BC <= n/2: phi = 0
        (2, 9, 8, 1),  # AD - BC < 0: phi uncorrected
        (14, 5, 0, 22),
        (212, 144, 256, 707),
        (0, 3, 0, 7),  # an empty margin: phi = 0
        (5, 0, 0, 5),
    ],
)
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_paired_difference_matches_independent_newcombe(table, level):
    result = paired_difference(*paired_table(*table), level=level)
    lo, hi = newcombe_10_reference(*table, level=level)
    assert (result.lo, result.hi) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
    assert result.diff == pytest.approx((table[1] - table[2]) / sum(table), rel=1e-15)


def test_paired_difference_every_small_table_matches():
    for n in range(1, 7):
        for both in range(n + 1):
            for only_a in range(n + 1 - both):
                for only_b in range(n + 1 - both - only_a):
                    table = (both, only_a, only_b, n - both - only_a - only_b)
                    result = paired_difference(*paired_table(*table))
                    expected = newcombe_10_reference(*table)
                    assert (result.lo, result.hi) == pytest.approx(expected, abs=1e-12), table
                    assert -1 <= result.lo <= result.diff <= result.hi <= 1


@pytest.mark.parametrize(
    "only_a, only_b", [(6, 16), (16, 6), (0, 5), (5, 5), (1, 0), (40, 61), (300, 350)]
)
def test_paired_difference_mcnemar_matches_binomtest(only_a, only_b):
    result = paired_difference(*paired_table(30, only_a, only_b, 50))
    expected = scipy_stats.binomtest(only_b, only_a + only_b, 0.5).pvalue
    assert result.p_mcnemar == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("value", [0, 1])
def test_paired_difference_identical_runs(value):
    # All zeros or all ones on both sides: no difference, no discordant pair (p = 1), and an
    # interval of +- z^2 / (n + z^2) (hand-worked: p1 = p2 and one Wilson half-width each side).
    n = 50
    a = np.full(n, value, dtype=bool)
    result = paired_difference(a, a.copy())
    edge = Z95**2 / (n + Z95**2)
    assert (result.diff, result.only_a, result.only_b, result.p_mcnemar) == (0.0, 0, 0, 1.0)
    assert (result.lo, result.hi) == pytest.approx((-edge, edge), rel=1e-12)


def test_paired_difference_opposite_extremes():
    a, b = np.zeros(30, dtype=bool), np.ones(30, dtype=bool)
    result = paired_difference(a, b)
    edge = Z95**2 / (30 + Z95**2)
    assert result.diff == -1.0 and result.lo == pytest.approx(-1.0)
    assert result.hi == pytest.approx(-1 + math.sqrt(2) * edge, rel=1e-12)
    assert result.p_mcnemar == pytest.approx(2 * 0.5**30)


def test_paired_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="same images"):
        paired_difference([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        paired_difference([1, 2], [1, 0])


# ---------------------------------------------------------------------------------------------
# mean_paired_difference


def test_mean_paired_difference_matches_scipy_normal_interval():
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.1
    restarts = rng.random((3, 400)) < 0.3
    result = mean_paired_difference(a, restarts)
    d = a.astype(float) - restarts.mean(axis=0)
    lo, hi = scipy_stats.norm.interval(0.95, loc=d.mean(), scale=scipy_stats.sem(d))
    assert result.diff == pytest.approx(d.mean(), rel=1e-12)
    assert result.se == pytest.approx(scipy_stats.sem(d), rel=1e-12)
    assert (result.lo, result.hi) == pytest.approx((lo, hi), rel=1e-10)
    assert (result.n, result.restarts) == (400, 3)


def test_mean_paired_difference_hand_worked():
    # d = (1 - 1/2, 0 - 1/2, 1 - 1, 0 - 0) = (0.5, -0.5, 0, 0): mean 0, s = sqrt(1/6), se = s/2.
    a = [1, 0, 1, 0]
    restarts = [[1, 1, 1, 0], [0, 0, 1, 0]]
    result = mean_paired_difference(a, restarts, level=0.95)
    se = math.sqrt(1 / 6) / 2
    assert (result.diff, result.se) == (0.0, pytest.approx(se, rel=1e-12))
    assert (result.lo, result.hi) == pytest.approx((-Z95 * se, Z95 * se), rel=1e-12)


def test_mean_paired_difference_zero_differences_and_clipping():
    ones = np.ones(10, dtype=bool)
    same = mean_paired_difference(ones, np.ones((4, 10), dtype=bool))
    assert (same.diff, same.lo, same.hi, same.se) == (0.0, 0.0, 0.0, 0.0)
    worst = mean_paired_difference(ones, np.zeros((2, 10), dtype=bool))
    assert (worst.diff, worst.lo, worst.hi) == (1.0, 1.0, 1.0)


def test_mean_paired_difference_with_one_restart_is_the_paired_mean():
    a, b = paired_table(10, 7, 3, 20)
    result = mean_paired_difference(a, b[None, :])
    assert result.diff == pytest.approx(paired_difference(a, b).diff, rel=1e-15)


def test_mean_paired_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        mean_paired_difference([], np.zeros((2, 0)))
    with pytest.raises(ValueError, match="non-empty"):
        mean_paired_difference([1, 0], np.zeros((0, 2)))
    with pytest.raises(ValueError, match="like a"):
        mean_paired_difference([1, 0], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2-D"):
        mean_paired_difference([1, 0], [1, 0])
    with pytest.raises(ValueError, match="two images"):
        mean_paired_difference([1], [[0]])


# ---------------------------------------------------------------------------------------------
# bootstrap_mean


def test_bootstrap_mean_is_deterministic_and_close_to_scipy():
    values = np.random.default_rng(5).beta(0.5, 8, size=51)
    first = bootstrap_mean(values, resamples=20000, seed=7)
    assert bootstrap_mean(values, resamples=20000, seed=7) == first
    assert bootstrap_mean(values, resamples=20000, seed=8) != first
    assert first[0] == pytest.approx(values.mean(), rel=1e-12)
    ref = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    # Independent resamples: the quantiles agree to Monte Carlo error (~1 % of the width here).
    width = ref.high - ref.low
    assert first[1] == pytest.approx(ref.low, abs=0.05 * width)
    assert first[2] == pytest.approx(ref.high, abs=0.05 * width)


def test_bootstrap_mean_matches_its_definition():
    # The same draws written out: resamples x n indices from default_rng(seed), then quantiles.
    values = np.array([0.0, 0.01, 0.02, 0.05, 0.3, 0.9])
    idx = np.random.default_rng(3).integers(0, values.size, size=(500, values.size))
    expected = np.quantile(values[idx].mean(axis=1), [0.05, 0.95])
    assert bootstrap_mean(values, level=0.9, resamples=500, seed=3)[1:] == pytest.approx(expected)


def test_bootstrap_mean_draws_in_blocks_like_one_draw(monkeypatch):
    values = np.linspace(0, 1, 7)
    whole = bootstrap_mean(values, resamples=1000, seed=1)
    monkeypatch.setattr(stats, "_BOOTSTRAP_BLOCK", 7 * 64)  # 64 resamples per block
    assert bootstrap_mean(values, resamples=1000, seed=1) == whole


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_bootstrap_mean_constant_values(value):
    assert bootstrap_mean([value] * 9) == (value, value, value)


def test_bootstrap_mean_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="resample"):
        bootstrap_mean([0.1], resamples=0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([0.1, float("nan")])


# ---------------------------------------------------------------------------------------------
# wilcoxon


def wilcoxon_vectors() -> list:
    rng = np.random.default_rng(11)
    out = []
    for n in (5, 6, 9, 13, 14, 20, 30, 49, 50, 51, 60):
        ties = rng.integers(-4, 6, n).astype(float)
        ties[ties == 0] = 2.0
        out += [
            pytest.param(rng.normal(0.2, 1, n), id=f"continuous-{n}"),
            pytest.param(ties, id=f"ties-{n}"),
            pytest.param(rng.integers(-3, 5, n).astype(float), id=f"zeros-{n}"),
            # ASR differences as the study makes them, k / 9000 from counts: many exact ties
            pytest.param(rng.integers(-40, 25, n) / 9000, id=f"asr-{n}"),
        ]
    out.append(pytest.param(np.arange(1.0, 11.0), id="one-sided-exact"))
    out.append(pytest.param(np.array([1.0, -1, 2, 2, 0, 3, -3, 4]), id="half-ranks-small"))
    return out


@pytest.mark.parametrize("d", wilcoxon_vectors())
def test_wilcoxon_matches_scipy(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = scipy_stats.wilcoxon(d)
    statistic, p = wilcoxon(d)
    assert statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)


def test_wilcoxon_hand_worked_exact():
    # 1..5 all positive: R- = 0, P(R+ = 15) = 1/32 each side, p = 2/32.
    assert wilcoxon([1, 2, 3, 4, 5]) == (0.0, 0.0625)
    # Signs flipped give the same two-sided test.
    assert wilcoxon([-1, -2, -3, -4, -5]) == (0.0, 0.0625)


def test_wilcoxon_all_zero_differences():
    assert wilcoxon(np.zeros(8)) == (0.0, 1.0)
    assert wilcoxon(np.zeros(80)) == (0.0, 1.0)


def test_wilcoxon_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        wilcoxon([])
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon([0.1, float("nan"), 0.2])


def test_no_scipy_or_torch_at_run_time():
    code = "import sys, engine.report.stats; print(sorted({'scipy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_levels_outside_zero_one_are_refused():
    for call in (
        lambda: paired_difference([1, 0], [0, 0], level=0.0),
        lambda: mean_paired_difference([1, 0], [[0, 0]], level=1.5),
        lambda: bootstrap_mean([0.1, 0.2], level=1.0),
    ):
        with pytest.raises(ValueError, match="level"):
            call()


# ---------------------------------------------------------------------------------------------
# summarize

IMAGES = 40


def bits(rng: np.random.Generator, p: float, n: int = IMAGES) -> str:
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def run(rng: np.random.Generator, asr: float, acc: float = 0.84) -> dict:
    # "asr" is the rounded figure a result file would carry; the outcomes are the truth.
    outcomes = bits(rng, asr)
    return {
        "acc_clean": acc,
        "asr": round(outcomes.count("1") / IMAGES, 2),
        "asr_outcomes": outcomes,
        "clean_outcomes": bits(rng, acc, 60),
        "seconds": 12.5,  # an extra key the reader ignores
    }


def record(rng, name, attack=0.99, floor=0.02, finetune=0.3, optional=False) -> dict:
    repairs = {
        "mesa": run(rng, 0.05),
        "ideal": run(rng, 0.03),
        "finetune": run(rng, finetune),
        "point": {"restarts": [run(rng, 0.1), run(rng, 0.3), run(rng, 0.2)]},
    }
    if optional:
        repairs["mesa-0.9"] = run(rng, 0.08)
    return {
        "schema": 1,
        "trigger": name,
        "target": 0,
        "rate": 0.01,
        "floor": {"asr": floor, "asr_outcomes": "1" * round(floor * IMAGES) + "0" * 39},
        "attack": {"acc_clean": 0.85, "asr": attack, "asr_outcomes": bits(rng, attack)},
        "repairs": repairs,
        "note": "extra keys are ignored",
    }


METHODS = ["mesa", "ideal", "finetune", "point", "mesa-0.9"]


def study(seed: int = 0, triggers: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = [record(rng, f"bw:{i}", optional=i % 3 == 0) for i in range(triggers)]
    records.append(record(rng, "bw:weak", attack=0.2))  # not implanted: excluded everywhere
    records[-1]["repairs"]["mesa"] = run(rng, 0.9)
    return records


def as_bool(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text])


def test_summarize_per_trigger_cells_and_differences():
    records = study()
    table = summarize(records, METHODS)
    for rec in records[:-1]:
        row = table["per_trigger"][rec["trigger"]]
        reps = rec["repairs"]
        mesa = as_bool(reps["mesa"]["asr_outcomes"])
        k = int(mesa.sum())
        lo, hi = wilson(k, IMAGES)
        assert row["methods"]["mesa"] == {
            "asr": k / IMAGES,
            "lo": lo,
            "hi": hi,
            "n": IMAGES,
            "acc_clean": reps["mesa"]["clean_outcomes"].count("1") / 60,
        }
        restarts = np.stack([as_bool(r["asr_outcomes"]) for r in reps["point"]["restarts"]])
        per_restart = restarts.mean(axis=1)
        point = row["methods"]["point"]
        assert point["asr"] == pytest.approx(per_restart.mean(), rel=1e-12)
        assert point["spread"] == [per_restart.min(), per_restart.max()]
        assert point["restarts"] == 3
        versus = row["versus_reference"]
        ideal = as_bool(reps["ideal"]["asr_outcomes"])
        assert versus["ideal"] == asdict(paired_difference(mesa, ideal))
        assert versus["point"] == asdict(mean_paired_difference(mesa, restarts))
        assert ("mesa-0.9" in versus) == ("mesa-0.9" in reps)
        assert "mesa" not in versus
        assert row["floor"] == 1 / IMAGES and row["implanted"] is True


def test_summarize_method_rows():
    records = study()
    table = summarize(records, METHODS, threshold=0.10)
    used = records[:-1]
    for method in ("mesa", "finetune", "mesa-0.9"):
        names = [r["trigger"] for r in used if method in r["repairs"]]
        asr = np.array([table["per_trigger"][n]["methods"][method]["asr"] for n in names])
        row = table["methods"][method]
        assert row["n"] == len(names)
        mean, lo, hi = bootstrap_mean(asr)
        assert row["asr_mean"] == {"mean": mean, "lo": lo, "hi": hi}
        assert row["worst"] == {"trigger": names[int(np.argmax(asr))], "asr": asr.max()}
        above = [n for n, a in zip(names, asr, strict=True) if a > 0.10]
        assert row["above_threshold"] == {"count": len(above), "triggers": above}
        accs = [table["per_trigger"][n]["methods"][method]["acc_clean"] for n in names]
        assert row["acc_clean_mean"] == pytest.approx(np.mean(accs), rel=1e-12)
        assert "worst_restart" not in row
    assert table["methods"]["mesa-0.9"]["n"] == 4  # present on bw:0, 3, 6, 9 only
    point = table["methods"]["point"]
    cells = {r["trigger"]: table["per_trigger"][r["trigger"]]["methods"]["point"] for r in used}
    worst_mean = max(cells, key=lambda n: cells[n]["asr"])
    worst_single = max(cells, key=lambda n: cells[n]["spread"][1])
    assert point["worst"] == {"trigger": worst_mean, "asr": cells[worst_mean]["asr"]}
    assert point["worst_restart"] == {
        "trigger": worst_single,
        "asr": cells[worst_single]["spread"][1],
    }
    assert point["worst_restart"]["asr"] >= point["worst"]["asr"]


def test_summarize_not_implanted_is_listed_and_excluded():
    records = study()
    table = summarize(records, METHODS)
    assert table["not_implanted"] == {"count": 1, "triggers": ["bw:weak"]}
    weak = table["per_trigger"]["bw:weak"]
    assert weak["implanted"] is False and "methods" not in weak
    assert table["methods"]["mesa"]["n"] == 12
    assert table["methods"]["mesa"]["worst"]["trigger"] != "bw:weak"
    assert table["wilcoxon"]["ideal"]["n"] == 12
    # The same table without the weak trigger at all: identical means and tests.
    without = summarize(records[:-1], METHODS)
    assert without["methods"] == table["methods"]
    assert without["wilcoxon"] == table["wilcoxon"]


def test_summarize_wilcoxon_across_triggers_matches_scipy():
    table = summarize(study(seed=4, triggers=20), METHODS)
    for method in ("ideal", "finetune", "point", "mesa-0.9"):
        versus = [r["versus_reference"] for r in table["per_trigger"].values() if r["implanted"]]
        d = [v[method]["diff"] for v in versus if method in v]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = scipy_stats.wilcoxon(d)
        got = table["wilcoxon"][method]
        assert got["n"] == len(d)
        assert got["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
        assert got["p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert got["mean_diff"] == pytest.approx(np.mean(d), rel=1e-12)
        # the triggers where the paired interval excludes zero, each way
        assert got["lower"] == sum(v[method]["hi"] < 0 for v in versus if method in v)
        assert got["higher"] == sum(v[method]["lo"] > 0 for v in versus if method in v)
    assert table["wilcoxon"]["finetune"]["lower"] > 0  # finetune leaves more on some triggers
    assert "mesa" not in table["wilcoxon"]


def test_summarize_zero_differences():
    records = study(triggers=6)
    for rec in records:
        rec["repairs"]["ideal"] = dict(rec["repairs"]["mesa"])
    table = summarize(records, METHODS)
    assert table["wilcoxon"]["ideal"] == {
        "n": 6,
        "mean_diff": 0.0,
        "median_diff": 0.0,
        "statistic": 0.0,
        "p": 1.0,
        "lower": 0,
        "higher": 0,
    }
    for name in (r["trigger"] for r in records[:-1]):
        versus = table["per_trigger"][name]["versus_reference"]["ideal"]
        assert (versus["diff"], versus["only_a"], versus["only_b"]) == (0.0, 0, 0)


def test_summarize_finetune_removes():
    rng = np.random.default_rng(2)
    records = [
        record(rng, "low", finetune=0.0),  # below the threshold
        record(rng, "under-floor", floor=0.1, finetune=0.15),  # 0.15 < 2 x 0.1
        record(rng, "kept", floor=0.0, finetune=0.5),
    ]
    records[0]["repairs"]["finetune"]["asr_outcomes"] = "0" * IMAGES
    records[1]["floor"]["asr_outcomes"] = "1" * 4 + "0" * 36  # 0.1
    records[1]["repairs"]["finetune"]["asr_outcomes"] = "1" * 6 + "0" * 34  # 0.15
    records[2]["floor"]["asr_outcomes"] = "0" * IMAGES
    records[2]["repairs"]["finetune"]["asr_outcomes"] = "1" * 20 + "0" * 20
    table = summarize(records, METHODS)
    assert table["finetune_removes"] == {"count": 2, "triggers": ["low", "under-floor"]}
    assert summarize(records, ["mesa", "ideal"])["finetune_removes"]["count"] == 0


def test_summarize_without_a_floor():
    """``floor`` None (the clean model was not evaluated): the row says so and fine-tuning counts
    as removing the backdoor by the threshold alone; a record without the key is still refused."""
    rng = np.random.default_rng(3)
    records = [record(rng, "low", finetune=0.0), record(rng, "kept", finetune=0.15)]
    records[0]["repairs"]["finetune"]["asr_outcomes"] = "0" * IMAGES
    records[1]["repairs"]["finetune"]["asr_outcomes"] = "1" * 6 + "0" * 34  # 0.15
    for r in records:
        r["floor"] = None
    table = summarize(records, METHODS)
    assert table["per_trigger"]["kept"]["floor"] is None
    assert table["finetune_removes"] == {"count": 1, "triggers": ["low"]}
    assert (
        table["methods"]
        == summarize([{**r, "floor": {"asr": 0.0}} for r in records], METHODS)["methods"]
    )


def test_summarize_is_plain_json():
    table = summarize(study(), METHODS)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (bool, int, float, str)

    assert plain(table)
    assert json.loads(json.dumps(table, allow_nan=False)) == table
    fractions = [
        cell[key]
        for row in table["per_trigger"].values()
        for cell in row.get("methods", {}).values()
        for key in ("asr", "acc_clean", "lo", "hi")
        if key in cell
    ]
    assert all(0 <= x <= 1 for x in fractions)


def test_summarize_absent_methods_and_empty_study():
    table = summarize(study(triggers=3), ["mesa", "absent"])
    assert table["methods"]["absent"] == {
        "n": 0,
        "asr_mean": None,
        "worst": None,
        "above_threshold": {"count": 0, "triggers": []},
        "acc_clean_mean": None,
    }
    assert table["wilcoxon"]["absent"]["n"] == 0
    empty = summarize([], ["mesa", "ideal"])
    assert empty["methods"]["mesa"]["n"] == 0 and empty["per_trigger"] == {}
    assert empty["not_implanted"] == {"count": 0, "triggers": []}


def test_summarize_recorded_values_stand_in_for_missing_outcomes():
    rec = study(triggers=1)[0]
    del rec["floor"]["asr_outcomes"]
    del rec["repairs"]["mesa"]["clean_outcomes"]
    row = summarize([rec], ["mesa"])["per_trigger"]["bw:0"]
    assert row["floor"] == 0.02 and row["methods"]["mesa"]["acc_clean"] == 0.84


def test_summarize_refuses_bad_records():
    def broken(change) -> list[dict]:
        records = study(triggers=2)
        change(records[1])
        return records

    cases = [
        (lambda r: r["repairs"]["ideal"].update(asr_outcomes="0101"), "bw:1: a and b"),
        (lambda r: r["repairs"]["ideal"].update(asr_outcomes="01x1"), "bw:1: outcomes"),
        (lambda r: r["repairs"]["ideal"].update(asr_outcomes=""), "bw:1: outcomes"),
        (lambda r: r.pop("floor"), "bw:1: missing 'floor'"),
        (lambda r: r.update(schema=2), "bw:1: schema 2"),
        (lambda r: r.update(trigger="bw:0"), "twice"),
        (lambda r: r["repairs"]["point"].update(restarts=[]), "bw:1: a repair lists no"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            summarize(broken(change), METHODS)
    with pytest.raises(ValueError, match="reference"):
        summarize(study(triggers=2), ["ideal", "finetune"])
    with pytest.raises(ValueError, match="single run"):
        summarize(study(triggers=2), ["point", "mesa"], reference="point")
