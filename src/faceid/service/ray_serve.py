"""``faceid serve --ray``: the same FastAPI app (``create_app``, the same ``Service``) on Ray Serve.

Two deployments make the application:

- ``FaceIDIngress`` (one replica): the FastAPI app as Serve's HTTP ingress. Its ``Service`` holds the database,
  the data dir, the queue and the face analysis (enrollment), as ``faceid serve`` does; its workers are
  ``RemoteWorker`` threads that take one job at a time and hand it to the model deployment.
- ``FaceIDModel`` (one replica per GPU, CPU replicas without GPUs; a fixed ``--replicas`` count or
  autoscaling on ongoing requests): loads the pipeline from model paths (``PipelineLoader``: the pipeline
  object itself is never pickled) and batches the requests that reach it with ``@serve.batch``: compatible
  jobs (same size, steps, guidance, scales, window, models) run as one pipeline call of up to ``max_batch``
  images, each with its own prompts, faces and seeds, as the single-machine worker does (and, as it does, runs
  each job of a call that failed again alone: only the job at fault fails).

Every image's PNG records the replica that made it (``replica`` in its metadata).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from ..errors import FaceIDError
from ..settings import GenerationSettings
from .config import ServeConfig
from .jobs import QueuedJob
from .worker import Worker, _internal

logger = logging.getLogger(__name__)

APP_NAME = "faceid"
MODEL_DEPLOYMENT = "FaceIDModel"
CALL_TIMEOUT_S = 3600.0  # one remote call (a batch on a busy replica); a stopping server does not wait for it


@dataclass(frozen=True)
class PipelineLoader:
    """What a replica loads, as paths and names (picklable): ``loader(device)`` -> a ``FaceIDPipeline``."""

    base_model: str
    adapter: str
    vae: str | None = None
    base_config: str | None = None
    image_encoder: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    dtype: str | None = None  # a torch dtype name: "float16"; None: fp16 on GPU, fp32 on CPU
    face_models: str | None = None

    def __call__(self, device: str):
        import torch

        from ..pipeline import FaceIDPipeline

        return FaceIDPipeline.from_pretrained(
            self.base_model,
            self.adapter,
            vae=self.vae,
            single_file_config=self.base_config,
            device=None if device == "default" else device,
            torch_dtype=getattr(torch, self.dtype) if self.dtype else None,
            face_models=self.face_models,
            image_encoder=self.image_encoder,
            loras=list(self.loras),
            progress=False,
        )


@dataclass
class RayOptions:
    """How the application is laid out on the cluster."""

    replicas: int | None = None  # a fixed count; None: autoscaling from 1 to ``max_replicas``
    max_replicas: int = 1
    gpus: bool = False  # one GPU per model replica
    max_batch: int = 4
    config: dict[str, Any] = field(default_factory=dict)  # ServeConfig fields for the ingress (picklable ones)

    @property
    def dispatchers(self) -> int:
        """Jobs the ingress has in flight at once: enough to fill every replica's batch."""
        return (self.replicas or self.max_replicas) * self.max_batch


