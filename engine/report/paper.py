"""The paper-figure study's report, from its result folder (``benchmarks/paper_study.py`` writes
``rate-R/bw-ID.json`` per trigger and rate, ``rate.json`` with the pilot's rate decision and
``clean-model.json``).

Whatever exists is aggregated: a study that is still running reports its finished triggers and
says how many. The statistics are ``engine.report.stats.summarize``; the paper's numbers are
``engine.paper_figures.PAPER_BW``. numpy and matplotlib only, like the rest of the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.paper_figures import PAPER_BW
from engine.report import collect, stats

# Our method -> the paper's row (mesa-method.md section 5); finetune has none (the paper lacks it).
PAPER_ROW = {
    "before repair": "before repair",
    "mesa": "mesa-ensemble",
    "mesa-0.9": "mesa-0.9",
    "point": "point",
    "ideal": "ideal",
}
METHOD_ORDER = ("mesa", "mesa-0.9", "point", "ideal", "finetune", "neural-cleanse", "anp",
                "anp-acc10", "anp-bb10", "i-bau", "clp", "ft-sam")  # fmt: skip
SCHEMAS = (1,)
METHOD_COLORS = {m: i for i, m in enumerate(METHOD_ORDER)}  # one colour a method in every figure


def is_results_folder(path: str | Path) -> bool:
    folder = Path(path)
    return folder.is_dir() and any(folder.glob("rate-*/*.json"))


def not_results_folder(path: str | Path) -> str:
    """The end of the one line that refuses a folder without paper-study results."""
    folder = Path(path)
    if folder.name.startswith("rate-") and any(folder.glob("*.json")):
        return f"'{path}' is one rate's folder; give the folder above it, {folder.parent}"
    return (
        f"'{path}' holds no rate-*/bw-*.json results; give a folder that "
        "benchmarks/paper_study.py wrote, e.g. docs/results/paper-small"
    )


def path_problem(value: str, wanted: str, results: bool = True) -> str | None:
    """What ``value``, given for ``wanted`` (or, with ``results``, a result folder) and found as
    neither, is as a path; None when it names none (then it was only an unknown name)."""
    path = Path(value).expanduser()
    fix = f"give {wanted}" + (
        " or a folder that benchmarks/paper_study.py wrote" if results else ""
    )
    if path.is_dir():
        return not_results_folder(value) if results else f"'{value}' is a folder; {fix}"
    if path.exists():
        return f"'{value}' is a file; {fix}"
    if "/" in value or value.startswith((".", "~")):  # a path, not a name
        return f"'{value}' does not exist, as a folder or as a name; {fix}"
    return None


def read_folder(folder: Path) -> tuple[dict[float, list[dict[str, Any]]], float]:
    """Every record by stamping rate, and the main rate: what the summary, the app's listing
    and its start check read, refused in one line where any file cannot be read."""
    by_rate = load_records(folder)
    return by_rate, main_rate(folder, by_rate)


def load_records(folder: Path) -> dict[float, list[dict[str, Any]]]:
    """Every per-trigger record, by stamping rate, each checked (``check_record``) and no
    trigger twice at a rate."""
    by_rate: dict[float, list[dict[str, Any]]] = {}
    seen: dict[tuple[float, str], Path] = {}
    for path in sorted(folder.glob("rate-*/*.json")):
        record = read_json(path)
        check_record(record, str(path))
        key = (float(record["rate"]), record["trigger"])
        if key in seen:
            raise UserError(
                f"{seen[key]} and {path} both hold trigger {key[1]} at rate {key[0]:g}; remove one"
            )
        seen[key] = path
        by_rate.setdefault(key[0], []).append(record)
    if not by_rate:
        raise UserError(f"{folder} holds no rate-*/bw-*.json results; run paper_study.py first")
    return by_rate


def read_json(path: Path) -> Any:
    """A result file's content (untrusted: checked by the caller)."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UserError(
            f"{path} cannot be read ({exc.strerror or exc}); restore or remove it"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise UserError(f"{path} is not valid JSON ({exc}); restore or remove it") from None


