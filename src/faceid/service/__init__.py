"""``faceid serve``: the HTTP API over the pipeline, one stage per module, along a request's path.

* :mod:`~faceid.service.config`: ``ServeConfig`` (data dir, database, keys, limits, models) and its checks;
* :mod:`~faceid.service.files`: the data dir's layout; every path from server-made ids, checked to stay inside;
* :mod:`~faceid.service.store`: SQLAlchemy models (identities, faces, uploads, jobs, images, each with its owner);
* :mod:`~faceid.service.enroll`: photos -> an identity (face analysis, crops, embeddings), in the request's thread;
* :mod:`~faceid.service.inputs`: a generation's input images by upload id (img2img, inpainting, ControlNet, swap);
* :mod:`~faceid.service.jobs`: the bounded job queue (batch picking, cancellation) and each job's events;
* :mod:`~faceid.service.worker`: one generation thread per device, batching compatible jobs (the same inputs);
* :mod:`~faceid.service.metrics`: Prometheus metrics;
* :mod:`~faceid.service.schema`: what ``/openapi.json`` promises: the response models, one error body for every
  status a route gives, binary uploads and PNGs, operation ids;
* :mod:`~faceid.service.policy`: what a request may ask for (valid text, defaults within limits, quotas per key,
  Host and Origin checks), between the routes and ``Service``;
* :mod:`~faceid.service.app`: the FastAPI app (``create_app``), used by ``faceid serve`` and the tests.

A web page or a Ray Serve deployment sits on the same layer: ``Service`` (in ``app.py``) holds the store,
the queue and the workers, and the routes only translate HTTP to it.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported when an app is made, not with the package
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'faceid.service' has no attribute {name!r}")
