"""Errors that reach a person as one line (exit code 2), never as a traceback.

``UserError`` is the store's (the bottom layer raises it too); the engine's kinds build on it.
"""

from store.errors import UserError

__all__ = ["Cancelled", "DatasetMissing", "UnsafeFile", "UserError"]


class DatasetMissing(UserError):
    """A dataset could not be found locally and could not be downloaded."""


class UnsafeFile(UserError):
    """An archive or checkpoint that would need unsafe extraction or unpickling."""


class Cancelled(Exception):
    """Raised inside a task when the reporter asks it to stop (cooperative cancel)."""
