"""Errors that reach a person as one line (exit code 2), never as a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the bad value and the fix."""

    exit_code = 2


class DatasetMissing(UserError):
    """A dataset could not be found locally and could not be downloaded."""


class UnsafeFile(UserError):
    """An archive or checkpoint that would need unsafe extraction or unpickling."""


class Cancelled(Exception):
    """Raised inside a task when the reporter asks it to stop (cooperative cancel)."""
