"""The paper's protocol on the CPU network: the one definition of its settings.

Qiao, Yang and Li (NeurIPS 2019) fine-tune a clean model with 1 % poisoning for each of the 51
black/white triggers, recover the trigger distribution with three betas and repair at a stamping
rate, then compare the ASR left by MESA with that of a single reversed trigger. Here the network
is the `small` one of the cpu-quick preset (ResNet-18 stays for a GPU). Fixed by the protocol, not
to be cut: 1 % poisoning, 10 attack epochs, 620 search steps, 10 repair epochs, the 2,000-image
held-out split (a fifth of the test set). Cut: detection (the target is the oracle's, as in the
paper), the residual check and the pattern variations.

The attack departs from the paper in one place: the learning rate is 1e-2, not 1e-3, because
fine-tuning this network at 1e-3 did not implant the backdoor (1e-2 did). Everything here is
torch-free, so the study template, the driver script (``benchmarks/paper_study.py``) and the
report read the same values.

The same protocol on the paper's own network (``arch="resnet18"``, run on a lent GPU by
``benchmarks/gpu_bench.py``): the clean model is the ``clean-cifar10`` preset's ResNet-18, and the
attack fine-tunes it at the paper's learning rate, 1e-3; everything else is the same.
"""

from __future__ import annotations

from typing import Any

from engine.pipelines import CANONICAL_BW_IDS

SEED = 0
TARGET = 0
RATES = (0.01, 0.1)
# The rule, declared before the run: the paper's 0.01 unless `ideal` (the original trigger) leaves
# more than this on average over the pilot triggers there; then 0.1.
PAPER_RATE, FALLBACK_RATE, IDEAL_CEILING = 0.01, 0.1, 0.05
PILOT_TRIGGERS = ("bw:0", "bw:85", "bw:170")
MAIN_METHODS = ("mesa", "point", "ideal", "finetune")
SUBSET_METHODS = ("mesa-0.9", "neural-cleanse")
# The post-training defenses researchers compare against today (BackdoorBench's leaderboard), run
# on the subset too: ANP, I-BAU, CLP and FT-SAM at their papers' defaults (the defend spec's).
RECENT_METHODS = ("anp", "i-bau", "clp", "ft-sam")
# ANP pruned at the largest threshold of BackdoorBench's sweep that costs at most 10 % of the
# defender's accuracy (its threshold 0.2 leaves this network near chance): a defender's choice;
# anp-bb10 the same with BackdoorBench's mask lr 0.01 (its config) instead of the paper's 0.2,
# at which this network's masks collapse to 0 before any threshold is tried.
RECENT_VARIANTS = ("anp-acc10", "anp-bb10")
POINT_RESTARTS = 3
SUBSET_WORST, SUBSET_SPACED = 4, 8

CLEAN: dict[str, Any] = {"preset": "cpu-quick", "trigger": "none", "poison_rate": 0.0, "seed": SEED}
ATTACK: dict[str, Any] = {
    "preset": "paper-cifar10",
    "arch": "small",
    "lr": 1e-2,
    "epochs": 10,
    "poison_rate": 0.01,
    "target": TARGET,
    "seed": SEED,
    "eval_every": 0,
}
# The paper's random per-image places, pinned: the search's default became ``learned`` later
# (fixed-position backdoors), and the study's records were made with these.
SEARCH: dict[str, Any] = {
    "betas": [0.9, 0.8, 0.5],
    "steps": 620,
    "target": TARGET,
    "seed": SEED,
    "placement": "per-image",
}
REPAIR: dict[str, Any] = {
    "epochs": 10,
    "seed": SEED,
    "target": TARGET,
    "residual_steps": 0,
    "variations": False,
    "point_restarts": POINT_RESTARTS,
}
# The paper's own network: ResNet-18 from the clean-cifar10 preset, attacked at the paper's 1e-3.
CLEAN_RESNET18: dict[str, Any] = {
    "preset": "clean-cifar10",
    "trigger": "none",
    "poison_rate": 0.0,
    "seed": SEED,
}
ATTACK_RESNET18: dict[str, Any] = {**ATTACK, "arch": "resnet18", "lr": 1e-3}
ARCHS = {"small": (CLEAN, ATTACK), "resnet18": (CLEAN_RESNET18, ATTACK_RESNET18)}
# Neural Cleanse at its original budget (the defend spec's defaults: 1,000 outer steps), and the
# recent defenses likewise at their own: ANP 2,000 mask steps, I-BAU 5 rounds, FT-SAM 100 epochs
# (its own, not the protocol's 10 repair epochs; the first 10 see the same batches), CLP no data.
# They stamp nothing, so their specs leave the stamping rate out (``uses_rate``): one repair of a
# model serves every rate's record.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "mesa": {"method": "mesa"},
    "mesa-0.9": {"method": "mesa", "beta": 0.9},
    "ideal": {"method": "ideal"},
    "finetune": {"method": "finetune"},
    "neural-cleanse": {"method": "neural-cleanse"},
    "anp": {"method": "anp"},
    "anp-acc10": {"method": "anp", "anp_max_acc_drop": 0.1},
    "anp-bb10": {"method": "anp", "anp_max_acc_drop": 0.1, "anp_lr": 0.01},
    "i-bau": {"method": "i-bau"},
    "clp": {"method": "clp"},
    "ft-sam": {"method": "ft-sam"},
}


