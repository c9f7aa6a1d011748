"""Shared pieces of the commands: one-line errors with exit code 2, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(fn: F) -> F:
    """Turn expected mistakes (``UserError``) and a damaged or unusable store (classified by
    ``store.health``) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            problem = store_problem(exc)
            if problem is None:
                raise
            typer.echo(f"error: {problem}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def store_problem(exc: BaseException) -> Exception | None:
    """The store problem behind an error from a store read or write (None when it is not one).
    The commands open the store of ``--db`` / ``MESA_TUI_DB``, so that is the store it names."""
    if "sqlalchemy" not in sys.modules:  # nothing touched a store
        return None
    from engine import paths
    from store.health import classify

    try:
        url = paths.default_db_url()
    except Exception:
        return None
    return classify(exc, url)


def print_json(obj: Any) -> None:
    """One JSON object on stdout (the machine-readable contract of every ``--json``)."""
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def open_app(results: Sequence[Path] = ()) -> None:
    """The app; ``results``: result folders of benchmarks/paper_study.py for its study screen,
    each checked here (one line and exit 2 for a folder that holds no results or a file that
    cannot be read)."""
    from engine.errors import UserError
    from engine.report import paper
    from mesa_tui.app import run_app

    for folder in results:
        if not paper.is_results_folder(folder):
            raise UserError(f"--results {paper.not_results_folder(folder)}")
        try:  # every record, so a damaged one is this line, not an error inside the app
            paper.read_folder(Path(folder))
        except UserError as exc:
            raise UserError(f"--results: {exc}") from None
    code = run_app(results=results)
    if code:
        raise typer.Exit(code)
