"""Requests that answer with their images (the OpenAI and AUTOMATIC1111 protocols), over the job service.

A ``/v1`` client submits, then polls or listens; these protocols' clients wait on one request. ``run`` submits a
``/v1`` generation and waits for it, so such a request is a job like any other (the same checks, queue, batching,
listing). ``person`` and ``uploads`` hold what the request brought (face photos, images) for the request only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import FaceIDError
from .core import Service


class GenerationTimeout(FaceIDError):
    """The job did not finish within ``ServeConfig.sync_timeout``: it was cancelled."""


class GenerationFailed(FaceIDError):
    """The job failed (or was cancelled) while the request waited."""


def run(service: Service, owner: str, request: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Submit a ``/v1`` generation request, wait for it; its view and its image ids. A job still unfinished
    after ``sync_timeout`` is cancelled (nobody would collect its images)."""
    job, _ = service.submit(owner, request)
    view = service.wait(job.id, owner, service.config.sync_timeout)
    if view["status"] in ("queued", "running"):
        service.cancel(job.id, owner)
        raise GenerationTimeout(
            f"the images took longer than this server waits ({service.config.sync_timeout:.0f} s): ask for fewer or "
            "smaller images, or use /v1/generations, which answers at once and lets you poll"
        )
    if view["status"] != "done":
        raise GenerationFailed(f"the generation {view['status']}: {view['error'] or 'it was cancelled'}")
    return view, service.image_ids(job.id, owner)


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
