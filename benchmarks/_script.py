"""What the ML benchmark scripts share: user errors (a missing dataset, a bad value) as one line
on stderr and exit code 2 instead of a traceback. The scripts put the repository on the import
path before they import this."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(main: Callable[[], object]) -> None:
    """Call a script's ``main`` and exit with its return code, or 2 on a ``UserError``."""
    from engine.errors import UserError

    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