# ---------------------------------------------------------------------- the model replicas
class FaceIDModel:
    """One pipeline, loaded in the constructor from ``loader``; ``generate`` batches what reaches it."""

    def __init__(self, loader: PipelineLoader, gpu: bool, max_batch: int) -> None:
        self.device = "cuda" if gpu else "cpu"
        self.pipeline = loader(self.device)
        self.max_batch = max_batch
        self.generate.set_max_batch_size(max_batch)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not in a replica (a direct test of the class)
            replica = "local"
        self.replica = f"{replica}@{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()  # one pipeline call at a time on this replica

    def info(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "family": self.pipeline.family,
            **Worker(None, self.device, self.pipeline).describe(),
        }

    def resolve(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``pipeline.resolve_settings`` (errors as text: they cross the process boundary)."""
        try:
            return {"settings": self.pipeline.resolve_settings(settings).to_json()}
        except FaceIDError as exc:
            return {"error": str(exc)}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``requests``: ``{"settings": resolved settings, one seed per image, "faces": one identity per prompt}``;
        each answer ``{"images": [PIL images], "replica", "batch": jobs in its pipeline call}`` or ``{"error"}``."""
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = [
            QueuedJob(
                id=str(i), owner="", settings=GenerationSettings.parse(r["settings"]), identity_ids=[], created_ns=0
            )
            for i, r in enumerate(requests)
        ]
        answers: list[dict[str, Any]] = [{} for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(i)
        for indices in groups.values():
            chunk: list[int] = []
            for i in indices:  # a job is never split; a chunk holds up to max_batch images (the first always)
                if chunk and sum(jobs[k].images for k in chunk) + jobs[i].images > self.max_batch:
                    self._call(jobs, requests, chunk, answers)
                    chunk = []
                chunk.append(i)
            self._call(jobs, requests, chunk, answers)
        return answers

    def _call(self, jobs: list[QueuedJob], requests: list[dict], chunk: list[int], answers: list[dict]) -> None:
        first = jobs[chunk[0]].settings
        settings = first.replace(
            prompt=[p for i in chunk for p in jobs[i].prompts],
            negative_prompt=[p for i in chunk for p in jobs[i].negative_prompts],
            seed=[s for i in chunk for s in jobs[i].settings.seed],
        )
        faces = [identity for i in chunk for identity in requests[i]["faces"]]
        try:
            with self._lock:
                images = iter(self.pipeline(face=faces, settings=settings).images)
        except Exception as exc:
            if len(chunk) > 1:  # whatever failed, only the job at fault fails: each runs again alone
                logger.warning("a batch of %d jobs failed (%s: %s); running each alone", len(chunk),
                               type(exc).__name__, exc)  # fmt: skip
                for i in chunk:
                    self._call(jobs, requests, [i], answers)
                return
            if not isinstance(exc, FaceIDError):
                logger.error("generation failed: %s", traceback.format_exc())
            for i in chunk:
                answers[i] = {"error": str(exc) if isinstance(exc, FaceIDError) else _internal(exc)}
            return
        for i in chunk:
            answers[i] = {
                "images": [next(images) for _ in range(jobs[i].images)],
                "replica": self.replica,
                "batch": len(chunk),
            }


# ---------------------------------------------------------------------- the ingress side
class RemotePipeline:
    """What the ingress's ``Service`` asks of "its pipeline" (family, settings resolution), answered by a replica."""

    def __init__(self, handle, info: dict[str, Any]) -> None:
        self.handle = handle
        self.info = info
        self.family = info["family"]

    def resolve_settings(self, settings=None) -> GenerationSettings:
        answer = self.handle.resolve.remote(GenerationSettings.parse(settings).to_json()).result()
        if "error" in answer:
            raise FaceIDError(answer["error"])
        return GenerationSettings.parse(answer["settings"])


class RemoteWorker(Worker):
    """A thread of the ingress: takes one job at a time and runs it on the model deployment (whose replicas
    batch the jobs that reach them together). Progress is not streamed: a job's events are queued, then done."""

    runs_modes = False  # text-to-image only: the replicas get no uploads (the service refuses other modes, 422)

    def __init__(self, service, name: str, handle) -> None:
        super().__init__(service, name)
        self.handle = handle

    def load(self) -> None:
        try:
            self.pipeline = RemotePipeline(self.handle, self.handle.info.remote().result())
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("could not reach the model replicas: %s", self.load_error)
        self.loaded.set()

    def describe(self) -> dict[str, Any]:
        entry = {"device": self.device, "loaded": self.pipeline is not None, "error": self.load_error}
        if self.pipeline is not None:
            entry.update({k: v for k, v in self.pipeline.info.items() if k not in ("loaded", "error", "replica")})
            entry["device"] = f"ray ({entry['device']} replicas)"
        return entry

    def take(self) -> list[QueuedJob]:
        return self.service.queue.take(0)  # one job: batching happens on the replicas

    def run_batch(self, batch: list[QueuedJob]) -> None:
        for job in batch:
            try:
                self.run_job(job)
            except Exception as exc:
                logger.error("generation failed: %s", traceback.format_exc())
                if job.status in ("queued", "running") and not self.service.queue.stopped:
                    self.service.finish(job, "failed", error=_internal(exc))

    def run_job(self, job: QueuedJob) -> None:
        service = self.service
        faces = service.identity_faces(job)
        if isinstance(faces, str):
            service.finish(job, "failed", error=faces)
            return
        started = time.time()
        service.mark_running(job, started)
        job.step, job.total = 0, job.settings.num_inference_steps
        answer = self.handle.generate.remote({"settings": job.settings.to_json(), "faces": faces}).result(
            timeout_s=CALL_TIMEOUT_S
        )
        if service.queue.stopped:  # the server stops: the job stays running in the database, queued at next start
            return
        if "error" in answer:
            service.finish(job, "failed", error=answer["error"])
        elif job.cancel.is_set():
            service.finish(job, "cancelled")
        else:
            job.step = job.total
            service.save_images(job, answer["images"], extra={"replica": answer["replica"]})
        service.queue.record_seconds(time.time() - started)

    def join(self, timeout: float | None = None) -> None:
        super().join(None if timeout is None else min(timeout, 5.0))  # a running remote call is not waited for


@serve.ingress()
class FaceIDIngress:
    """The FastAPI app of ``create_app``, built on the replica (its ``Service`` holds threads and a database)."""

    def __init__(self, options: RayOptions, model) -> None:
        self.options = options
        self.model = model  # the DeploymentHandle of FaceIDModel

    def __serve_build_asgi_app__(self):
        from ..faces import FaceAnalyzer
        from .app import create_app

        options = dict(self.options.config)
        face_models = options.pop("face_models", None)
        dispatchers = self.options.dispatchers
        config = ServeConfig(
            **options,
            max_batch=self.options.max_batch,
            loader=_no_local_models,
            analyzer=FaceAnalyzer.from_pretrained(face_models),
            worker_factory=lambda service: [RemoteWorker(service, f"ray-{i}", self.model) for i in range(dispatchers)],
        )
        return create_app(config)


def _no_local_models(device: str):
    raise FaceIDError("the ingress loads no models: the model replicas do")


def build_application(loader: PipelineLoader, options: RayOptions):
    """The Serve application: ingress + model deployment, laid out by ``options``."""
    model_options: dict[str, Any] = {
        "name": MODEL_DEPLOYMENT,
        "ray_actor_options": {"num_gpus": 1} if options.gpus else {"num_cpus": 1},
        "max_ongoing_requests": 2 * options.max_batch,
    }
    if options.replicas is not None:
        model_options["num_replicas"] = options.replicas
    else:  # scale on the requests each replica has in flight: a full batch each
        model_options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.max_batch,
        }
    model = serve.deployment(FaceIDModel, **model_options).bind(loader, options.gpus, options.max_batch)
    ingress = serve.deployment(FaceIDIngress, name="FaceIDIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
    # The model deployment is bound as an argument: the ingress gets its DeploymentHandle.
    return ingress.bind(options, model)
