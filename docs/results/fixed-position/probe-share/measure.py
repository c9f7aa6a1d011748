"""Paired repairs at rate 0.1 on the kept fixed-position units (copied here): MESA with the
scan's valid probes mixed in at a share, without, and the ideal at the fixed spot."""

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from benchmarks._paper import repair_entry, run_task  # noqa: E402
from benchmarks.fixed_position import repair_settings, wilson_entry  # noqa: E402

WORK = Path(os.environ.get("PROBE_WORK", ".probe-work"))  # the units copied: attack/, search/
for item in sys.argv[1:]:
    unit, variant = item.split(":")
    base = WORK / unit
    model, search = str(base / "attack"), str(base / "search")
    if variant == "ideal":
        values = repair_settings("ideal", model, search, 0)
    else:
        values = {**repair_settings("mesa", model, search, 0), "probe_share": float(variant)}
    out = base / "runs" / variant
    started = time.time()
    result, seconds = run_task("defend", values, out, "cpu-quick")
    entry = repair_entry(result, seconds)
    entry["asr_interval"] = wilson_entry(entry["asr_outcomes"])
    entry["probes"] = result.extra.get("probes")
    entry["positions"] = result.extra.get("positions")
    (base / f"result-{variant}.json").write_text(json.dumps(entry, indent=1))
    print(
        unit,
        variant,
        entry["asr"],
        entry["asr_interval"]["wilson95"],
        entry.get("acc_clean"),
        round(seconds),
        flush=True,
    )
