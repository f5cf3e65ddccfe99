"""The service's errors a client can cause, beside ``faceid.errors``: each says what to do, and ``app.py`` (and each
protocol, in its shape) answers it with its HTTP status. Here, not in ``core.py``, so that the modules ``core`` uses
(the policy) can raise them too."""

from __future__ import annotations

from ..errors import FaceIDError


class NotFound(FaceIDError):
    """No such thing, or not the caller's (the same answer: another key's data is not acknowledged)."""


class LimitExceeded(FaceIDError):
    """A request larger than this server takes: 413 for uploads, 422 for what a generation asks."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class Conflict(FaceIDError):
    """The request does not fit the thing's state (cancelling a finished job)."""
