"""Settings read from the environment, all named ``MESA_TUI_*``.

Five documented settings were once named ``MESA_*``; their old names still work, with a warning
that names the new one, so a profile written for an earlier release keeps its meaning.
"""

from __future__ import annotations

import os
import warnings

# New name -> the name earlier releases documented.
RENAMED = {
    "MESA_TUI_DB": "MESA_DB",
    "MESA_TUI_HOME": "MESA_HOME",
    "MESA_TUI_DATA_ROOT": "MESA_DATA_ROOT",
    "MESA_TUI_OFFLINE": "MESA_OFFLINE",
    "MESA_TUI_COMMIT": "MESA_COMMIT",
}
_warned: set[str] = set()


def setting(name: str) -> str | None:
    """The value of ``name``, else of its old name (warned about once per process)."""
    value = os.environ.get(name)
    old = RENAMED.get(name)
    if value is not None or old is None or (value := os.environ.get(old)) is None:
        return value
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} is renamed {name}; set {name} instead", FutureWarning, stacklevel=2)
    return value
