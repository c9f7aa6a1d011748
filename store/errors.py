"""The one-line error every layer raises for a person's mistake (exit code 2, no traceback).

It lives here, in the bottom layer, so the store can raise it without importing the engine;
``engine.errors`` builds its own kinds on it.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the bad value and the fix."""

    exit_code = 2
