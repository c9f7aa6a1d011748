"""Where mesa-tui keeps its state: the data, cache and config homes and the default store URL.

The bottom layer owns them because the store's default URL lies in the data home; the engine's
directories (``engine.paths``) are built on these. Setting ``XDG_DATA_HOME``, ``XDG_CACHE_HOME``
and ``XDG_CONFIG_HOME`` (or ``MESA_TUI_HOME``) isolates a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from store.environment import setting

APP = "mesa-tui"


class _XdgFallback:
    """XDG paths where platformdirs is absent (engine.ml must run with torch alone on a GPU box)."""

    @staticmethod
    def user_data_dir(app: str, appauthor: bool = False) -> str:
        base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
        return os.path.join(base, app)

    @staticmethod
    def user_cache_dir(app: str, appauthor: bool = False) -> str:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, app)

    @staticmethod
    def user_config_dir(app: str, appauthor: bool = False) -> str:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return os.path.join(base, app)


def _platformdirs():
    try:
        import platformdirs
    except ImportError:
        return _XdgFallback
    return platformdirs


def data_home() -> Path:
    """Persistent state: imported datasets, artifacts, the default store."""
    if home := setting("MESA_TUI_HOME"):
        return Path(home) / "data"
    return Path(_platformdirs().user_data_dir(APP, appauthor=False))


def cache_home() -> Path:
    """Re-creatable state: decoded dataset caches."""
    if home := setting("MESA_TUI_HOME"):
        return Path(home) / "cache"
    return Path(_platformdirs().user_cache_dir(APP, appauthor=False))


def config_home() -> Path:
    """The user's own settings: the app's columns and order (``mesa_tui.config``)."""
    if home := setting("MESA_TUI_HOME"):
        return Path(home) / "config"
    return Path(_platformdirs().user_config_dir(APP, appauthor=False))


def default_db_url() -> str:
    if url := setting("MESA_TUI_DB"):
        return url
    return f"sqlite:///{data_home() / 'mesa.db'}"
