"""Alembic migrations of the store (batch mode, so SQLite can alter tables).

``HEAD`` is the newest revision; opening a database checks its stamp against this constant, so the
CLI need not import alembic on every command (a test keeps it equal to the scripts' head).
"""

from __future__ import annotations

from pathlib import Path

HEAD = "0004"
SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(url: str):
    """A programmatic alembic configuration (no alembic.ini needed at run time)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def known_revisions() -> set[str]:
    """Revision ids of the scripts shipped with this version (read from the file names)."""
    return {p.name.split("_", 1)[0] for p in (SCRIPT_LOCATION / "versions").glob("[0-9]*_*.py")}
