"""The paired probe-share measurement as a JSON record and a markdown table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from engine.report.stats import paired_difference, wilson  # noqa: E402

W = Path(os.environ.get("PROBE_WORK", ".probe-work"))
OUT = Path(sys.argv[1])
cpu = (
    subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
    .stdout.split(":", 1)[1]
    .strip()
)
record = {"cpu": cpu, "precision": "bf16", "threads": 1, "rate": 0.1, "seed": 0, "units": {}}
rows = []
for unit in ("bw-0_corner_s0", "square-white_corner_s0"):
    kept = json.loads((ROOT / f"docs/results/fixed-position/{unit}.json").read_text())
    runs = {
        "mesa (recorded, tag fixed-position-v1)": {
            "asr_outcomes": kept["repairs"]["mesa"]["asr_outcomes"],
            "acc_clean": kept["repairs"]["mesa"]["acc_clean"],
        }
    }
    names = {
        "0": "mesa, probe_share 0 (this branch)",
        "0.25": "mesa, probe_share 0.25",
        "0.5": "mesa, probe_share 0.5 (default)",
        "ideal": "ideal at the fixed spot",
    }
    for variant, name in names.items():
        f = W / unit / f"result-{variant}.json"
        if f.exists():
            runs[name] = json.loads(f.read_text())
    base = runs["mesa (recorded, tag fixed-position-v1)"]["asr_outcomes"]
    entries = {}
    for name, e in runs.items():
        bits = e["asr_outcomes"]
        k, n = bits.count("1"), len(bits)
        lo, hi = wilson(k, n)
        d = paired_difference([int(c) for c in bits], [int(c) for c in base])
        entries[name] = {
            "asr": k / n,
            "k": k,
            "n": n,
            "wilson95": [lo, hi],
            "acc_clean": e["acc_clean"],
            "probes": e.get("probes"),
            "minus_recorded_mesa": {
                "diff": d.diff,
                "newcombe95": [d.lo, d.hi],
                "only_this": d.only_a,
                "only_recorded": d.only_b,
                "p_mcnemar": d.p_mcnemar,
            },
            "asr_outcomes": bits,
        }
        rows.append(
            f"| {unit} | {name} | {100 * k / n:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] | {100 * e['acc_clean']:.2f} | {100 * d.diff:+.2f} [{100 * d.lo:+.2f}, {100 * d.hi:+.2f}], p = {d.p_mcnemar:.2g} |"
        )
    record["units"][unit] = entries
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "results.json").write_text(json.dumps(record, indent=1))
table = (
    "| unit | repair | ASR % [Wilson 95 %] | clean acc % | minus recorded MESA, pp [Newcombe 95 %], McNemar |\n|---|---|---|---|---|\n"
    + "\n".join(rows)
)
print(table)
(OUT / "table.md").write_text(table + "\n")