def check_record(record: Any, name: str) -> None:
    """Refuse, naming ``name``, a record this version cannot read: another schema, or a field
    this module or ``stats.summarize`` reads missing or of the wrong kind."""
    if isinstance(record, dict) and record.get("schema", SCHEMAS[0]) not in SCHEMAS:
        raise UserError(f"{name} has schema {record['schema']!r}; this version reads {SCHEMAS}")
    problem = _object_problem(record, RECORD_FIELDS)
    problem = problem or _repairs_problem(record["repairs"]) or _runs_problem(record["runs"])
    if problem is None:
        try:
            stats.check_record(record)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise UserError(f"{name} is not a study record: {problem}; restore it or remove it")


def _repairs_problem(repairs: dict[str, Any]) -> str | None:
    for method, repair in repairs.items():
        if not isinstance(repair, dict):
            return f"'repairs.{method}' holds {_json_kind(repair)}, not an object"
    return None


def _runs_problem(runs: list[Any]) -> str | None:
    for i, run in enumerate(runs):
        problem = _object_problem(run, RUN_FIELDS)
        if problem is None and run.get("same_model") is False:  # re_attacked names its methods
            problem = _object_problem(run, (("methods", _is_names, "a list of methods"),))
        if problem:
            return f"runs[{i}]: {problem}"
    return None


def main_rate(folder: Path, by_rate: dict[float, list[dict[str, Any]]]) -> float:
    """The rate the pilot's rule chose (``rate.json``), else the rate with the most triggers."""
    path = folder / "rate.json"
    if not path.exists():
        return max(by_rate, key=lambda r: (len(by_rate[r]), -r))
    decision = read_json(path)
    problem = _object_problem(decision, (("rate", _is_rate, "a stamping rate in (0, 1]"),))
    if problem:
        raise UserError(
            f"{path} is not a rate decision: {problem}; restore it, or remove it to take the "
            "rate with the most triggers"
        )
    return float(decision["rate"])


# ---------------------------------------------------------------------------------------------
# What a record must hold: the fields read here (``stats.check_record`` checks the outcomes)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_rate(value: Any) -> bool:
    return _is_number(value) and 0 < value <= 1


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _is_machine(value: Any) -> bool:
    return isinstance(value, dict) and bool(value.get("gpu") or value.get("cpu")) and all(
        k in value for k in ("precision", "threads")
    )  # fmt: skip


RECORD_FIELDS = (
    ("schema", lambda v: True, ""),
    ("rate", _is_rate, "a stamping rate in (0, 1]"),
    ("trigger", lambda v: isinstance(v, str) and bool(v.strip()), "a trigger such as 'bw:0'"),
    ("attack.held_out_asr", _is_number, "a number"),
    ("repairs", lambda v: isinstance(v, dict), "an object of repairs by method"),
    ("runs", lambda v: isinstance(v, list) and bool(v), "a non-empty list of runs"),
)  # fmt: skip
RUN_FIELDS = (
    ("seconds.wall", _is_number, "a number"),
    ("machine", _is_machine, "an object naming its cpu or gpu, precision and threads"),
)


def _object_problem(value: Any, fields: Sequence[tuple[str, Any, str]]) -> str | None:
    """What in ``value`` breaks ``fields`` (dotted key, test, what it must be), or None."""
    if not isinstance(value, dict):
        return f"it holds {_json_kind(value)}, not an object"
    for dotted, ok, want in fields:
        found = value
        for part in dotted.split("."):
            if not isinstance(found, dict) or part not in found:
                return f"no '{dotted}'"
            found = found[part]
        if not ok(found):
            return f"'{dotted}' is {json.dumps(found)[:40]}, not {want}"
    return None


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def methods_of(records: Sequence[dict[str, Any]]) -> list[str]:
    present = {m for r in records for m in r["repairs"]}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def summary(folder: str | Path) -> dict[str, Any]:
    """The study as one JSON-ready dict: per rate the statistics, costs and machines."""
    folder = Path(folder)
    by_rate, main = read_folder(folder)
    out: dict[str, Any] = {
        "folder": str(folder),
        "main_rate": main,
        "main_rate_source": "the pilot's rule, rate.json"
        if (folder / "rate.json").exists()
        else "no rate.json yet: the rate with the most triggers",
        "paper": {m: PAPER_BW[row] for m, row in PAPER_ROW.items() if row in PAPER_BW},
        "rates": {},
    }
    for rate, records in sorted(by_rate.items()):
        out["rates"][f"{rate:g}"] = rate_entry(records)
    return out


