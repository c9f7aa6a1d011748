"""Build a report directory: ``report.md``, ``figures/*.png`` and ``tables/*.csv``.

The directory is written beside its destination under a temporary name and renamed into place at
the end, so a failure leaves nothing half-written; a non-empty destination is refused unless
``force``. The study tables come from ``Store.study_summary`` (what ``study show`` prints).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.report import collect
from engine.report.collect import GpuResult, JobData, SearchData, Series
from store.entities import FINISHED

SUMMARY_COLUMNS = (
    "method",
    "cells",
    "done",
    "asr_mean",
    "asr_worst",
    "asr_seed_std",
    "acc_clean_mean",
    "ra_mean",
    "paper_asr_mean",
    "paper_asr_worst",
)
CELL_COLUMNS = ("trigger", "method", "seed", "job_id", "status", "asr", "acc_clean", "ra")
ATTACK_PANELS = (
    ("train/loss", "training loss", "loss"),
    ("eval/acc_clean", "clean accuracy", "accuracy"),
    ("eval/asr", "attack success rate", "ASR"),
)
REPAIR_PANELS = (
    ("repair/loss", "repair loss", "loss"),
    ("eval/acc_clean", "clean accuracy", "accuracy"),
    ("eval/asr", "ASR of the original trigger", "ASR"),
)
SEARCH_PANELS = (("hinge", "hinge (validity loss)"), ("mine", "MINE estimate of I(z; G(z))"))
SEARCH_STATS = (
    "validity",
    "validity_mean",
    "knn_entropy",
    "pairwise_l2",
    "pixel_std",
    "bw_distinct",
    "nearest_to_true",
)
NO_GPU_RESULTS = (
    "No GPU results have been run yet: no `--gpu-results` file was given. "
    "`benchmarks/gpu.sh` on a machine with a GPU writes one (`benchmarks/results/*.json`)."
)


@dataclass
class ReportResult:
    """Where the report went; ``sizes`` maps each figure path to its (width, height) in pixels."""

    report: str
    figures: list[str]
    tables: list[str]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    unfinished: str = ""  # how a reported job ended when it did not succeed (the CLI says it)

    def to_json(self) -> dict[str, Any]:
        return {"report": self.report, "figures": self.figures, "tables": self.tables}


# ---------------------------------------------------------------------------------------------
# Entry points


def default_report_dir(name: str, now: datetime | None = None) -> Path:
    """``<data home>/reports/<name>-<UTC timestamp>``."""
    from engine import paths

    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "report"
    return paths.data_home() / "reports" / f"{safe}-{stamp}"


def resolve_target(store: Any, target: str | int, kind: str | None = None) -> tuple[str, str | int]:
    """``("study", name)``, ``("job", id)`` or ``("results", folder)`` (the paper-figure study's
    result folder, ``engine.report.paper``): a study name wins over a job id unless ``kind`` says
    which it is."""
    from engine.report import paper

    value = str(target).strip()
    if kind in (None, "results") and paper.is_results_folder(value):
        return "results", str(Path(value).resolve())
    if kind == "study":
        store.study(value)  # a UserError naming the study when it does not exist
        return "study", value
    if kind == "job":
        if not (value.isascii() and value.isdigit()):
            raise UserError(f"job id '{value}' is not a number; see `mesa-tui ls` for the ids")
        store.job(int(value))
        return "job", int(value)
    if value in {s.name for s in store.studies()}:
        return "study", value
    number = value.removeprefix("job").strip(" :#")
    if number.isascii() and number.isdigit():
        try:
            store.job(int(number))
        except UserError:
            pass
        else:
            return "job", int(number)
    problem = paper.path_problem(value, "a study name, a job id")
    if problem:  # meant as a result folder
        raise UserError(f"report: {problem}")
    raise UserError(
        f"'{value}' is neither a study nor a job id; see `mesa-tui study list` and `mesa-tui ls` "
        "for the names and ids"
    )


def check_destination(out: Path, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a directory for the report")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out '{out}' is not empty; give a new directory or pass --force to replace it"
        )
    return out


@contextmanager
def writing_beside(final: Path, option: str) -> Iterator[Path]:
    """A new folder beside ``final`` for the block to write and rename into place; whatever
    the block raises, that folder and the folders made for it go. A place that cannot hold it
    (a file on the way, a path the system will not make) is one line naming ``option``."""
    blocker = next((p for p in final.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(
            f"{option} '{final}': '{blocker}' is a file, not a folder; give another path"
        )
    missing = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    tmp = final.parent / f".{final.name}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UserError(
                f"{option} '{final}' cannot be made ({reason}); give a folder you can write"
            ) from None
        yield tmp
    except BaseException:
        shutil.rmtree(missing[-1] if missing else tmp, ignore_errors=True)  # the topmost made
        raise


def build_report(
    store: Any,
    target: str,
    out: str | Path,
    *,
    force: bool = False,
    gpu_results: Sequence[str | Path] = (),
    kind: str | None = None,
) -> ReportResult:
    """Write the report of a study (by name) or a job (by id) into ``out``; ``kind`` ("study" or
    "job") settles a study named like a job id."""
    kind, key = resolve_target(store, target, kind)
    ending = job_ending(store.job(int(key))) if kind == "job" else ""
    final = check_destination(Path(out), force)
    gpu = [collect.load_gpu_result(p) for p in gpu_results]
    with writing_beside(final, "--out") as tmp:
        writer = Writer(tmp, final)
        if kind == "study":
            _study_report(writer, store, str(key), gpu)
        elif kind == "results":
            from engine.report import paper

            paper.write(writer, Path(str(key)), gpu)
            if gpu:
                _gpu_section(writer, gpu)
        else:
            _job_report(writer, store, int(key), gpu)
        result = writer.finish()
        _move_into_place(tmp, final)
    result.unfinished = ending
    return result


def job_ending(job: Any) -> str:
    """How a job stands when it did not succeed ("" when it did). A queued job is refused: its
    report would hold nothing. A running one is reported with its curves so far (the app's export
    of a live run), and the line says so."""
    if job.status == "queued":
        raise UserError(
            f"job {job.id} is queued and has no results yet; wait for it "
            f"(`mesa-tui wait {job.id}`) and report it then"
        )
    if job.status == "succeeded":
        return ""
    if job.status not in FINISHED:
        return f"job {job.id} is {job.status}: the report holds its results so far"
    return f"job {job.id} {job.status}" + (f": {job.error}" if job.error else "")


def _move_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Writing


class Writer:
    """Collects the Markdown and writes figures and tables into the temporary directory."""

    def __init__(self, tmp: Path, final: Path):
        self.tmp = tmp
        self.final = final
        (tmp / "figures").mkdir(parents=True)
        (tmp / "tables").mkdir()
        self.lines: list[str] = []
        self.figures: list[str] = []
        self.tables: list[str] = []
        self.sizes: dict[str, tuple[int, int]] = {}

    def md(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, name: str, draw: Callable[[Path], tuple[int, int]], caption: str) -> None:
        path = self.tmp / "figures" / name
        size = draw(path)
        final = str(self.final / "figures" / name)
        self.figures.append(final)
        self.sizes[final] = size
        self.md(f"![{caption}](figures/{name})", "", f"*{caption}*", "")

    def table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        shown: Sequence[tuple[str, Callable[[Sequence[Any]], str]]] | None = None,
        markdown: bool = True,
    ) -> None:
        """Write ``tables/<name>`` (raw values; empty for None) and, unless ``markdown`` is off,
        a Markdown table (``shown``: column titles and cell formatters; default: every column)."""
        path = self.tmp / "tables" / name
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for row in rows:
                w.writerow(["" if v is None else v for v in row])
        self.tables.append(str(self.final / "tables" / name))
        if not markdown:
            self.md(f"Table: [`tables/{name}`](tables/{name}) ({len(rows)} rows).", "")
            return
        if shown is None:
            shown = [(c, _column(i)) for i, c in enumerate(columns)]
        self.md(
            "| " + " | ".join(t for t, _ in shown) + " |",
            "|" + "|".join("---" for _ in shown) + "|",
        )
        for row in rows:
            self.md("| " + " | ".join(fmt(row).replace("|", "\\|") for _, fmt in shown) + " |")
        self.md("", f"Table: [`tables/{name}`](tables/{name}).", "")

    def finish(self) -> ReportResult:
        path = self.tmp / "report.md"
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        return ReportResult(str(self.final / "report.md"), self.figures, self.tables, self.sizes)


def _column(i: int) -> Callable[[Sequence[Any]], str]:
    return lambda row: _text(row[i])


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} MiB"


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.fmean(v) if v else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _code_version() -> str:
    from engine.version import code_version

    return code_version()


# ---------------------------------------------------------------------------------------------
# The study report


def _study_report(w: Writer, store: Any, name: str, gpu: list[GpuResult]) -> None:
    summary = store.study_summary(name)
    members = store.study_members(name)
    info = summary.study
    jobs = [collect.load_job(store, m.job_id, m) for m in members]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(info.status_counts.items()))
    params = info.params
    w.md(
        f"# Report: study {info.name}",
        "",
        f"Template `{info.template}`, created {info.created_at:%Y-%m-%d %H:%M} UTC; "
        f"{info.job_count} jobs ({counts}). Dataset `{params.get('dataset', '?')}`, "
        f"{len(params.get('triggers', []))} triggers, methods "
        f"{', '.join(params.get('methods', [])) or '?'}, seeds "
        f"{', '.join(map(str, params.get('seeds', []))) or '?'}, target "
        f"{params.get('target_mode', '?')}.",
        "",
        f"Generated {_now()} by `mesa-tui report` ({_code_version()}). Every table below has its "
        "CSV under `tables/`; the numbers are those of `mesa-tui study show "
        f"{info.name} --json` (the same repository function).",
        "",
    )
    _summary_section(w, summary)
    _trigger_section(w, summary)
    _curves_section(w, store, jobs)
    _searches_section(w, store, [j for j in jobs if j.kind == "mesa"])
    _cost_section(w, jobs)
    _gpu_section(w, gpu)
    _provenance_section(w, jobs, study=summary)


def _summary_section(w: Writer, summary: Any) -> None:
    w.md(
        "## Results beside the paper",
        "",
        "ASR of the original trigger after repair, on the held-out images: mean and worst over "
        "the triggers (worst: the highest after repair, the lowest before), the spread of the "
        "per-seed means, clean accuracy before repair (the attacked models) and after, robust "
        "accuracy, and the paper's numbers (mesa-method.md section 5; the paper does not report "
        "clean accuracy).",
        "",
    )
    before = {
        (c.trigger, c.seed): c.acc_clean
        for c in summary.cells
        if c.method == "before repair" and c.acc_clean is not None
    }
    rows, before_col = [], []
    for r in summary.rows:
        rows.append([getattr(r, f) for f in SUMMARY_COLUMNS])
        if r.method == "before repair":
            before_col.append(r.acc_clean_mean)
        else:
            done = [c for c in summary.cells if c.method == r.method and c.asr is not None]
            before_col.append(_mean(before.get((c.trigger, c.seed)) for c in done))
    columns = (*SUMMARY_COLUMNS, "acc_clean_before")
    full = [[*row, b] for row, b in zip(rows, before_col, strict=True)]
    idx = {c: i for i, c in enumerate(columns)}

    def p(col: str) -> Callable[[Sequence[Any]], str]:
        return lambda row: pct(row[idx[col]])

    w.table(
        "summary.csv",
        columns,
        full,
        shown=[
            ("method", lambda row: str(row[0])),
            ("done", lambda row: f"{row[idx['done']]}/{row[idx['cells']]}"),
            ("ASR mean", p("asr_mean")),
            ("ASR worst", p("asr_worst")),
            ("seed sd", p("asr_seed_std")),
            ("paper mean", p("paper_asr_mean")),
            ("paper worst", p("paper_asr_worst")),
            ("clean acc before", p("acc_clean_before")),
            ("clean acc after", p("acc_clean_mean")),
            ("robust acc", p("ra_mean")),
        ],
    )
    w.table(
        "cells.csv",
        CELL_COLUMNS,
        [[getattr(c, f) for f in CELL_COLUMNS] for c in summary.cells],
        markdown=False,
    )
    if summary.protocol_notes:
        w.md("Protocol differences from the paper:", "")
        w.md(*[f"- {n}" for n in summary.protocol_notes], "")


def trigger_table(summary: Any) -> tuple[list[str], list[str], dict[str, list[float | None]]]:
    """(triggers sorted by the point baseline, methods, method -> per-trigger mean ASR)."""
    order: list[str] = []
    for t in [*summary.study.params.get("triggers", []), *(c.trigger for c in summary.cells)]:
        if t and t not in order:
            order.append(t)
    methods = [r.method for r in summary.rows if r.method != "before repair"]
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in summary.cells:
        if c.asr is not None and c.method in methods:
            values[c.method][c.trigger].append(c.asr)
    lines = {
        m: [statistics.fmean(values[m][t]) if values[m][t] else None for t in order]
        for m in methods
    }
    if "point" in lines:
        point = lines["point"]
        ranked = sorted(
            range(len(order)),
            key=lambda i: (point[i] is None, point[i] if point[i] is not None else 0.0, i),
        )
        order = [order[i] for i in ranked]
        lines = {m: [v[i] for i in ranked] for m, v in lines.items()}
    return order, methods, lines


def _trigger_section(w: Writer, summary: Any) -> None:
    from engine.report import figures

    triggers, methods, lines = trigger_table(summary)
    w.md("## ASR after repair per trigger", "")
    if not triggers or not methods:
        w.md("No defense of this study has a trigger yet.", "")
        return
    sorted_by = "the single reversed trigger (point)" if "point" in lines else None
    w.md(
        "The paper's figure: for each trigger (its 3x3 pattern under the axis) the ASR after "
        "repair of every method (mean over seeds and restarts), triggers sorted by the "
        + ("single-reversed-trigger baseline (`point`)." if sorted_by else "template's order.")
        + " Gaps: not finished yet.",
        "",
    )
    patterns = [collect.trigger_pattern(t) for t in triggers]
    w.figure(
        "asr-by-trigger.png",
        lambda path: figures.asr_by_trigger(
            path, triggers, patterns, lines, sorted_by, "ASR after repair per trigger"
        ),
        "ASR after repair per trigger, one line per method",
    )
    w.table(
        "asr_by_trigger.csv",
        ("trigger", *methods),
        [[t, *[lines[m][i] for m in methods]] for i, t in enumerate(triggers)],
        markdown=False,
    )


# ---------------------------------------------------------------------------------------------
# Curves (attack and repair)


def _curve_rows(job: JobData, s: Series) -> list[list[Any]]:
    return [
        [job.id, job.kind, job.trigger, job.method, job.seed, s.key, float(x), float(y)]
        for x, y in zip(s.steps, s.values, strict=True)
    ]


def _collect_curves(
    store: Any, jobs: Sequence[JobData], panels: Sequence[tuple[str, str, str]], group_by: str
) -> tuple[list[tuple[str, str, list[tuple[str, Series]]]], list[list[Any]]]:
    out: list[tuple[str, str, list[tuple[str, Series]]]] = []
    rows: list[list[Any]] = []
    for key, title, ylabel in panels:
        lines: list[tuple[str, Series]] = []
        for job in jobs:
            s = collect.series(store, job, key)
            if s is None:
                continue
            if job.kind == "train" and key.startswith("eval/"):
                s = collect.epoch_axis(store, job, s, "train/epoch")
            rows += _curve_rows(job, s)
            if group_by == "method":
                group = job.method or job.kind
            elif group_by == "trigger":
                group = job.trigger or "clean"
            else:
                group = f"job {job.id}"
            lines.append((group, s))
        out.append((title, ylabel, lines))
    return out, rows


def _curves_section(w: Writer, store: Any, jobs: Sequence[JobData]) -> None:
    from engine.report import figures

    trains = [j for j in jobs if j.kind == "train" and j.role != "clean"]
    defends = [j for j in jobs if j.kind == "defend"]
    if not trains and not defends:
        return
    w.md("## Attack and repair curves", "")
    rows: list[list[Any]] = []
    if trains:
        panels, r = _collect_curves(
            store, trains, ATTACK_PANELS, "trigger" if len(trains) > 1 else "job"
        )
        rows += r
        w.md(
            "The attacks (poisoned training): training loss per step, clean accuracy and ASR "
            "per epoch on the held-out images.",
            "",
        )
        if any(lines for _, _, lines in panels):
            w.figure(
                "attack-curves.png",
                lambda path: figures.curves(
                    path, panels, "attack (poisoned training)", ("step", "epoch", "epoch")
                ),
                f"attack curves of {len(trains)} training job{'s' * (len(trains) != 1)}",
            )
        else:
            w.md("No attack has recorded a curve yet.", "")
    if defends:
        panels, r = _collect_curves(store, defends, REPAIR_PANELS, "method")
        rows += r
        w.md(
            "The repairs: loss per epoch, clean accuracy and ASR of the original trigger per "
            "epoch (epoch 0: before repair), one colour per method.",
            "",
        )
        if any(lines for _, _, lines in panels):
            w.figure(
                "repair-curves.png",
                lambda path: figures.curves(path, panels, "repair (fine-tuning)", "epoch"),
                f"repair curves of {len(defends)} defense job{'s' * (len(defends) != 1)}",
            )
        else:
            w.md("No repair has recorded a curve yet.", "")
    w.table(
        "curves.csv",
        ("job_id", "kind", "trigger", "method", "seed", "key", "step", "value"),
        rows,
        markdown=False,
    )


# ---------------------------------------------------------------------------------------------
# MESA searches


def _searches_section(w: Writer, store: Any, searches: Sequence[JobData]) -> None:
    if not searches:
        return
    w.md(
        "## MESA searches",
        "",
        "Per search: the sampled triggers per beta (the original pattern beside them, from the "
        "evaluation's ground truth), their 2-D embedding, the hinge and MINE curves of training, "
        "and the validity histogram (each sample's own ASR on the defender's images; a sample at "
        "or above beta is valid).",
        "",
    )
    for job in searches:
        _search_section(w, store, collect.load_search(job))


def _search_section(w: Writer, store: Any, s: SearchData) -> None:
    from engine.report import figures

    job = s.job
    stem = f"search-{job.id}"
    title = f"job {job.id}: {job.trigger or job.label or 'search'} → target {s.target}"
    w.md(f"### Search {title} ({job.status})", "")
    latest = job.runs[-1].latest if job.runs else {}
    final = {**latest, **job.metrics}

    def stat(beta: str, name: str) -> float | None:
        v = final.get(f"mesa/beta={beta}/{name}")
        return v if v is not None and math.isfinite(v) else None

    if s.samples:
        captions = {
            b: f"validity {pct(stat(b, 'validity'))}" if stat(b, "validity") is not None else ""
            for b in s.samples
        }
        w.figure(
            f"{stem}-grids.png",
            lambda path: figures.search_grids(path, s.samples, s.original, captions, title),
            f"sampled triggers per beta, job {job.id}",
        )
        projected, point = collect.pca_2d(s.samples, s.original)
        w.figure(
            f"{stem}-embedding-pca.png",
            lambda path: figures.embedding(
                path, projected, point, f"PCA of the samples, job {job.id}", "PC"
            ),
            f"PCA embedding of the samples, job {job.id}",
        )
        tsne = collect.tsne_2d(s.samples)
        if tsne is not None:
            w.figure(
                f"{stem}-embedding-tsne.png",
                lambda path: figures.embedding(
                    path, tsne, None, f"t-SNE of the samples, job {job.id}", "t-SNE"
                ),
                f"t-SNE embedding of the samples, job {job.id}",
            )
        else:
            w.md("(t-SNE: install scikit-learn to add it.)", "")
    else:
        w.md("No samples on disk yet (the search writes them when it ends).", "")
    panels = []
    for name, panel_title in (*SEARCH_PANELS, ("validity", "validity (share of valid samples)")):
        lines = []
        for beta in s.betas:
            series = collect.series(store, job, f"mesa/beta={beta}/{name}")
            if series is not None:
                lines.append((f"β={beta}", series))
        panels.append((panel_title, name, lines))
    if any(lines for _, _, lines in panels):
        w.figure(
            f"{stem}-curves.png",
            lambda path: figures.curves(path, panels, f"search training, job {job.id}", "step"),
            f"hinge, MINE and validity during the search, job {job.id}",
        )
    if s.histograms:
        w.figure(
            f"{stem}-validity.png",
            lambda path: figures.validity_histogram(
                path, s.histograms, f"validity histogram, job {job.id}"
            ),
            f"validity histogram per beta, job {job.id}",
        )
    names = [n for n in SEARCH_STATS if any(stat(b, n) is not None for b in s.betas)]
    if s.betas and names:
        rows = [[b, *[stat(b, n) for n in names]] for b in s.betas]
        w.table(f"{stem}-stats.csv", ("beta", *names), rows)


# ---------------------------------------------------------------------------------------------
# Cost, GPU results, provenance


COST_COLUMNS = (
    "stage",
    "device",
    "runs",
    "wall_s_total",
    "wall_s_mean",
    "wall_s_max",
    "peak_rss_mb",
    "peak_gpu_mb",
)


def cost_rows(jobs: Sequence[JobData]) -> list[list[Any]]:
    """Per stage (job kind) and device: finished runs, wall time, peak memory (largest)."""
    groups: dict[tuple[str, str], list[collect.RunData]] = defaultdict(list)
    for job in jobs:
        for run in job.runs:
            if run.wall_s is not None:
                groups[(job.kind, run.device)].append(run)
    rows = []
    for (stage, device), runs in sorted(groups.items()):
        walls = [r.wall_s for r in runs if r.wall_s is not None]
        rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
        gpu = [r.peak_gpu_mb for r in runs if r.peak_gpu_mb is not None]
        rows.append(
            [
                stage,
                device,
                len(runs),
                round(sum(walls), 3),
                round(statistics.fmean(walls), 3),
                round(max(walls), 3),
                round(max(rss), 1) if rss else None,
                round(max(gpu), 1) if gpu else None,
            ]
        )
    return rows


def _cost_section(w: Writer, jobs: Sequence[JobData]) -> None:
    rows = cost_rows(jobs)
    w.md(
        "## Cost",
        "",
        "Wall time of every finished attempt (start to end as the engine recorded them) and the "
        "peak memory the runs reported (resident set of the run's process; GPU: peak allocated "
        "by torch), per stage and device.",
        "",
    )
    if not rows:
        w.md("No attempt has finished yet.", "")
        return
    w.table(
        "cost.csv",
        COST_COLUMNS,
        rows,
        shown=[
            ("stage", lambda r: str(r[0])),
            ("device", lambda r: str(r[1])),
            ("runs", lambda r: str(r[2])),
            ("wall total", lambda r: _seconds(r[3])),
            ("wall mean", lambda r: _seconds(r[4])),
            ("wall max", lambda r: _seconds(r[5])),
            ("peak memory", lambda r: _mb(r[6])),
            ("peak GPU memory", lambda r: _mb(r[7])),
        ],
    )
    if all(r[6] is None and r[7] is None for r in rows):
        w.md("Peak memory was not recorded by these runs (older engine).", "")


def _gpu_section(w: Writer, gpu: Sequence[GpuResult]) -> None:
    w.md("## GPU results", "")
    if not gpu:
        w.md(NO_GPU_RESULTS, "")
        return
    rows = []
    for g in gpu:
        for key, value in g.figures.items():
            rows.append([g.device, Path(g.path).name, key, value])
    for g in gpu:
        versions = ", ".join(
            x
            for x in (f"torch {g.torch}" if g.torch else "", f"CUDA {g.cuda}" if g.cuda else "")
            if x
        )
        w.md(
            f"- `{Path(g.path).name}`: measured on **{g.device}**"
            + (f" ({versions})" if versions else "")
            + (" — a `--tiny` smoke run, not a measurement" if g.tiny else "")
        )
    w.md("")
    w.table("gpu_results.csv", ("device", "file", "figure", "value"), rows)


def provenance_rows(jobs: Sequence[JobData], study: Any | None = None) -> list[list[str]]:
    runs = [r for j in jobs for r in j.runs]
    infos = [r.info for r in runs]

    def distinct(values: Iterable[Any]) -> str:
        counted = Counter(str(v) for v in values if v not in (None, ""))
        if not counted:
            return "not recorded"
        return "; ".join(f"{v} ({n} runs)" if len(counted) > 1 else v for v, n in counted.items())

    datasets: dict[str, set[str]] = defaultdict(set)
    for j in jobs:
        name = j.spec.get("dataset")
        if name and j.kind == "train":
            hashes = {h for h in [j.dataset_hash, *(r.info.dataset_hash for r in j.runs)] if h}
            datasets[str(name)] |= hashes
    seeds = sorted(
        {r.seed for r in infos if r.seed is not None}
        | {j.seed for j in jobs if isinstance(j.seed, int)}
    )
    rows = [
        ["report generated", _now()],
        ["report code version", _code_version()],
        ["code version of the runs", distinct(r.code_version for r in infos)],
        ["torch", distinct(r.env.get("torch") for r in infos)],
        [
            "CUDA",
            distinct(r.env.get("cuda") or ("none" if r.env.get("torch") else None) for r in infos),
        ],
        ["python", distinct(r.env.get("python") for r in infos)],
        ["device", distinct(r.device for r in runs if r.device != "unknown")],
        ["host", distinct(r.host for r in infos)],
        ["executor", distinct(r.executor for r in infos)],
        [
            "dataset",
            "; ".join(
                f"{name} (sha256 {', '.join(sorted(h)) or 'not recorded'})"
                for name, h in sorted(datasets.items())
            )
            or distinct(j.dataset_hash for j in jobs),
        ],
        ["seeds", ", ".join(map(str, seeds)) or "not recorded"],
        ["jobs", str(len(jobs))],
        ["runs (attempts)", str(len(runs))],
    ]
    if study is not None:
        params = study.study.params
        rows.insert(2, ["study", f"{study.study.name} (template {study.study.template})"])
        if params.get("overrides"):
            rows.append(
                ["overrides", ", ".join(f"{k}={v}" for k, v in sorted(params["overrides"].items()))]
            )
    return rows


def _provenance_section(w: Writer, jobs: Sequence[JobData], study: Any | None = None) -> None:
    w.md("## Provenance", "")
    w.table("provenance.csv", ("item", "value"), provenance_rows(jobs, study))


# ---------------------------------------------------------------------------------------------
# The job report


def _job_report(w: Writer, store: Any, job_id: int, gpu: list[GpuResult]) -> None:
    job = collect.load_job(store, job_id)
    chain = [collect.load_job(store, j) for j in collect.upstream_chain(store, job_id)]
    jobs = [*chain, job]
    w.md(
        f"# Report: {job.name}",
        "",
        f"Status **{job.status}**"
        + (f" ({job.error})" if job.error and job.status != "succeeded" else "")
        + f", {len(job.runs)} attempt{'s' * (len(job.runs) != 1)}."
        f" Generated {_now()} by `mesa-tui report` ({_code_version()}).",
        "",
    )
    if chain:
        w.md(
            "## Upstream chain",
            "",
            *[
                f"- job {j.id}: {j.kind}{' · ' + j.label if j.label else ''} ({j.status})"
                for j in chain
            ],
            f"- job {job.id}: {job.kind}{' · ' + job.label if job.label else ''} (this job)",
            "",
            "Its upstream jobs' curves and searches are included below.",
            "",
        )
    w.md("## Job", "")
    rows = [[f"spec.{k}", v] for k, v in sorted(job.spec.items())]
    rows += [[f"result.{k}", v] for k, v in sorted(job.metrics.items())]
    for k, v in sorted((job.result or {}).items()):
        if k not in ("metrics", "histograms") and not isinstance(v, dict | list):
            rows.append([f"result.{k}", v])
    w.table("job.csv", ("item", "value"), rows)
    _curves_section(w, store, jobs)
    _searches_section(w, store, [j for j in jobs if j.kind == "mesa"])
    _cost_section(w, jobs)
    _gpu_section(w, gpu)
    _provenance_section(w, jobs)
