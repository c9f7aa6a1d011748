"""The app's own settings, kept between sittings in ``app.toml`` in the user's config home
(``mesa-tui paths`` shows where): for now which columns the jobs table shows and its order.

The file is TOML, written by the app whenever a setting changes; tables and keys it does not
know are kept as they were. Reading never stops the app:

- a file it cannot read or parse is left alone: the app says so in one line at start, runs with
  the defaults and writes nothing over it;
- a value of the wrong type (``sort = 3``) is named in that line and the default used instead;
  the next change the user makes replaces it;
- column names it does not know (a column of a later or earlier version) are ignored.

Each write goes to a temporary file beside it, flushed to disk and renamed over ``app.toml``
(``os.replace``), so a crash or a full disk leaves the old file or the new one, never half of
one. A write that fails is reported to the caller, not raised.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from store.paths import config_home

FILE = "app.toml"


def config_path() -> Path:
    return config_home() / FILE


@dataclass(frozen=True)
class JobsView:
    """The jobs table's columns (None: every column, also those added later) and order."""

    columns: tuple[str, ...] | None = None
    sort: str = "id"
    descending: bool = True


@dataclass
class AppConfig:
    """Read once when the app starts; ``save_jobs_view`` writes the file at each change.

    ``path`` None keeps the settings in memory only (the tests' and the benchmark's apps)."""

    path: Path | None = None
    jobs: JobsView = field(default_factory=JobsView)
    problem: str | None = None  # one line for the user: what in the file was not used
    read_only: bool = False  # the file could not be read: nothing is written over it
    _data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> AppConfig:
        path = path if path is not None else config_path()
        data, problem = _read(path)
        if problem is not None:
            return cls(path, problem=f"{problem}; the app uses its defaults", read_only=True)
        jobs = data.get("jobs", {})
        wrong: list[str] = []
        if isinstance(jobs, dict):
            view = _jobs_view(jobs, wrong)
        else:
            view = JobsView()
            wrong.append(f"jobs = {_shown(jobs)} is not a table")
        problem = (
            f"{path}: {'; '.join(wrong)}; the app uses the defaults for these" if wrong else None
        )
        return cls(path, view, problem=problem, _data=data)

    def save_jobs_view(self, view: JobsView) -> str | None:
        """Keep ``view`` and write it to the file; returns why it could not be written (None
        when written, or when there is no file to keep it in)."""
        self.jobs = view
        if self.path is None or self.read_only:
            return None
        # Read again: another app may have written the file since this one started.
        data, problem = _read(self.path)
        if problem is not None:
            return f"{problem}; the columns and order are not saved"
        self._data = data
        jobs = data.get("jobs")
        table = dict(jobs) if isinstance(jobs, dict) else {}
        table.pop("columns", None)
        if view.columns is not None:
            table["columns"] = list(view.columns)
        table["sort"] = view.sort
        table["descending"] = view.descending
        data["jobs"] = table
        try:
            write_atomically(self.path, dumps(data))
        except OSError as exc:
            return f"{self.path}: {exc.strerror or exc}; the columns and order are not saved"
        return None


def _read(path: Path) -> tuple[dict[str, Any], str | None]:
    """The file's tables (empty when there is no file) or one line saying why it can't be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"{path}: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return {}, f"{path}: not UTF-8 text"
    except tomllib.TOMLDecodeError as exc:
        return {}, f"{path}: not valid TOML ({exc})"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:29] + "…"


def _checked(table: dict, key: str, fallback: Any, wrong: list[str], ok: Any, problem: str) -> Any:
    """``table[key]`` when present and ``ok``; else the fallback, noting a present bad value."""
    if key not in table:
        return fallback
    value = table[key]
    if ok(value):
        return value
    wrong.append(f"jobs.{key} = {_shown(value)} {problem}")
    return fallback


def _jobs_view(table: dict[str, Any], wrong: list[str]) -> JobsView:
    """The [jobs] table as a view; each value of the wrong type is the default's, and named in
    ``wrong``. Column names are not checked here (the table ignores those it does not know)."""
    default = JobsView()
    columns = _checked(
        table,
        "columns",
        default.columns,
        wrong,
        lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
        "is not a list of column names",
    )
    sort = _checked(
        table, "sort", default.sort, wrong, lambda v: isinstance(v, str), "is not a column name"
    )
    descending = _checked(
        table,
        "descending",
        default.descending,
        wrong,
        lambda v: isinstance(v, bool),
        "is not true or false",
    )
    return JobsView(tuple(columns) if isinstance(columns, list) else columns, sort, descending)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s directory, flush it to disk and rename it
    over ``path``: readers see the old file or the new one. An existing file's mode is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(partial, stat.S_IMODE(path.stat().st_mode))
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


HEADER = "# mesa-tui's app settings, rewritten by the app when they change (mesa_tui/config.py)\n"


def dumps(data: dict[str, Any]) -> str:
    """TOML for what ``tomllib`` read from this file (tomli-w writes what tomllib reads)."""
    return HEADER + tomli_w.dumps(data)
