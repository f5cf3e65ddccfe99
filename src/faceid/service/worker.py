"""One generation thread per device: loads the default model set at start, takes batches of compatible jobs
from the queue and runs each batch as one pipeline call, loading the batch's model set first when it is not
loaded (and evicting the least recently used ones beyond the memory budget: ``models.LoadedModels``).

Jobs in a batch share the UNet batch (same model, size, steps, guidance, window...) but keep their own
prompts, faces and seeds: the pipeline pairs prompt i with face i and gives image i its own seed, so a job
gets the images it would get alone. When a batch's call fails, each of its jobs runs again alone: only the job
at fault fails (one prompt the text encoder cannot take, a batch too large for the device's memory...).
Progress is reported at every step (``callback_on_step_end``); with ``ServeConfig.preview_every``, each job also
gets a ``preview`` event of its own images (the pipeline's ``on_preview``, split by job); a cancelled job is
dropped at its next step, and the call stops when every job in it is cancelled.

Every model a job may need beyond the model set is loaded with it, never inside a job (``Worker.equip``): the
server's few-step LoRAs (``--fast``), identity methods (``--method-weights``, on the model sets of their families),
ControlNets (those of the set's family) and style adapters onto each model set as it loads (kept with it,
counted in the memory budget: ``Loaded.attached``), and the control kinds' annotators (OpenPose, depth) once per
worker at start (counted as ``LoadedModels.reserved``). A request can only name what was loaded
(``capabilities.Capabilities.check``), so no request value starts a download.

Input images (img2img, inpainting, ControlNet: ``faceid.service.inputs``) are read from the uploads when the batch
runs (its jobs share them: they are in the batch key); each ControlNet is the server's one of its control kind for the model set's family, and
its control image is made from the upload at the output's size. A swap job runs alone: one inpainting call per
image. Several people in one picture go to the call as ``face`` with ``regions`` (their mask uploads, or the columns
a photo's faces give); style references as ``style``, each read by the server's style adapter of its name.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Protocol

from ..errors import FaceIDError, MissingWeightsError
from ..settings import GenerationSettings
from .config import ServeConfig
from .inputs import ControlSpec, JobInputs, RegionsPhoto, StyleSpec, SwapSpec
from .jobs import JobQueue, QueuedJob
from .models import GB, Loaded, LoadedModels, ModelEntry, default_budget, modules_bytes

logger = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # px, the longer side of a preview image in an event (JPEG): enough for a progress view


class _Stop(Exception):
    """Raised from the step callback: every job in the batch was cancelled, or the server stops."""


class JobHost(Protocol):
    """What a worker needs from the service (``faceid.service.core.Service``): the queue, and the job's
    lifecycle in the database and its events."""

    config: ServeConfig
    queue: JobQueue
    analyzer: Any  # the face analyzer, one analysis at a time (``enroll.SerialAnalyzer``)

    def identity_faces(self, job: QueuedJob) -> list[list] | str: ...
    def update_settings(self, job: QueuedJob, settings: GenerationSettings) -> None: ...
    def mark_running(self, job: QueuedJob, started: float) -> None: ...
    def finish(self, job: QueuedJob, status: str, error: str | None = None) -> None: ...
    def save_images(
        self, job: QueuedJob, images: list, extra: dict | None = None, control_images: list = ()
    ) -> None: ...
    def upload_image(self, upload_id: str, owner: str, field: str) -> Any: ...
    def requeue_later(self, job: QueuedJob) -> None: ...
    def queued_job(self, row: Any) -> QueuedJob: ...
    def cancelled(self, jobs: list[QueuedJob]) -> set[str]: ...
    def step_done(self, jobs: list[QueuedJob], step: int, total: int) -> set[str]: ...
    def preview(self, job: QueuedJob, data: dict) -> None: ...

    @property
    def worker_id(self) -> str: ...


class Worker(threading.Thread):
    claims_jobs = True  # takes jobs from the queue (a Ray ingress's worker only describes the model replicas)

    def __init__(self, service: JobHost | None, device: str, pipeline: Any = None) -> None:
        super().__init__(name=f"faceid-worker-{device}", daemon=True)
        self.service = service
        self.device = device
        self._pipeline = pipeline  # the default model set's, until ``adopt`` files it under its catalog entry
        self.models: LoadedModels | None = None  # set by ``adopt``
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self._annotators: dict[str, dict[str, Any]] = {}  # control kind -> its models (OpenPose, depth), at start
        self._attached: dict[str, Any] = {}  # what ``equip`` loaded onto the default pipeline, until ``adopt``

    @property
    def pipeline(self) -> Any:
        """The pipeline this worker used last (None before it loaded one)."""
        newest = self.models.newest() if self.models is not None else None
        return newest if newest is not None else self._pipeline

    @pipeline.setter
    def pipeline(self, value: Any) -> None:
        self._pipeline = value

    def load(self) -> None:
        """The default model set's pipeline, once, with what the server runs with it (``equip``) and the control
        kinds' annotators (in this thread when started by ``run``). What cannot load is an error at start."""
        try:
            if self._pipeline is None:
                config = self.service.config
                default = config.catalog[0] if config.catalog else GenerationSettings()
                self._pipeline = config.loader(self.device, default)
            self._attached = self.equip(self._pipeline)
            self._load_annotators(self._pipeline)
        except Exception as exc:  # reported by /health and the start-up
            self._pipeline = None
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("could not load the models on %s: %s", self.device, self.load_error)
        self.loaded.set()

    def equip(self, pipeline: Any) -> dict[str, Any]:
        """Load onto ``pipeline`` (a model set just loaded) what the server runs with it: its few-step LoRAs
        (``ServeConfig.fast``) and, on workers that run modes, its ControlNets (of its family) and style adapters. Returns the models
        attached (``Loaded.attached``: ControlNets by source, style adapters by ``style adapter NAME``)."""
        from ..fast import PRESETS

        config = self.service.config
        for name, source in config.fast.items():
            if pipeline.family in PRESETS[name].loras:  # (requests for it on other families are refused at submit)
                self._load_fast(pipeline, name, source)
        attached: dict[str, Any] = {}
        for name, source in config.methods.items():  # identity methods, on the model sets of their families
            modules = self._load_method(pipeline, name, source)
            if modules:
                attached[f"method {name}"] = modules
        for source in dict.fromkeys(self._controlnet_sources(pipeline.family).values()):
            attached[source] = pipeline.load_controlnet(source)  # (of its family only, by the config read at start)
        if pipeline.adapter is None:  # FLUX.1: the server's style adapters are FaceID's, not for it
            return attached  # (requests for them there are refused at submit)
        for name in config.style_adapters:
            attached[f"style adapter {name}"] = self._load_style(pipeline, name)
        return attached

    def _controlnet_sources(self, family: str) -> dict[str, str]:
        """The server's ControlNet of each control kind made for ``family`` (``ServeConfig.controlnets``): kind ->
        source. Kinds without one for it are refused at submit for model sets of that family."""
        controlnets = self.service.config.controlnets
        return {kind: nets[family] for kind, nets in controlnets.items() if family in nets}

    def _load_method(self, pipeline: Any, name: str, source: str) -> list:
        """Identity method ``name`` (``ServeConfig.methods``) onto ``pipeline`` when it runs on its family (a model
        set of another family does not get it: requests for it there are refused at submit); its modules, for the
        memory budget."""
        import torch

        from ..methods import METHODS

        if pipeline.family not in METHODS[name].families:
            return []
        if name not in pipeline.methods:  # (a ready pipeline given to the server may have it already)
            pipeline.load_method(name, source, face_models=self.service.config.face_models)
        loaded = pipeline.loaded_method(name)
        found = []
        for value in vars(loaded).values():  # its own modules (the UNet it sits on is the model set's)
            values = value.values() if isinstance(value, dict) else [value]
            found += [v for v in values if isinstance(v, torch.nn.Module) and v is not getattr(loaded, "unet", None)]
        return found

    @staticmethod
    def _load_fast(pipeline: Any, name: str, source: str | None) -> None:
        try:
            pipeline.load_fast_lora(name, source)
        except MissingWeightsError as exc:
            from ..fast import PRESETS

            file = PRESETS[name].lora(pipeline.family)
            raise MissingWeightsError(
                f"--fast {name}: its LoRA ({file.repo}, {file.path_in_repo}) is not in the Hub cache and could not be "
                f"fetched ({str(exc).split('. Or load')[0]}); fetch it once online, or start the server with --fast "
                f"{name}=FILE, FILE a local copy"
            ) from exc

    def _load_annotators(self, pipeline: Any) -> None:
        """The annotators of the server's control kinds (OpenPose for pose, the depth model for depth), once."""
        from ..control import annotator_options

        for kind in self.service.config.controlnets:  # {} for the kinds that need none
            if kind not in self._annotators:
                self._annotators[kind] = annotator_options(kind, device=str(pipeline.device))

    def _annotator_bytes(self) -> int:
        import torch

        modules = []
        for options in self._annotators.values():
            for model in options.values():
                model = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
                if isinstance(model, torch.nn.Module):
                    modules.append(model)
        return modules_bytes(modules)

    def adopt(self, entry: ModelEntry, defaults: GenerationSettings) -> None:
        """File the pipeline loaded at start under the catalog's default ``entry`` (called by the service once it
        knows the entry, before any job runs); from now on model sets come and go within the memory budget."""
        gb = self.service.config.model_memory_gb
        budget = round(gb * GB) if gb else default_budget(self._pipeline.device)
        self.models = LoadedModels(budget, reserved=self._annotator_bytes())
        self.models.add(entry, self._pipeline, defaults, self._attached)
        self._pipeline, self._attached = None, {}

    def _load(self, entry: ModelEntry) -> tuple[Any, GenerationSettings, dict[str, Any]]:
        """Load ``entry`` here, in the worker thread, with what the server runs with it (``equip``), and take its
        defaults before any call runs on it."""
        if self.service.config.loader is None:
            raise FaceIDError(f"this server has no loader for model set {entry.label()}")
        logger.info("loading model set %s on %s", entry.label(), self.device)
        pipeline = self.service.config.loader(self.device, entry.models)
        if pipeline.family != entry.family:
            raise FaceIDError(f"model set {entry.label()} loaded as a {pipeline.family} pipeline")
        attached = self.equip(pipeline)
        return pipeline, pipeline.resolve_settings(GenerationSettings()), attached

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this worker: the pipeline it used last, and what it holds."""
        pipe = self.pipeline
        entry = {"device": self.device, "loaded": pipe is not None, "error": self.load_error}
        if self.models is not None:
            entry.update(self.models.describe())
        if pipe is not None:
            entry.update(
                device=str(pipe.device),
                dtype=str(pipe.denoiser.dtype).removeprefix("torch."),
                family=pipe.family,
                base_model=pipe.base_model,
                adapter=pipe.adapter_source,
                vae=pipe.vae_source,
                variant=pipe.adapter.spec.architecture().name if pipe.adapter is not None else None,
                default_method=pipe.default_method,
                offload=pipe.offload,
                quantize=pipe.quantize,
                loras=pipe.lora_sources(),
            )
        return entry

    def run(self) -> None:
        self.load()
        if self.pipeline is None:
            return
        queue = self.service.queue
        while not queue.stopped:
            batch = self.take()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as exc:  # a broken file, a full disk...: the jobs fail, the worker goes on
                logger.error("generation batch failed: %s", traceback.format_exc())
                for job in batch:
                    if job.status in ("queued", "running"):
                        self.service.finish(job, "failed", error=_internal(exc))

    def take(self) -> list[QueuedJob]:
        """The next batch, claimed in the database for this process: compatible jobs up to the batch size, those whose
        models are loaded first."""
        service = self.service
        return service.queue.take(service.worker_id, service.config.max_batch, service.queued_job, ready=self._holds)

    def _holds(self, job: QueuedJob) -> bool:
        return self.models is not None and self.models.holds(job.entry)

    # ------------------------------------------------------------------ one batch
    def run_batch(self, batch: list[QueuedJob]) -> None:
        service = self.service
        try:  # the batch's models (one entry: its jobs share the batch key, which holds the model fields)
            loaded = self.models.get(batch[0].entry, lambda: self._load(batch[0].entry))
        except Exception as exc:
            logger.error("could not load a model set on %s: %s", self.device, traceback.format_exc())
            for job in batch:
                service.finish(job, "failed", error=str(exc) if isinstance(exc, FaceIDError) else _internal(exc))
            return
        pipeline = loaded.pipeline
        for job in batch:  # what the request left to the loaded models' defaults (the adapter's scale...)
            defaults = loaded.defaults
            if job.settings.method != "faceid":  # another method's are its own (they read no call's state)
                defaults = pipeline.resolve_settings(GenerationSettings(method=job.settings.method))
            resolved = job.settings.resolve(pipeline.family, **defaults.model_dump(exclude_none=True))
            if resolved != job.settings:
                service.update_settings(job, resolved)
        started = time.time()
        live: list[tuple[QueuedJob, list]] = []
        for job in batch:
            try:
                faces = service.identity_faces(job)
            except Exception as exc:  # an unreadable file of its identity: this job fails, not its batch
                logger.error("could not read the identity of job %s: %s", job.id, traceback.format_exc())
                service.finish(job, "failed", error=_internal(exc))
                continue
            if isinstance(faces, str):  # the identity is gone
                service.finish(job, "failed", error=faces)
            else:
                service.mark_running(job, started)
                live.append((job, faces))
        if not live:
            return
        first = live[0][0]
        prompts = [p for job, _ in live for p in job.prompts]
        negatives = [p for job, _ in live for p in job.negative_prompts]
        inputs = JobInputs.parse(first.inputs)
        if inputs.people is not None:  # the same people in every picture of the batch (its batch key)
            faces = live[0][1]
        else:  # one person per prompt, in the batch's prompt order
            faces = [identity for _, identities in live for identity in identities]
        seeds = [s for job, _ in live for s in job.settings.seed]
        total = first.settings.num_inference_steps
        active = [job for job, _ in live]

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            # a cancel may come through any process: its flag is in the database, read with the step's progress
            cancelled = service.step_done(active, step + 1, total)
            for job in list(active):
                if job.id in cancelled:
                    active.remove(job)
                    service.finish(job, "cancelled")
            if not active or service.queue.stopped:
                raise _Stop()
            return callback_kwargs

        def on_preview(step, total, images):
            """The batch's previews, each job its own: ``image_index`` says which of its images they are (a batch
            run in parts previews one part at a time: the other parts' places are None)."""
            from ..previews import data_url  # here: the service's modules load without torch (a Ray ingress)

            start = 0
            for job, _ in live:
                mine = images[start : start + job.images]
                start += job.images
                shown = [i for i, image in enumerate(mine) if image is not None]
                if job in active and shown:
                    urls = [data_url(mine[i], PREVIEW_SIDE) for i in shown]
                    service.preview(job, {"step": step, "total": total, "images": urls, "image_index": shown})

        every = service.config.preview_every
        previews = {"preview_every": every, "on_preview": on_preview} if every else {}
        settings = first.settings.replace(prompt=prompts, negative_prompt=negatives, seed=seeds)
        extra, control_images = None, []
        try:
            if inputs.swap is not None:  # alone in its batch (its batch key)
                images, extra = self._swap(first, live[0][1][0], inputs.swap, pipeline, on_step_end)
            else:
                modes = self._mode_arguments(first, inputs, loaded)
                result = pipeline(face=faces, settings=settings, callback_on_step_end=on_step_end, **previews, **modes)
                images, control_images = result.images, result.control_images
                if inputs.regions is not None or inputs.style:  # what the library made of them, for every job
                    recorded = result.settings.model_dump(include={"regions", "style"})
                    for job, _ in live:
                        service.update_settings(job, job.settings.replace(**recorded))
        except _Stop:
            if service.queue.stopped:  # the server stops: the jobs wait for the next start
                for job in active:
                    service.requeue_later(job)
            return
        except Exception as exc:
            if len(active) > 1:  # whatever failed, only the job at fault fails: each runs again alone
                logger.warning("a batch of %d jobs failed (%s: %s); running each alone", len(active),
                               type(exc).__name__, exc)  # fmt: skip
                cancelled = service.cancelled(active)
                for job in list(active):
                    if job.id in cancelled:
                        service.finish(job, "cancelled")
                    elif not service.queue.stopped:
                        self.run_batch([job])
                    else:
                        service.requeue_later(job)
                return
            if isinstance(exc, FaceIDError):
                error = str(exc)
            else:
                logger.error("generation failed: %s", traceback.format_exc())
                error = _internal(exc)
            for job in active:
                service.finish(job, "failed", error=error)
            return
        images = iter(images)
        cancelled = service.cancelled(active)
        for job, _ in live:
            mine = [next(images) for _ in range(job.images)]
            if job in active and job.id not in cancelled:
                service.save_images(job, mine, extra=extra, control_images=control_images)
            elif job in active:
                service.finish(job, "cancelled")
        service.queue.record_seconds((time.time() - started) / max(1, len(live)))

    # ------------------------------------------------------------------ input images
    def _mode_arguments(self, job: QueuedJob, inputs: JobInputs, loaded: Loaded) -> dict[str, Any]:
        """The pipeline's arguments for ``job``'s input images: its uploads, and for each ControlNet the control
        image made from its upload at the output's size, read by the server's ControlNet of that kind."""
        from ..modes import ControlInput

        service = self.service
        arguments = {
            name: service.upload_image(upload_id, job.owner, name)
            for name in ("init_image", "mask_image", "kps")
            if (upload_id := getattr(inputs, name)) is not None
        }
        controls = [self._control(job, k, spec, loaded) for k, spec in enumerate(inputs.controls or ())]
        if controls:
            arguments["control"] = [ControlInput(image, net, spec.scale, spec.window) for spec, image, net in controls]
        if inputs.regions is not None:
            arguments["regions"] = self._regions(job, inputs)
        if inputs.style:
            arguments["style"] = [self._reference(job, k, spec, loaded) for k, spec in enumerate(inputs.style)]
        return arguments

    def _regions(self, job: QueuedJob, inputs: JobInputs) -> Any:
        """The pipeline's ``regions`` for ``job``'s people: ``"auto"``, boxes, mask images, or the columns its photo's
        faces give (found by the service's analyzer, one analysis at a time, as the kps control images are)."""
        from ..groups import columns_from_faces

        service, regions = self.service, inputs.regions
        if isinstance(regions, RegionsPhoto):
            photo = service.upload_image(regions.photo, job.owner, "regions.photo")
            faces = service.analyzer.analyze(photo)
            return columns_from_faces([f.box for f in faces], photo.width, len(inputs.people), photo.filename)
        if isinstance(regions, list):
            return [
                service.upload_image(r, job.owner, f"regions[{k}]") if isinstance(r, str) else r
                for k, r in enumerate(regions)
            ]
        return regions

    def _reference(self, job: QueuedJob, k: int, spec: StyleSpec, loaded: Loaded) -> Any:
        """Style reference ``k`` of ``job``: its upload read by the server's style adapter of that name (loaded with
        the batch's pipeline)."""
        from ..groups import Reference

        service = self.service
        if f"style adapter {spec.adapter}" not in loaded.attached:  # the server restarted without it while it waited
            raise FaceIDError(
                f"style[{k}]: this server no longer has a style adapter named {spec.adapter!r}; submit the generation "
                "again with a name GET /v1/models lists"
            )
        region = spec.region
        if isinstance(region, str):
            region = service.upload_image(region, job.owner, f"style[{k}].region")
        image = service.upload_image(spec.image, job.owner, f"style[{k}].image")
        return Reference(image, spec.scale, adapter=spec.adapter, window=spec.window, region=region)

    def _load_style(self, pipeline: Any, name: str) -> list:
        """Load the style adapter ``name`` onto ``pipeline`` (once: a pipeline given to the server may have it from
        an earlier start); the modules it adds (for the memory budget): its projection and attention branches, and
        the CLIP image encoder that reads its images."""
        config = self.service.config
        if name not in pipeline.references:
            # The model set's own CLIP image encoder (FaceID-Plus) reads references too; else the configured one.
            encoder = config.reference_encoder if pipeline.reference_encoder is None else None
            pipeline.load_reference(config.style_adapters[name], name=name, image_encoder=encoder)
        adapter = pipeline.references[name]
        added = [adapter.projection, *adapter.branches.values()]
        if pipeline.reference_encoder is not None:
            added.append(pipeline.reference_encoder.model)
        return added

    def _control(self, job: QueuedJob, k: int, spec: ControlSpec, loaded: Loaded) -> tuple[ControlSpec, Any, Any]:
        """(spec, control image, ControlNet) of ControlNet ``k`` of ``job``."""
        from ..control import make_control_image

        service = self.service
        source = self._controlnet_sources(loaded.pipeline.family).get(spec.kind)
        if source is None or source not in loaded.attached:  # the server restarted without it while the job waited
            raise FaceIDError(
                f"controls[{k}]: this server no longer has a {loaded.pipeline.family} ControlNet for {spec.kind!r}; "
                "submit the generation again with a kind GET /v1/models lists for the model set"
            )
        controlnet = loaded.attached[source]
        field = f"controls[{k}].image"
        image = make_control_image(
            spec.kind,
            service.upload_image(spec.image, job.owner, field),
            size=(job.settings.width, job.settings.height),
            analyzer=service.analyzer,
            face_index=spec.face_index,
            **self._annotators[spec.kind],
        )
        return spec, image, controlnet

    def _swap(self, job: QueuedJob, person: list, spec: SwapSpec, pipeline: Any, on_step_end) -> tuple[list, dict]:
        """A swap job's images, each an inpainting of the crop around the target's face (its seed), pasted back into
        the target; and what to record with them. The job's width and height become the crop's generation size."""
        from ..swap import load_target, pipeline_inpaint, swap_face

        mask = self.service.upload_image(spec.mask, job.owner, "swap.mask") if spec.mask is not None else None
        target = load_target(
            self.service.upload_image(spec.target, job.owner, "swap.target"),
            analyzer=self.service.analyzer,
            face_index=spec.face_index,
            mask=mask.convert("L") if mask is not None else None,
        )
        results = []
        for index in range(len(job.settings.seed)):
            one = job.settings.for_image(index)  # its own seed, one image
            inpaint = pipeline_inpaint(pipeline, one, person, callback_on_step_end=on_step_end)
            results.append(swap_face(target, inpaint, resolution=spec.resolution))
        plan = results[0].plan  # the same for every seed: it depends on the target and the resolution only
        self.service.update_settings(job, job.settings.replace(width=plan.size[0], height=plan.size[1]))
        return [r.image for r in results], {"crop_box": list(plan.box), "target_size": list(target.image.size)}


def _internal(exc: Exception) -> str:
    return f"internal error ({type(exc).__name__}: {exc}); see the server log"
