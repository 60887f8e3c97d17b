"""Exceptions that zpipe raises to its users."""

from __future__ import annotations


class ZpipeError(Exception):
    """Base class of every error zpipe raises itself."""


class ConfigError(ZpipeError):
    """A pipeline description is invalid: bad file, field, import or params.

    Raised before any process starts; the message names the file, the stage and
    the field.
    """


class EncodeError(ZpipeError, TypeError):
    """A stage produced an item that cannot travel on the wire."""


class StageError(ZpipeError):
    """A stage replica failed or died.

    ``stage`` and ``replica`` say where; ``remote_traceback`` holds the
    formatted traceback from the stage's process when there is one.
    """

    def __init__(self, message: str, stage: str | None = None, replica: int | None = None,
                 exc_type: str | None = None, remote_traceback: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.replica = replica
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