def rate_entry(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The statistics, the attack before repair and the cost of one rate's records."""
    methods = methods_of(records)
    entry = stats.summarize(records, methods) if "mesa" in methods else {}
    entry["triggers"] = sorted(r["trigger"] for r in records)
    dropped = set(entry.get("not_implanted", {}).get("triggers", []))
    entry["before"] = _before([r for r in records if r["trigger"] not in dropped] or records)
    entry["cost"] = cost(records)
    entry["re_attacked"] = re_attacked(records)
    return entry


def re_attacked(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per trigger, the methods added in a later sitting whose attack, run again, scored the
    held-out images differently: repaired on a sibling model, so paired by protocol only."""
    out: dict[str, list[str]] = {}
    for r in records:
        for run in r["runs"]:
            if run.get("same_model") is False:
                out.setdefault(r["trigger"], []).extend(run["methods"])
    return out


def _before(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The attacked models' held-out ASR before any repair (the implanted ones): mean with its
    bootstrap interval, and the worst (the lowest)."""
    asr = [r["attack"]["held_out_asr"] for r in records]
    mean, lo, hi = stats.bootstrap_mean(asr)
    worst = min(records, key=lambda r: r["attack"]["held_out_asr"])
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "worst": {"trigger": worst["trigger"], "asr": worst["attack"]["held_out_asr"]},
    }


def cost(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall seconds per trigger (the attack and search counted where they ran) and the machines."""
    walls = [sum(run["seconds"]["wall"] for run in r["runs"]) for r in records]
    machines = sorted(
        {f"{run['machine'].get('gpu') or run['machine']['cpu']} ({run['machine']['precision']}, "
         f"{run['machine']['threads']} thread(s))" for r in records for run in r["runs"]}
    )  # fmt: skip
    return {
        "per_trigger_s": sum(walls) / len(walls),
        "total_s": sum(walls),
        "machines": machines,
    }


# ---------------------------------------------------------------------------------------------
# The report


def write(w: Any, folder: Path, gpu: Sequence[collect.GpuResult] = ()) -> None:
    """The report's sections into ``w`` (``engine.report.build.Writer``); each GPU result with
    the protocol's ResNet-18 pilot (``benchmarks/gpu_bench.py``) gets its section after them."""
    data = summary(folder)
    main = f"{data['main_rate']:g}"
    w.md(
        "# Report: the paper's figure on the CPU network",
        "",
        f"From `{shown(folder)}`: every trigger's record written by `benchmarks/paper_study.py` "
        f"(protocol: `engine/paper_small.py`). Main stamping rate {main} "
        f"({data['main_rate_source']}). Repairs of one model are paired: the same batches, "
        "stamped images and "
        "placements, the same held-out images; intervals are 95 %.",
        "",
    )
    for rate, entry in data["rates"].items():
        _rate_section(w, rate, entry, data["paper"], rate == main)
    for result in gpu:
        if result.records:
            gpu_pilot_section(w, result, data["paper"])


def gpu_pilot_section(w: Any, result: collect.GpuResult, paper: dict) -> None:
    """The same protocol on the paper's ResNet-18, run on a GPU: a pilot of a few triggers."""
    for i, record in enumerate(result.records):
        trigger = record.get("trigger") if isinstance(record, dict) else None
        check_record(record, f"{result.path}: the record of {trigger or f'trigger {i + 1}'}")
    info = result.paper
    name = Path(result.path).name
    w.md(f"## ResNet-18 on {result.device}: a pilot of the same protocol", "")
    unfinished = ", ".join(
        f"{u['trigger']} (stopped in {u.get('stopped_in')}"
        + (f": {u['error']}" if u.get("error") else "")
        + ")"
        for u in info.get("unfinished", [])
    )
    w.md(
        f"From `{name}`, measured on **{result.device}**"
        + (" — a `--tiny` smoke run, not a measurement" if result.tiny else "")
        + ": the protocol above on the paper's own network (the `clean-cifar10` ResNet-18, "
        "attacked at the paper's learning rate 1e-3), written by `benchmarks/gpu_bench.py`. "
        f"{len(result.records)} trigger(s) finished: "
        f"{', '.join(r['trigger'] for r in result.records)}. A pilot, not the study: "
        "intervals over so few triggers are wide."
        + (f" Unfinished: {unfinished}." if unfinished else "")
        + (f" Not started: {len(info['not_started'])}." if info.get("not_started") else "")
        + (f" Stopped: {info['stopped']}." if info.get("stopped") else ""),
        "",
    )
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for record in result.records:
        by_rate.setdefault(float(record["rate"]), []).append(record)
    for rate, records in sorted(by_rate.items()):
        entry = rate_entry(records)
        label = f"{rate:g}"
        w.md(
            f"Stamping rate {label}: {_hours(entry['cost']['per_trigger_s'])} per trigger on "
            f"{'; '.join(entry['cost']['machines'])}.",
            "",
        )
        if "methods" not in entry:
            w.md("No MESA repair at this rate.", "")
            continue
        _summary_table(w, label, entry, paper, stem="gpu-summary-rate")
        _trigger_table(w, label, entry, stem="gpu-triggers-rate")


def _rate_section(w: Any, rate: str, entry: dict[str, Any], paper: dict, main: bool) -> None:
    n = len(entry["triggers"])
    w.md(f"## Stamping rate {rate}" + (" (main)" if main else ""), "")
    w.md(
        f"{n} of 51 triggers finished. The runs that wrote these records took "
        f"{_hours(entry['cost']['per_trigger_s'])} per trigger "
        f"({_hours(entry['cost']['total_s'])} in all) on {'; '.join(entry['cost']['machines'])}; "
        "a trigger's attack and search count with the rate that ran them first.",
        "",
    )
    if "methods" not in entry:
        w.md("No MESA repair at this rate yet.", "")
        return
    _summary_table(w, rate, entry, paper)
    _figure(w, rate, entry)
    _trigger_table(w, rate, entry)
    _tests(w, entry)


def _summary_table(
    w: Any, rate: str, entry: dict[str, Any], paper: dict, stem: str = "summary-rate"
) -> None:
    before = entry["before"]
    rows = [["before repair", n_of(entry), before["mean"], before["lo"], before["hi"],
             before["worst"]["asr"], None, None, None, *_paper(paper, "before repair")]]  # fmt: skip
    for method, m in entry["methods"].items():
        worst_restart = m.get("worst_restart", {}).get("asr")
        rows.append([method, m["n"], m["asr_mean"]["mean"], m["asr_mean"]["lo"],
                     m["asr_mean"]["hi"], m["worst"]["asr"], worst_restart,
                     m["above_threshold"]["count"], m["acc_clean_mean"],
                     *_paper(paper, method)])  # fmt: skip
    w.md(
        "Mean ASR over the implanted triggers with its bootstrap interval, the worst trigger "
        "(for `point` the worst mean of its 3 restarts, and beside it the worst single restart), "
        "the triggers left above 10 %, clean accuracy after repair, and the paper's mean and "
        "worst (ResNet-18, its own clean model; `mesa` is its ensemble row).",
        "",
    )
    w.table(
        f"{stem}-{rate}.csv",
        (
            "method",
            "n",
            "asr_mean",
            "asr_lo",
            "asr_hi",
            "asr_worst",
            "worst_restart",
            "above_10pct",
            "acc_clean",
            "paper_mean",
            "paper_worst",
        ),  # fmt: skip
        rows,
        shown=[
            ("method", lambda r: str(r[0])),
            ("n", lambda r: str(r[1])),
            ("mean ASR [95 %]", lambda r: f"{pct(r[2])} [{pct(r[3])}, {pct(r[4])}]"),
            ("worst", lambda r: pct(r[5]) + (f" (restart {pct(r[6])})" if r[6] else "")),
            ("> 10 %", lambda r: "–" if r[7] is None else str(r[7])),
            ("clean acc", lambda r: pct(r[8])),
            ("paper mean / worst", lambda r: f"{pct(r[9])} / {pct(r[10])}"),
        ],
    )


def _figure(w: Any, rate: str, entry: dict[str, Any]) -> None:
    """The paper's figure over every implanted trigger with the methods that ran on all of them,
    and, where some ran on a subset only, a second over that subset with every method (a line
    through a method's few points would join triggers far apart)."""
    rows = entry["per_trigger"]
    triggers = [t for t in entry["triggers"] if rows[t]["implanted"]]
    methods = list(entry["methods"])
    full = [m for m in methods if all(m in rows[t]["methods"] for t in triggers)]
    _trigger_figure(w, f"asr-by-trigger-rate-{rate}.png", rate, rows, triggers, full, "")
    subset = [t for t in triggers if set(rows[t]["methods"]) - set(full)]
    if subset:
        note = f", the {len(subset)} triggers of the subset with every method"
        name = f"asr-by-trigger-rate-{rate}-subset.png"
        _trigger_figure(w, name, rate, rows, subset, methods, note)


def _trigger_figure(
    w: Any,
    name: str,
    rate: str,
    rows: dict[str, Any],
    triggers: list[str],
    methods: list[str],
    note: str,
) -> None:
    from engine.report import figures

    if "point" in methods:
        triggers = sorted(
            triggers, key=lambda t: (rows[t]["methods"].get("point", {}).get("asr", math.inf), t)
        )
    lines = {m: [rows[t]["methods"].get(m, {}).get("asr") for t in triggers] for m in methods}
    bars = {m: [_bar(rows[t]["methods"].get(m)) for t in triggers] for m in methods}
    w.figure(
        name,
        lambda path: figures.asr_by_trigger(
            path,
            triggers,
            [collect.trigger_pattern(t) for t in triggers],
            lines,
            "the single reversed trigger (point)" if "point" in methods else None,
            f"ASR after repair per trigger, stamping rate {rate}{note}",
            intervals=bars,
            colors=METHOD_COLORS,
        ),
        f"ASR after repair per trigger at rate {rate}{note}: Wilson 95 % intervals; for point "
        "the spread of its 3 restarts",
    )


def _bar(cell: dict[str, Any] | None) -> tuple[float, float] | None:
    if not cell:
        return None
    if "spread" in cell:
        return tuple(cell["spread"])
    return (cell["lo"], cell["hi"])


def _trigger_table(w: Any, rate: str, entry: dict[str, Any], stem: str = "triggers-rate") -> None:
    methods = list(entry["methods"])
    others = [m for m in methods if m != entry["reference"]]
    columns = ["trigger", "implanted", "attack_asr", "floor"]
    columns += [f"{m}_asr" for m in methods]
    columns += [f"mesa_minus_{m}{s}" for m in others for s in ("", "_lo", "_hi")]
    rows = []
    for trigger in entry["triggers"]:
        row = entry["per_trigger"][trigger]
        cells = row.get("methods", {})
        versus = row.get("versus_reference", {})
        values = [trigger, row["implanted"], row["attack_asr"], row.get("floor")]
        values += [cells.get(m, {}).get("asr") for m in methods]
        values += [versus.get(m, {}).get(k) for m in others for k in ("diff", "lo", "hi")]
        rows.append(values)
    w.md("Per trigger (the figure's numbers, and MESA minus each method, paired per image):", "")
    w.table(f"{stem}-{rate}.csv", columns, rows, markdown=False)


def _tests(w: Any, entry: dict[str, Any]) -> None:
    lines = []
    for method, test in entry["wilcoxon"].items():
        if test.get("p") is None:
            continue
        lines.append(f"- {versus_line(method, test)}")
    removed = entry["finetune_removes"]
    dropped = entry["not_implanted"]
    lines.append(
        f"- fine-tuning alone removes {removed['count']} trigger(s) (below 10 % or twice the "
        f"floor): {', '.join(removed['triggers']) or 'none'}"
    )
    lines.append(
        f"- not implanted (attack ASR under 50 %, left out of every mean): {dropped['count']}"
        + (f" ({', '.join(dropped['triggers'])})" if dropped["triggers"] else "")
    )
    if entry.get("re_attacked"):
        lines.append(
            "- added in a later sitting on a re-attacked model that scored the held-out images "
            "differently (paired with the rest by protocol, not image by image): "
            + "; ".join(f"{t}: {', '.join(m)}" for t, m in sorted(entry["re_attacked"].items()))
        )
    w.md(*lines, "")


def shown(folder: Path) -> str:
    """The folder as the reader would type it: relative to the working directory when inside."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def n_of(entry: dict[str, Any]) -> int:
    return len(entry["triggers"]) - entry["not_implanted"]["count"]


def _paper(paper: dict, method: str) -> list[float | None]:
    row = paper.get(method, {})
    return [row.get("mean"), row.get("worst")]


def versus_line(method: str, test: dict[str, Any]) -> str:
    """MESA against ``method`` over the triggers: where the paired per-trigger interval excludes
    zero each way, the median difference and the signed-rank test."""
    return (
        f"MESA vs {method}: lower on {test['lower']} and higher on {test['higher']} of "
        f"{test['n']} triggers (paired 95 % interval excluding zero), median difference "
        f"{pct(test.get('median_diff'))}, Wilcoxon signed-rank p = {test['p']:.2g}"
    )


def pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
