"""Reports: ``mesa-tui report STUDY_OR_JOB --out DIR`` and the app's export key.

``build_report(store, target, out, force=False, gpu_results=())`` writes ``DIR/report.md`` with
PNG figures under ``figures/`` (matplotlib, Agg canvas) and the CSV behind every table under
``tables/``. Study tables come from ``Store.study_summary``, the function behind ``study show``.
No torch here: the report reads the store, ``.npy`` samples and JSON, and draws with matplotlib.
"""

from engine.report.build import (
    ReportResult,
    build_report,
    check_destination,
    default_report_dir,
    resolve_target,
)

__all__ = [
    "ReportResult",
    "build_report",
    "check_destination",
    "default_report_dir",
    "resolve_target",
]