def trigger_name(bw_id: int) -> str:
    return f"bw:{bw_id}"


def even_triggers() -> list[str]:
    """The 26 triggers at even positions of the canonical list (the first half to finish)."""
    return [trigger_name(i) for i in CANONICAL_BW_IDS[0::2]]


def odd_triggers() -> list[str]:
    return [trigger_name(i) for i in CANONICAL_BW_IDS[1::2]]


def spaced_triggers(count: int = SUBSET_SPACED) -> list[str]:
    """``count`` ids evenly spaced over the canonical list, its ends included."""
    last = len(CANONICAL_BW_IDS) - 1
    return [trigger_name(CANONICAL_BW_IDS[round(i * last / (count - 1))]) for i in range(count)]


def subset_triggers(point_asr: dict[str, float]) -> list[str]:
    """The subset fixed by rule: the 4 triggers where `point` leaves the most, then the evenly
    spaced ids (each once)."""
    worst = sorted(point_asr, key=lambda t: (-point_asr[t], t))[:SUBSET_WORST]
    return list(dict.fromkeys([*worst, *spaced_triggers()]))


def main_rate(pilot_ideal_asr: list[float]) -> float:
    """Apply the declared rule to `ideal`'s ASR on the pilot triggers at the paper's rate."""
    if not pilot_ideal_asr:
        raise ValueError("the pilot has no ideal repair at the paper's rate yet")
    mean = sum(pilot_ideal_asr) / len(pilot_ideal_asr)
    return FALLBACK_RATE if mean > IDEAL_CEILING else PAPER_RATE


def settings(arch: str = "small") -> tuple[dict[str, Any], dict[str, Any]]:
    """(clean, attack) settings of the protocol on ``arch`` (small or resnet18)."""
    if arch not in ARCHS:
        raise ValueError(f"the protocol has no {arch!r} variant; use one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def attack_overrides(trigger: str, clean_model: str, arch: str = "small") -> dict[str, Any]:
    values = {k: v for k, v in settings(arch)[1].items() if k != "preset"}
    return {**values, "trigger": trigger, "init_from": clean_model}


def uses_rate(method: str) -> bool:
    """Whether a method's repair depends on the stamping rate (the recent defenses and their
    variants stamp nothing; finetune keeps its rate in its spec, as the study's first records
    were made that way)."""
    return METHOD_SETTINGS.get(method, {"method": method})["method"] not in RECENT_METHODS


def search_overrides(model: str) -> dict[str, Any]:
    return {**SEARCH, "model": model}


def repair_overrides(
    method: str, model: str, search: str | None, rate: float
) -> list[tuple[str, dict[str, Any]]]:
    """(label, defend settings) of one method: one repair, or for `point` one per restart (the
    first reverses all restarts; the others reuse its reversal through ``reversal_from``, which
    the caller fills in with the first one's artifact). A method that stamps nothing and is
    not among the paper's (``uses_rate``) gets no rate: its repair is the same at every rate."""
    base = {**REPAIR, "model": model}
    if uses_rate(method):
        base["stamp_rate"] = rate
    if method == "point":
        return [
            (f"point/{r}", {**base, "method": "point", "point_index": r})
            for r in range(POINT_RESTARTS)
        ]
    settings = {**base, **METHOD_SETTINGS[method]}
    if settings["method"] == "mesa":
        settings["search"] = search
    return [(method, settings)]
