"""``faceid serve --ray``: the single server's ``Service`` on Ray Serve, its state shared through the database.

Two deployments make the application; every process opens the same database (``--database-url``; SQLite in the
data dir on one machine, PostgreSQL for several) and the same data dir (shared storage on a cluster):

- ``FaceIDIngress`` (``--ingress-replicas``): the FastAPI app (``create_app``) as Serve's HTTP ingress. Its
  ``Service`` enrolls, takes uploads, checks and queues generations (a row each), and answers for any job from the
  database: its view, its events (progress, previews), a cancel. It runs no generation: its one worker is a
  ``ReplicaDescription`` that tells the service what the model replicas serve (defaults, methods, tiny decoder).
- ``FaceIDModel`` (``--replicas``, one per GPU by default; CPU replicas without GPUs): a ``Service`` whose
  ``Worker`` is the single server's, loading its model sets with the same loader (``PipelineLoader``: paths and
  names, picklable; the pipeline itself is never pickled) and everything the server runs with them (ControlNets,
  style adapters, few-step LoRAs, identity methods, the tiny decoder), within the memory budget. It claims batches
  of compatible jobs from the database queue as a single-server worker does, and writes their progress, previews
  and ends there; a cancel is a flag it reads at its next step. A replica that dies leaves its jobs to be queued
  again by another process once its heartbeat is stale (``ServeConfig.lease_seconds``).

Every image's PNG records the replica that made it (``replica`` in its metadata, ``ServeConfig.image_extra``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from ..settings import GenerationSettings
from .config import ServeConfig
from .models import PipelineLoader
from .worker import Worker

logger = logging.getLogger(__name__)

APP_NAME = "faceid"
MODEL_DEPLOYMENT = "FaceIDModel"
INGRESS_DEPLOYMENT = "FaceIDIngress"


@dataclass
class RayOptions:
    """How the application is laid out on the cluster."""

    replicas: int = 1  # model replicas, each one worker
    ingress_replicas: int = 1
    gpus: bool = False  # one GPU per model replica
    config: dict[str, Any] = field(default_factory=dict)  # ServeConfig fields (picklable ones), for every replica


def _service_config(options: RayOptions, loader: PipelineLoader, **more: Any) -> ServeConfig:
    """The ``ServeConfig`` of a replica, with its face analyzer (the methods' packs too) and the loader."""
    from ..faces import FaceAnalyzer
    from .core import analyzer_for_methods

    fields = dict(options.config)
    analyzer = FaceAnalyzer.from_pretrained(fields.get("face_models"))
    analyzer = analyzer_for_methods(analyzer, fields.get("methods") or {}, fields.get("face_models"))
    return ServeConfig(
        **fields,
        analyzer=analyzer,
        loader=lambda device, models: loader(device, models, analyzer),
        **more,
    )


# ---------------------------------------------------------------------- the model replicas
class FaceIDModel:
    """A model replica: the single server's ``Service`` with one ``Worker`` on this replica's device, claiming jobs
    from the shared database queue (started in the constructor: the pipeline loads here)."""

    def __init__(self, options: RayOptions, loader: PipelineLoader) -> None:
        from .core import Service

        device = "cuda" if options.gpus else "cpu"
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not in a replica (a direct test of the class)
            replica = "local"
        self.replica = f"{replica}@{socket.gethostname()}:{os.getpid()}"
        config = _service_config(options, loader, devices=(device,), image_extra={"replica": self.replica})
        self.service = Service(config)
        self.service.start()

    def describe(self) -> dict[str, Any]:
        """What this replica serves, for the ingress: its default model set's family and defaults, each method's
        defaults, whether it decodes with a tiny VAE, and its worker's view (``GET /v1/models``)."""
        service = self.service
        pipeline = service.pipeline
        return {
            "replica": self.replica,
            "family": pipeline.family,
            "defaults": service.defaults.to_json(),
            "methods": {name: s.to_json() for name, s in service.method_defaults.items()},
            "tiny_vae": getattr(pipeline, "tiny_vae", None) is not None,
            "worker": service.workers[0].describe(),
        }

    def __del__(self) -> None:  # a replica stopped by Serve: its running batch stops, its jobs are queued again
        service = getattr(self, "service", None)
        if service is not None:
            service.stop(timeout=10)


# ---------------------------------------------------------------------- the ingress side
class RemotePipeline:
    """What the ingress's ``Service`` asks of "its pipeline" (family, defaults, methods), as a replica described
    it."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.family = info["family"]
        self.tiny_vae = True if info["tiny_vae"] else None
        self.methods = dict(info["methods"])

    def resolve_settings(self, settings=None) -> GenerationSettings:
        """The replica's defaults (of a method, for ``GenerationSettings(method=NAME)``), as it resolved them."""
        method = GenerationSettings.parse(settings).method if settings is not None else "faceid"
        if method not in (None, "faceid"):
            return GenerationSettings.parse(self.methods[method])
        return GenerationSettings.parse(self.info["defaults"])


class ReplicaDescription(Worker):
    """The ingress's one worker: it runs no job (``claims_jobs``), it asks a model replica what the replicas
    serve, once at start, so that the ingress checks requests as the single server does."""

    claims_jobs = False

    def __init__(self, service, handle, replicas: int) -> None:
        super().__init__(service, "ray")
        self.handle = handle
        self.replicas = replicas

    def run(self) -> None:
        try:
            self.pipeline = RemotePipeline(self.handle.describe.remote().result(timeout_s=LOAD_TIMEOUT_S))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("could not reach the model replicas: %s", self.load_error)
        self.loaded.set()

    def describe(self) -> dict[str, Any]:
        entry = {"device": self.device, "loaded": self.pipeline is not None, "error": self.load_error}
        if self.pipeline is not None:
            worker = dict(self.pipeline.info["worker"])
            entry.update({k: v for k, v in worker.items() if k not in ("loaded", "error", "device")})
            entry["device"] = f"ray ({self.replicas} {worker['device']} replicas)"
        return entry


LOAD_TIMEOUT_S = 1800.0  # the ingress waits this long for a model replica to load (downloads on first start)


@serve.ingress()
class FaceIDIngress:
    """The FastAPI app of ``create_app``, built on the replica (its ``Service`` holds threads and a database)."""

    def __init__(self, options: RayOptions, loader: PipelineLoader, model) -> None:
        self.options = options
        self.loader = loader
        self.model = model  # the DeploymentHandle of FaceIDModel

    def __serve_build_asgi_app__(self):
        from .app import create_app

        replicas = self.options.replicas
        config = _service_config(
            self.options,
            self.loader,
            worker_factory=lambda service: [ReplicaDescription(service, self.model, replicas)],
        )
        return create_app(config)


def build_application(loader: PipelineLoader, options: RayOptions):
    """The Serve application: ingress + model deployment, laid out by ``options``."""
    model = serve.deployment(
        FaceIDModel,
        name=MODEL_DEPLOYMENT,
        num_replicas=options.replicas,
        ray_actor_options={"num_gpus": 1} if options.gpus else {"num_cpus": 1},
    ).bind(options, loader)
    ingress = serve.deployment(
        FaceIDIngress, name=INGRESS_DEPLOYMENT, num_replicas=options.ingress_replicas, ray_actor_options={"num_cpus": 0}
    )
    # The model deployment is bound as an argument: the ingress gets its DeploymentHandle.
    return ingress.bind(options, loader, model)


def warn_cluster_database(url: str | None, address: str | None) -> None:
    """The replicas of a cluster of several machines share the job state through a database server: SQLite (a file
    in the data dir) serves the processes of one machine only."""
    if address and (url is None or url.startswith("sqlite")):
        logger.warning(
            "--ray %s with SQLite: the replicas share the job state through the database, which SQLite serves on one "
            "machine only; on a cluster of several, give --database-url postgresql://USER@HOST/DATABASE (and a data "
            "dir every node mounts)",
            address,
        )
