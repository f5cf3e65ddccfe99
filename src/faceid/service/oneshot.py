"""Requests that answer with their images (the OpenAI and AUTOMATIC1111 protocols), over the job service.

A ``/v1`` client submits, then polls or listens; these protocols' clients wait on one request. ``run`` submits a
``/v1`` generation and waits for it, so such a request is a job like any other (the same checks, queue, batching,
listing). ``person`` and ``uploads`` hold what the request brought (face photos, images) for the request only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..errors import FaceIDError, FaceSelectionError, ImageError, NoFaceError
from ..speech import AudioError
from .core import Service
from .errors import Conflict, LimitExceeded, NotFound
from .jobs import QueueFull
from .policy import QuotaExceeded


class GenerationTimeout(FaceIDError):
    """The job did not finish within ``ServeConfig.sync_timeout``: it was cancelled."""


class GenerationFailed(FaceIDError):
    """The job failed (or was cancelled) while the request waited."""


def run(service: Service, owner: str, request: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Submit a ``/v1`` generation request and wait for it: its view and its image ids."""
    job, _ = service.submit(owner, request)
    return wait(service, owner, job.id)


def wait(service: Service, owner: str, job_id: str) -> tuple[dict[str, Any], list[str]]:
    """Wait for a generation: its view and its image ids once done. A job still unfinished after ``sync_timeout``
    is cancelled (nobody would collect its images)."""
    view = service.wait(job_id, owner, service.config.sync_timeout)
    if view["status"] in ("queued", "running"):
        service.cancel(job_id, owner)
        raise GenerationTimeout(
            f"the images took longer than this server waits ({service.config.sync_timeout:.0f} s): ask for fewer or "
            "smaller images, or use /v1/generations, which answers at once and lets you poll"
        )
    if view["status"] != "done":
        raise GenerationFailed(f"the generation {view['status']}: {view['error'] or 'it was cancelled'}")
    return view, service.image_ids(job_id, owner)


@contextlib.contextmanager
def person(service: Service, owner: str, photos: list[tuple[str, bytes]]) -> Iterator[Any]:
    """The person in ``photos`` ((label, bytes) each) as an identity for this request only: enrolled (checked as
    ``POST /v1/identities`` checks photos), deleted afterwards."""
    identity, _ = service.enroll(owner, None, photos)
    try:
        yield identity
    finally:
        service.delete_identity(identity.id, owner)


@contextlib.contextmanager
def uploads(service: Service, owner: str) -> Iterator[Any]:
    """``add(label, bytes) -> Upload``: images stored as uploads for this request only, deleted afterwards."""
    made: list[str] = []

    def add(label: str, data: bytes):
        row = service.add_upload(owner, label, data)
        made.append(row.id)
        return row

    try:
        yield add
    finally:
        for upload_id in made:
            service.delete_upload(upload_id, owner)


@dataclass
class ServiceError:
    """What a service error means over HTTP, the statuses ``/v1`` gives: each protocol answers it in its shape."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def classify(exc: BaseException) -> ServiceError | None:
    """A service error's status, code and message (None: not an error a client caused or can act on)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, QuotaExceeded):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        return ServiceError(exc.status, "quota_exceeded", message, headers)
    if isinstance(exc, QueueFull):
        return ServiceError(429, "queue_full", f"the generation queue is full; try again in {exc.retry_after} s",
                            {"Retry-After": str(exc.retry_after)})  # fmt: skip
    for kinds, status, code in (
        (GenerationTimeout, 504, "timeout"),
        (GenerationFailed, 500, "generation_failed"),
        (NotFound, 404, "not_found"),
        (LimitExceeded, getattr(exc, "status", 422), "limit_exceeded"),
        ((NoFaceError, FaceSelectionError), 422, "no_face"),
        (ImageError, 400, "bad_image"),
        (AudioError, 400, "bad_audio"),
        (Conflict, 409, "conflict"),
        ((FaceIDError, ValidationError), 422, "invalid_request"),
    ):
        if isinstance(exc, kinds):
            return ServiceError(status, code, message)
    return None
