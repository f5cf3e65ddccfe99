"""``Service``: what the server does, without HTTP. The FastAPI routes (``app.py``), a web page or a Ray
Serve deployment call these methods; they hold the database, the data dir, the queue and the workers.

Errors a client can cause are ``FaceIDError`` subclasses that say what to do; ``app.py`` maps them to
HTTP statuses (``NotFound`` 404, ``LimitExceeded`` 413/422, ``QueueFull`` 429, the others 4xx).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
from typing import Any

import numpy as np

from .. import __version__
from ..errors import FaceIDError
from ..modes import DEFAULT_STRENGTH, size_from_image
from ..results import save_images
from ..settings import FAMILY_DEFAULTS, MODEL_FIELDS, GenerationSettings
from .capabilities import Capabilities, NotServed, describe_methods
from .config import ServeConfig
from .enroll import Enroller, decode_upload
from .errors import Conflict, LimitExceeded, NotFound
from .files import DataDir, is_id, new_id
from .inputs import MAX_CONTROLS, JobInputs, RegionsPhoto
from .jobs import JobQueue, QueuedJob, QueueFull
from .metrics import Metrics
from .models import Catalog, ModelEntry
from .policy import Policy, readable_view, swap_resolution, upload_too_large, within_limits
from .store import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, ImageRow, Job, Store, Upload, face_recognizers
from .worker import Worker

logger = logging.getLogger(__name__)

CURSOR = re.compile(r"^(\d{1,20})-([0-9a-f]{32})$")  # a page's next_cursor: created_ns-id of its last generation


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.data = DataDir(config.data_dir)
        self.store = Store(config.database)
        analyzer = config.analyzer
        if analyzer is None and config.pipeline is not None:
            analyzer = config.pipeline.face_analyzer
        if analyzer is None:
            raise FaceIDError("give the server a face analyzer (ServeConfig.analyzer)")
        analyzer = analyzer_for_methods(analyzer, config.methods, config.face_models)
        self.enroller = Enroller(analyzer, self.data, self.store, config.max_pixels, config.small_face)
        self.analyzer = self.enroller.analyzer  # one analysis at a time: kps control images and swap targets too
        devices = ("default",) if config.pipeline is not None else config.devices
        self.queue = JobQueue(self.store, config.max_queue, workers=len(devices))
        # This process, as the database knows it: the jobs its workers claim carry it, its heartbeat says it lives
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        self._heartbeat: threading.Thread | None = None
        if config.worker_factory is not None:
            self.workers = list(config.worker_factory(self))
            self.queue.workers = len(self.workers)
        else:
            self.workers = [Worker(self, device, config.pipeline) for device in devices]
        self.metrics = Metrics(self.queue)
        self.policy = Policy(config, self.store, self.data, self.queue, self.metrics)  # quotas, text checks
        # The other model sets, described from their configuration (the default one is told by its pipeline).
        self.extra_models = [ModelEntry.configured(i, spec) for i, spec in enumerate(config.catalog[1:], 1)]
        self.transcriber = config.transcriber  # speech to text, or None (loaded by start() from speech_model)
        self.catalog: Catalog | None = None  # set by start()
        self.defaults: GenerationSettings | None = None  # set by start()
        self.capabilities: Capabilities | None = None  # set by start(): what requests may ask for
        # The default model set's defaults for each other identity method it runs (the method's own: InstantID's
        # scales), taken with ``defaults`` at start
        self.method_defaults: dict[str, GenerationSettings] = {}
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Load the default models (each worker in its thread), re-queue what a previous run left, start
        generating."""
        self.queue.set_paused(True)
        if self.transcriber is None and self.config.speech_model is not None:
            from ..speech import Transcriber

            source = None if self.config.speech_model == "default" else self.config.speech_model
            self.transcriber = Transcriber.from_pretrained(source)
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            worker.loaded.wait()
        errors = [w.load_error for w in self.workers if w.load_error]
        if errors and len(errors) == len(self.workers):
            raise FaceIDError(f"no worker could load the models: {errors[0]}")
        # The defaults a request gets, taken while no job runs: during a call the adapter's scale is the
        # call's, so the pipeline's own defaults are read once, here, not while a worker generates.
        self.defaults = self.pipeline.resolve_settings(GenerationSettings())
        default = ModelEntry.of(0, self.pipeline.family, self.defaults)
        tiny_vae = getattr(self.pipeline, "tiny_vae", None) is not None  # every model set is loaded alike
        self.capabilities = Capabilities.of(self.config, tiny_vae=tiny_vae)
        self.catalog = Catalog([default, *self.extra_models])
        self.method_defaults = {
            name: self.pipeline.resolve_settings(GenerationSettings(method=name))
            for name in self.config.methods
            if name in getattr(self.pipeline, "methods", {})
        }
        try:
            self._check_fast_families()
            self._check_controlnet_families()
            self._check_method_families()
        except FaceIDError:
            self.queue.stop()  # the workers end: this server does not start
            raise
        if self.config.worker_factory is None:
            for worker in self.workers:
                if worker.pipeline is not None:
                    worker.adopt(default, self.defaults)
        self.recover()
        if self._claims_jobs:
            self._heartbeat = threading.Thread(target=self._beat, name="faceid-heartbeat", daemon=True)
            self._heartbeat.start()
        self.queue.set_paused(not self.config.start_workers)

    def _beat(self) -> None:
        """This process's heartbeat, every lease/5 seconds, and the jobs of processes that are gone queued again."""
        every = self.config.lease_seconds / 5
        while not self._stopping.wait(every):
            try:
                self.store.beat(self.worker_id, socket.gethostname(), os.getpid())
                self.requeue_orphans()
            except Exception:  # the database is away for a moment: the next beat tries again
                logger.exception("heartbeat failed")

    def _check_fast_families(self) -> None:
        """Every ``--fast`` preset exists for a family this server serves (SDXL-Lightning: SDXL only)."""
        from ..fast import PRESETS

        families = {entry.family for entry in self.catalog.entries}
        for name in self.config.fast:
            if not families & set(PRESETS[name].loras):
                raise FaceIDError(
                    f"--fast {name} ({PRESETS[name].title}) exists for {', '.join(PRESETS[name].loras)} only, and this "
                    f"server serves {', '.join(sorted(families))}: leave it out"
                )

    def _check_controlnet_families(self) -> None:
        """Every ``--controlnet`` is made for a family this server serves (each model set loads its own family's:
        one for no model set would never run)."""
        families = {entry.family for entry in self.catalog.entries}
        for kind, nets in self.config.controlnets.items():
            for family, source in nets.items():
                if family not in families:
                    raise FaceIDError(
                        f"--controlnet {kind}={source} is a {family} ControlNet, and this server serves "
                        f"{', '.join(sorted(families))} model sets: leave it out, give one made for those, or add a "
                        f"{family} model set (--also-model)"
                    )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the workers; a running batch stops at its next step and its jobs stay queued for the next start."""
        self.queue.stop()
        self._stopping.set()
        for worker in self.workers:
            if worker.is_alive():
                worker.join(timeout)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout)
            try:
                self.store.remove_worker(self.worker_id)  # its jobs were put back: none is left with it
            except Exception:
                logger.exception("could not remove this worker process from the database")
        self.store.close()

    def recover(self) -> None:
        """At start: every job a process that is gone left running is queued again (in its order; the others' are
        theirs), and a queued job that can no longer run fails, saying why: its identity was deleted meanwhile, or
        its record no longer reads. None is lost; several processes may start at once."""
        if self._claims_jobs:  # this process runs jobs: it is alive from now on
            self.store.beat(self.worker_id, socket.gethostname(), os.getpid())
        self.requeue_orphans()
        for row in self.store.unfinished_jobs():
            if row.status != QUEUED:
                continue
            try:
                missing = [i for i in row.identity_ids if not self.store.identity_exists(i, row.owner)]
            except Exception as exc:  # a record that no longer reads (``policy.readable_view`` shows it failed)
                self._fail_queued(row, f"its stored record cannot be read ({type(exc).__name__})")
                continue
            if missing:
                self._fail_queued(
                    row,
                    f"identity {missing[0]} was deleted before this job could run (the server restarted "
                    "meanwhile); enroll the person again and submit the job again",
                )

    def _fail_queued(self, row: Job, error: str) -> None:
        if self.store.finish_job(row.id, FAILED, error=error, unfinished_only=True, event=_end(FAILED, error)):
            logger.warning("job %s failed on restart: %s", row.id, error)

    def requeue_orphans(self) -> None:
        """Queue again every running job whose worker process is gone: no heartbeat for ``lease_seconds``, none
        registered (it stopped), or on this host with its process ended."""
        now, host = time.time(), socket.gethostname()
        for row, process in self.store.running_jobs():
            if process is not None and now - process.heartbeat < self.config.lease_seconds:
                if process.host != host or _process_alive(process.pid):
                    continue
            if self.store.requeue(row.id, row.worker):
                logger.warning("job %s (running on %s, which is gone) is queued again", row.id, row.worker)

    def _check_method_families(self) -> None:
        """Every ``--method-weights`` method runs on a model set this server serves (InstantID: an SDXL one)."""
        from ..methods import METHODS

        families = {entry.family for entry in self.catalog.entries}
        for name in self.config.methods:
            method = METHODS[name]
            if not families & set(method.families):
                raise FaceIDError(
                    f"--method-weights {name}: {method.title} runs on {' or '.join(method.families)} base models, and "
                    f"this server serves {', '.join(sorted(families))}: serve a {' or '.join(method.families)} model "
                    "set (--base-model, --also-model) or leave it out"
                )

    @property
    def _claims_jobs(self) -> bool:
        return any(getattr(worker, "claims_jobs", True) for worker in self.workers)

    @property
    def pipeline(self):
        """A loaded pipeline (every worker loads the default model set at start): for its defaults."""
        for worker in self.workers:
            if worker.pipeline is not None:
                return worker.pipeline
        raise FaceIDError("the models are not loaded (yet); see GET /health")

    # ------------------------------------------------------------------ identities
    def enroll(self, owner: str, name: str | None, photos: list[tuple[str, bytes]]) -> tuple[Any, list[str]]:
        """``photos``: (label, bytes). Every photo is checked and analysed before anything is written."""
        if not photos:
            raise FaceIDError("send at least one photo (multipart field 'photos')")
        if len(photos) > self.config.max_photos:
            raise LimitExceeded(
                f"{len(photos)} photos: this server takes at most {self.config.max_photos} per identity", status=413
            )
        if name is not None and len(name) > 200:
            raise FaceIDError("name: at most 200 characters")
        self.policy.check_texts(name, "name")
        for label, data in photos:
            self._check_upload_size(label, data)
        self.policy.check_identity(owner, sum(len(data) for _, data in photos))
        analysed = [self.enroller.analyse(data, label) for label, data in photos]
        identity = self.enroller.create(owner, name, analysed)
        return identity, [w for photo in analysed for w in photo.warnings]

    def _check_upload_size(self, label: str, data: bytes) -> None:
        if len(data) > self.config.max_upload_bytes:  # the routes read one byte over the limit: its size is unknown
            size = len(data) if len(data) != self.config.max_upload_bytes + 1 else None
            raise upload_too_large(label, size, self.config.max_upload_bytes)

    def identity(self, identity_id: str, owner: str):
        found = self.store.identity(identity_id, owner) if is_id(identity_id) else None
        if found is None:
            raise NotFound(f"no identity {identity_id}: list yours with GET /v1/identities")
        return found

    def identities(self, owner: str) -> list:
        return self.store.identities(owner)

    def crop_path(self, identity_id: str, k: int, owner: str):
        identity = self.identity(identity_id, owner)
        if not any(face.k == k for face in identity.faces):
            raise NotFound(f"identity {identity_id} has no photo {k} (it has {len(identity.faces)})")
        return self.data.crop(identity_id, k)

    def delete_identity(self, identity_id: str, owner: str) -> None:
        if not (is_id(identity_id) and self.enroller.delete(identity_id, owner)):
            raise NotFound(f"no identity {identity_id}: list yours with GET /v1/identities")

    def identity_faces(self, job: QueuedJob) -> list[list] | str:
        """Each prompt's identity as a list of ``Face`` (several photos: one person); an error text if one is gone."""
        faces = {}
        for identity_id in dict.fromkeys(job.identity_ids):
            identity = self.store.identity(identity_id, job.owner)
            if identity is None:
                return f"identity {identity_id} was deleted before this job ran; enroll the person again"
            faces[identity_id] = self.enroller.faces(identity)
        return [faces[i] for i in job.identity_ids]

    # ------------------------------------------------------------------ uploads
    def add_upload(self, owner: str, name: str | None, data: bytes) -> Upload:
        """Store an uploaded image: decoded and checked (size, pixels) before anything is written, then kept as the
        generation will read it: upright (its EXIF orientation applied), RGB, as PNG without metadata."""
        self.policy.check_texts(name, "image file name")
        label = "image" + (f" ({name[:80]!r})" if name else "")
        self._check_upload_size(label, data)
        self.policy.check_upload(owner, len(data))
        image = decode_upload(data, label, self.config.max_pixels, what="the image")
        row = Upload(
            id=new_id(), owner=owner, name=name[:200] if name else None, width=image.width, height=image.height,
            created=time.time(),
        )  # fmt: skip
        path = self.data.upload(row.id)
        image.save(path, format="PNG")
        try:
            self.store.add_upload(row)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return row

    def upload(self, upload_id: str, owner: str) -> Upload:
        found = self.store.upload(upload_id, owner) if is_id(upload_id) else None
        if found is None:
            raise NotFound(f"no upload {upload_id}: POST /v1/uploads makes one, GET /v1/uploads lists yours")
        return found

    def uploads(self, owner: str) -> list[Upload]:
        return self.store.uploads(owner)

    def upload_path(self, upload_id: str, owner: str):
        return self.data.upload(self.upload(upload_id, owner).id)

    def delete_upload(self, upload_id: str, owner: str) -> None:
        """Delete an upload, its row and its file. A queued job that names it fails when it runs, saying so."""
        if not (is_id(upload_id) and self.store.delete_upload(upload_id, owner)):
            raise NotFound(f"no upload {upload_id}: GET /v1/uploads lists yours")
        self.data.upload(upload_id).unlink(missing_ok=True)

    def upload_image(self, upload_id: str, owner: str, field: str):
        """An upload as a job reads it (called by the workers): upright RGB, named ``upload ID`` in the library's
        errors; a ``FaceIDError`` that says so when it was deleted after the job was queued."""
        from ..images import load_image

        if self.store.upload(upload_id, owner) is None:
            raise FaceIDError(
                f"{field}: upload {upload_id} was deleted before this job ran; upload the image again and submit "
                "the generation again"
            )
        image = load_image(self.data.upload(upload_id), max_pixels=None)
        # ``source_name`` reads a PIL image's filename: the library's errors then name the upload ("No face found
        # in upload ..."), not "<PIL image>" nor a path on the server.
        image.filename = f"upload {upload_id} ({field})"
        return image

    def _check_inputs(self, owner: str, inputs: JobInputs, strength: float | None) -> dict[str, Upload]:
        """The request's input images checked (see ``JobInputs.check``) and found: the owner's uploads by id."""
        inputs.check(strength)
        found = {}
        for field, upload_id in inputs.uploads():
            row = self.store.upload(upload_id, owner) if is_id(upload_id) else None
            if row is None:
                raise FaceIDError(
                    f"{field}: no upload {upload_id}: upload the image with POST /v1/uploads and give its id "
                    "(GET /v1/uploads lists yours)"
                )
            found[upload_id] = row
        return found

    # ------------------------------------------------------------------ generations
    def submit(self, owner: str, request: dict[str, Any]) -> tuple[QueuedJob, int]:
        """Check and resolve a request (``GenerationSettings`` fields + ``identity_id``, ``identity_ids`` or ``people``
        + the other ``JobInputs`` fields, its input images by upload id), then queue it. Raises before anything is stored when it
        is bad, too large or the queue is full."""
        self.policy.check_texts(request)  # the request models check it too (``policy.TextFields``)
        request = dict(request)
        identity_id, identity_ids = request.pop("identity_id", None), request.pop("identity_ids", None)
        inputs = JobInputs.parse({key: request.pop(key) for key in JobInputs.model_fields if key in request})
        settings = GenerationSettings.parse(request)
        if [identity_id, identity_ids, inputs.people].count(None) != 2:
            raise FaceIDError(
                "give one of identity_id (one person for every prompt), identity_ids (one per prompt) or people "
                "(several in every picture); POST /v1/identities makes an identity"
            )
        if settings.face_index:
            raise FaceIDError("face_index: an identity already holds one face per photo (the largest); leave it out")
        entry = self.catalog.find(settings)  # refuses a request naming models this server does not serve
        if "method" not in settings.model_fields_set and self.default_method(entry) != settings.method:
            settings = settings.replace(method=self.default_method(entry))  # a FLUX.1 set's: the method it loaded
        self.capabilities.check_family(settings, inputs, entry)  # what a model set of its family cannot do (422)
        self.capabilities.check(settings, inputs)  # refuses what this server was not started with (422)
        self.capabilities.check_model_set(settings, entry, self.catalog.entries)  # the method on its family
        uploads = self._check_inputs(owner, inputs, settings.strength)
        for k, reference in enumerate(inputs.style or ()):
            if not isinstance(reference.region, (str, type(None))):
                from ..groups import check_box  # here: a Ray ingress refused style above, torch-free

                check_box(reference.region, f"style[{k}].region")
        if inputs.people is not None:
            settings, inputs = self._place_people(settings, inputs)
        if inputs.swap is not None:
            settings, inputs = self._for_swap(settings, inputs, identity_ids, entry.family)
        elif inputs.init_image is not None:  # as the library: the size is what is given, the rest from the image
            init = uploads[inputs.init_image]
            width, height = size_from_image(settings.width, settings.height, (init.width, init.height))
            settings = settings.replace(width=width, height=height)
        if inputs.edits and settings.strength is None:  # the library's default, recorded with the job
            settings = settings.replace(strength=DEFAULT_STRENGTH["inpaint" if inputs.mask_image or inputs.swap
                                                                  else "img2img"])  # fmt: skip
        # The default model set's defaults are known (it was loaded at start); another one's are the family's and
        # its models', and the worker that runs the job fills in the rest (the adapter's scale...) from the
        # loaded pipeline before it runs (``Worker.run_batch``), storing them: the job's settings always show
        # what made its images.
        known = self._known_defaults(entry, settings.method)
        models = entry.models.model_dump(include=set(MODEL_FIELDS))  # the entry's names, not the request's
        resolved = settings.replace(**models).resolve(entry.family, **known)
        resolved = within_limits(settings, resolved, self.config)  # the defaults left to the model, within limits
        prompts = [resolved.prompt] if isinstance(resolved.prompt, str) else list(resolved.prompt)
        if inputs.people is not None:  # the job's identities: every picture's people
            ids = list(inputs.people)
        elif identity_ids is not None:
            if not isinstance(resolved.prompt, list) or len(identity_ids) != len(prompts):
                raise FaceIDError(
                    f"identity_ids: {len(identity_ids)} identities for {len(prompts)} prompt(s): give prompt as a "
                    "list with one prompt per identity"
                )
            ids = list(identity_ids)
        else:
            ids = [identity_id] * len(prompts)
        negatives = resolved.negative_prompt
        if isinstance(negatives, list) and len(negatives) not in (1, len(prompts)):
            raise FaceIDError(f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts")
        self._check_limits(resolved, len(prompts), inputs)
        for i in dict.fromkeys(ids):
            self._check_embedded_for(self.identity(i, owner), resolved.method)  # 404 for a missing one
        self.policy.check_generation(owner)
        total = len(prompts) * resolved.num_images_per_prompt
        seed = resolved.seed
        if seed is None:
            seeds = [random.randrange(2**31) for _ in range(total)]
        elif isinstance(seed, int):  # as the CLI: image i has seed + i, so each image reproduces alone
            seeds = [seed + i for i in range(total)]
        elif len(seed) != total:
            raise FaceIDError(f"seed: {len(seed)} seeds for {total} images: give one seed per image, or one int")
        else:
            seeds = list(seed)
        resolved = resolved.replace(seed=seeds)
        job_id = new_id()
        row = Job(
            id=job_id,
            owner=owner,
            status=QUEUED,
            created_ns=time.time_ns(),
            identity_ids=ids,
            settings=resolved.to_json(),
            inputs=inputs.to_json(),
        )
        job = self.queued_job(row)
        row.batch_key = job.batch_key
        try:  # counted and added under the queue's lock in the database: every process shares the bounds
            position = self.queue.put(row, lambda queued, running, mine: self.policy.check_queued(owner, mine, running))
        except QueueFull:
            self.metrics.refused("queue_full")
            raise
        self.metrics.submitted.inc()
        return job, position

    def default_method(self, entry: ModelEntry) -> str:
        """The identity method of a request to ``entry`` that names none: FaceID on a model set with a FaceID adapter;
        on one without (FLUX.1), the first of this server's methods that runs on its family (the one it loaded)."""
        from ..families import family
        from ..methods import METHODS

        if family(entry.family).faceid_adapters:
            return "faceid"
        if entry is self.catalog.default:
            return self.pipeline.default_method
        return next((name for name in self.config.methods if entry.family in METHODS[name].families), "faceid")

    def _known_defaults(self, entry: ModelEntry, method: str) -> dict[str, Any]:
        """The defaults a request to ``entry`` with ``method`` gets beyond the family's: the loaded default model
        set's own (taken at start); another model set's models, and for a method other than FaceID (or on a family
        without FaceID adapters) the method's own defaults and the family's empty negative prompt where its guidance
        is embedded. The worker fills in the rest from the loaded pipeline before the job runs."""
        from ..families import family
        from ..methods import METHODS

        if entry is self.catalog.default:
            known = self.defaults if method == "faceid" else self.method_defaults.get(method, entry.models)
            return known.model_dump(exclude_none=True)
        known = entry.models.model_dump(exclude_none=True)
        if method != "faceid":
            embedded = family(entry.family).guidance_embedded
            known.update({**({"negative_prompt": ""} if embedded else {}), **METHODS[method].defaults})
        return known

    @staticmethod
    def _check_embedded_for(identity, method_name: str) -> None:
        """Refuse an identity whose photos were not embedded by the recognizer ``method_name`` reads (enrolled
        before the server loaded the method): its photos are not kept analysed for it, so they are enrolled again."""
        from ..methods import METHODS

        method = METHODS[method_name]
        key = method.embedding_key
        if key == "buffalo_l":
            return
        lacking = [face.k for face in identity.faces if key not in face_recognizers(face)]
        if lacking:
            whose = f"insightface's {key}" if key == method.face_pack else f"its own ({method.recognizer}, {key})"
            raise FaceIDError(
                f"identity {identity.id}: method {method_name} ({method.title}) reads the face embedding of "
                f"{whose} recognizer, and this identity was enrolled before the server "
                f"loaded it (photo(s) {', '.join(map(str, lacking))} have {', '.join(face_recognizers(identity.faces[lacking[0]]))} "
                "only): enroll its photos again (POST /v1/identities) and use the new identity"
            )

    def _place_people(self, settings: GenerationSettings, inputs: JobInputs) -> tuple[GenerationSettings, JobInputs]:
        """Several people in every picture: the regions default to ``"auto"``; those known before the job runs
        (auto, boxes, masks) are checked by the library now, the count and each box, and recorded in the settings as
        it records them. A photo's columns are known once its faces are found (the worker records them then)."""
        from ..groups import resolve_regions  # here: a Ray ingress refused people above, torch-free

        inputs = inputs if inputs.regions is not None else inputs.model_copy(update={"regions": "auto"})
        if not isinstance(inputs.regions, RegionsPhoto):
            # Mask uploads stand for their images here: the count is checked, the images are read by the worker.
            recorded, _ = resolve_regions(inputs.regions, len(inputs.people), analyze=None)
            settings = settings.replace(regions=recorded)
        return settings, inputs

    def _for_swap(
        self, settings: GenerationSettings, inputs: JobInputs, identity_ids: list | None, family: str
    ) -> tuple[GenerationSettings, JobInputs]:
        """A swap's settings and inputs: one person and one prompt (the CLI's default one when none is given), the
        resolution resolved (default: the family's). The size is the crop's, generated at that resolution, known
        once the target's face is found (the worker records it then: until then it reads resolution x
        resolution)."""
        from ..swap import DEFAULT_SWAP_PROMPT

        if identity_ids is not None or isinstance(settings.prompt, list):
            raise FaceIDError("swap puts one person into its target: give identity_id and one prompt (not a list)")
        if settings.width is not None or settings.height is not None:
            raise FaceIDError(
                "swap makes an image of its target's size (the crop around the face is generated at "
                "swap.resolution): leave out width and height"
            )
        default = min(FAMILY_DEFAULTS[family][key] for key in ("width", "height"))
        resolution = inputs.swap.resolution or swap_resolution(default, self.config)
        swap = inputs.swap.model_copy(update={"resolution": resolution})
        settings = settings.replace(prompt=settings.prompt or DEFAULT_SWAP_PROMPT, width=resolution, height=resolution)
        return settings, inputs.model_copy(update={"swap": swap})

    def _check_limits(self, settings: GenerationSettings, prompts: int, inputs: JobInputs) -> None:
        c = self.config
        images = prompts * settings.num_images_per_prompt
        if images > c.max_images:
            raise LimitExceeded(
                f"{images} images requested ({prompts} prompt(s) x {settings.num_images_per_prompt}); this server "
                f"makes at most {c.max_images} per request: split it into several requests"
            )
        if settings.num_inference_steps > c.max_steps:
            raise LimitExceeded(f"num_inference_steps: at most {c.max_steps} on this server")
        for name in ("width", "height"):
            if getattr(settings, name) > c.max_side:
                hint = ""
                if inputs.swap is not None:
                    hint = ": give a smaller swap.resolution"
                elif inputs.init_image is not None:
                    hint = " (the size comes from init_image unless given): give width or height to generate smaller"
                raise LimitExceeded(f"{name}: at most {c.max_side} pixels on this server{hint}")

    def queued_job(self, row: Job) -> QueuedJob:
        settings = GenerationSettings.parse(row.settings)
        return QueuedJob(
            id=row.id,
            owner=row.owner,
            settings=settings,
            identity_ids=list(row.identity_ids),
            created_ns=row.created_ns,
            entry=self.catalog.find(settings),
            inputs=dict(row.inputs or {}),
            status=row.status,
            passed_over=row.passed_over or 0,
        )

    def job(self, job_id: str, owner: str) -> Job:
        row = self.store.job(job_id, owner) if is_id(job_id) else None
        if row is None:
            raise NotFound(f"no generation {job_id}: the id comes from POST /v1/generations")
        return row

    def job_view(self, job_id: str, owner: str) -> dict[str, Any]:
        """The job's view; one whose stored record cannot be shown, as a failed job that says so."""
        return readable_view(self.job(job_id, owner), self._view, image_url)

    def wait(self, job_id: str, owner: str, timeout: float) -> dict[str, Any]:
        """A generation's view once it has finished, or as it is after ``timeout`` seconds (for the protocols
        whose requests answer with the images)."""
        deadline = time.monotonic() + timeout
        while self.job(job_id, owner).status not in FINISHED and time.monotonic() < deadline:
            time.sleep(min(WAIT_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        return self.job_view(job_id, owner)

    def image_ids(self, job_id: str, owner: str) -> list[str]:
        """A generation's images (those not deleted), in order."""
        return [image.id for image in self.job(job_id, owner).images]

    def _view(self, row: Job) -> dict[str, Any]:
        status = row.status
        inputs = JobInputs.parse(row.inputs)
        total = row.settings.get("num_inference_steps")
        view = {
            "id": row.id,
            "status": status,
            "queue_position": self.queue.position(row) if status == QUEUED else None,
            "progress": {"step": total if status == DONE else (row.step or 0), "total": total},
            "images": [image_url(image.id) for image in row.images],
            "scores": [image.score for image in row.images],
            "image_index": [image.index for image in row.images],
            "identity_ids": row.identity_ids,
            "mode": inputs.mode,
            "inputs": inputs.to_json(),
            "control_images": [control_url(row.id, k) for k in range(len(inputs.controls or ()))]
            if status == DONE
            else [],
            "settings": row.settings,
            "error": row.error,
            "created": row.created_ns / 1e9,
            "started": row.started,
            "finished": row.finished,
        }
        return view

    def generations(self, owner: str, limit: int, cursor: str | None = None) -> dict[str, Any]:
        """A page of the owner's generations, newest first, and the cursor of the next page (None: the last)."""
        before = None
        if cursor is not None:
            found = CURSOR.fullmatch(cursor)
            if found is None:
                raise FaceIDError(f"cursor {cursor[:80]!r}: give the next_cursor of the previous page, or none")
            before = (int(found[1]), found[2])
        rows = self.store.jobs(owner, limit + 1, before)
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "generations": [readable_view(row, self._view, image_url) for row in page],
            "next_cursor": f"{page[-1].created_ns}-{page[-1].id}" if more else None,
        }

    def delete_generation(self, job_id: str, owner: str) -> None:
        """Delete a finished generation: its row, and its images' rows and files."""
        row = self.job(job_id, owner)
        if row.status not in FINISHED:
            raise Conflict(
                f"generation {job_id} is {row.status}: cancel it first (DELETE /v1/generations/{job_id}), "
                "then delete it"
            )
        for image_id in self.store.delete_job(job_id, owner) or ():
            self.data.image(image_id).unlink(missing_ok=True)
        try:
            controls = len(JobInputs.parse(row.inputs).controls or ())
        except Exception:  # a record that no longer reads: whichever control images it may have had
            controls = MAX_CONTROLS
        for k in range(controls):
            self.data.control_image(job_id, k).unlink(missing_ok=True)

    def delete_image(self, image_id: str, owner: str) -> None:
        """Delete a generated image: its row and its PNG (its generation lists the others)."""
        if not (is_id(image_id) and self.store.delete_image(image_id, owner)):
            raise NotFound(f"no image {image_id}: image URLs come from GET /v1/generations")
        self.data.image(image_id).unlink(missing_ok=True)

    def cancel(self, job_id: str, owner: str) -> dict[str, Any]:
        row = self.job(job_id, owner)
        if row.status in FINISHED:
            raise Conflict(
                f"generation {job_id} is already {row.status}; nothing to cancel "
                f"(DELETE /v1/generations/{job_id}?purge=true deletes it and its images)"
            )
        if self.queue.cancel(job_id) == QUEUED:  # ended now; a running one ends at its worker's next step
            self.metrics.finished(CANCELLED, time.time_ns() - row.created_ns, 0)
        return self.job_view(job_id, owner)

    # ------------------------------------------------------------------ called by the workers
    def update_settings(self, job: QueuedJob, settings: GenerationSettings) -> None:
        """The worker resolved what the job left to its models' defaults."""
        self.store.update_job(job.id, settings=settings.to_json())
        job.settings = settings

    def mark_running(self, job: QueuedJob, started: float) -> None:
        self.store.update_job(job.id, status=RUNNING, started=started)
        job.status = RUNNING

    def finish(self, job: QueuedJob, status: str, error: str | None = None, images: list[ImageRow] = ()) -> None:
        """End ``job`` (its row, its images' rows and its last event, in one transaction), unless it ended already."""
        event = _end(status, error, [image_url(image.id) for image in images])
        ended = self.store.finish_job(
            job.id, status, error=error, images=list(images), unfinished_only=True, event=event
        )
        job.status = status
        self.queue.done(job)
        for path in self.data.previews_of(job.id):
            path.unlink(missing_ok=True)
        if ended:
            self.metrics.finished(status, time.time_ns() - job.created_ns, len(images))

    def requeue_later(self, job: QueuedJob) -> None:
        """The server stops while ``job`` runs: it stays queued in the database for the next start (or another
        process's worker)."""
        self.store.requeue(job.id, self.worker_id)
        for path in self.data.previews_of(job.id):
            path.unlink(missing_ok=True)
        self.queue.done(job)

    def cancelled(self, jobs: list[QueuedJob]) -> set[str]:
        """The ids of those of ``jobs`` whose cancel was asked for, through any process (read at each step)."""
        return self.store.cancel_requested([job.id for job in jobs])

    def step_done(self, jobs: list[QueuedJob], step: int, total: int) -> set[str]:
        """Step ``step`` of ``total`` done for ``jobs``: the ids of those whose cancel was asked for; the others'
        progress recorded."""
        return self.store.step_done([job.id for job in jobs], step, total)

    def preview(self, job: QueuedJob, data: dict[str, Any]) -> None:
        """A preview of ``job``'s images (``data``: step, total, images as data URLs, image_index): its file in the
        data dir, its event (the newest only) in the database."""
        path = self.data.preview(job.id, data["step"])
        path.write_text(json.dumps(data))
        name = path.relative_to(self.data.root).as_posix()
        old = self.store.set_preview(job.id, name, {"step": data["step"], "total": data["total"]})
        if old is not None and old != name:
            (self.data.root / old).unlink(missing_ok=True)

    def events_since(self, job_id: str, after: int) -> list[tuple[int, str, dict]]:
        """The job's events after the ``after``-th (0: all kept): (number, kind, data); a preview's images read from
        its file (one already replaced is left out: the newer one follows)."""
        found = []
        for number, kind, data in self.store.events_since(job_id, after):
            if kind == "preview":
                try:
                    data = json.loads((self.data.root / data["file"]).read_text())
                except (OSError, ValueError, KeyError):
                    continue
            found.append((number, kind, data))
        return found

    def save_images(
        self, job: QueuedJob, images: list, extra: dict[str, Any] | None = None, control_images: list = ()
    ) -> None:
        """``extra``: more metadata for every PNG (Ray Serve: the replica that made it; a swap: its crop).
        ``control_images``: what the job's ControlNets saw, saved beside its images."""
        for k, image in enumerate(control_images):
            image.save(self.data.control_image(job.id, k), format="PNG")
        inputs = JobInputs.parse(job.inputs)
        n = job.settings.num_images_per_prompt
        image_ids = [new_id() for _ in images]
        # Each image with what reproduces it alone, as the CLI records it (`faceid generate --settings IMAGE.png`),
        # and who is in it, the generation and the upload ids it was made from.
        save_images(
            images,
            job.settings,
            [self.data.image(image_id) for image_id in image_ids],
            inputs={
                "generation_id": job.id,
                "mode": inputs.mode,
                **inputs.metadata(),
                **self.config.image_extra,
                **(extra or {}),
            },
            per_image=[
                {"people": job.identity_ids} if inputs.people else {"identity_id": job.identity_ids[index // n]}
                for index in range(len(images))
            ],
        )
        scores = self.likeness(job, images)
        rows = [
            ImageRow(
                id=image_id,
                owner=job.owner,
                job_id=job.id,
                index=index,
                settings=job.settings.for_image(index).to_json(),
                score=scores[index],
            )
            for index, image_id in enumerate(image_ids)
        ]
        self.finish(job, DONE, images=rows)

    # ------------------------------------------------------------------ speech
    def transcribe(self, audio: bytes, language: str | None = None, prompt: str | None = None) -> str:
        """The text spoken in ``audio`` (a recording's bytes, any common format), by the server's speech model."""
        if self.transcriber is None:
            raise NotServed(
                "this server has no speech model: start it with --speech-model (the pinned Whisper) to transcribe "
                "spoken prompts"
            )
        if len(audio) > self.config.max_upload_bytes:
            raise LimitExceeded(
                f"the recording is larger than {self.config.max_upload_bytes / 1e6:.1f} MB: send a shorter one",
                status=413,
            )
        return self.transcriber(audio, language=language, prompt=prompt)

    def likeness(self, job: QueuedJob, images: list) -> list[dict[str, Any] | None]:
        """How much each image looks like its person, by the server's recognizer (the one that enrolled them):
        the cosine similarity of the image's largest face and the person's embedding (the mean of their photos',
        normalised; one photo: exactly ``faceid score IMAGE --face PHOTO``). Several people in a picture: each
        person's, for the face the best assignment gives them (``faceid score --face A --face B``), and the weakest
        as the image's. None for an image that could not be scored (the log says why)."""
        from ..scoring import IdentityScorer

        scorer = IdentityScorer(self.analyzer)
        references: dict[str, Any] = {}
        for identity_id in dict.fromkeys(job.identity_ids):
            identity = self.store.identity(identity_id, job.owner)
            faces = self.enroller.faces(identity) if identity is not None else []
            references[identity_id] = np.mean([f.embedding for f in faces], axis=0) if faces else None
        people = bool(job.inputs.get("people"))
        n = job.settings.num_images_per_prompt
        scores: list[dict[str, Any] | None] = []
        for index, image in enumerate(images):
            ids = list(job.identity_ids) if people else [job.identity_ids[index // n]]
            if any(references[i] is None for i in ids):
                scores.append(None)
                continue
            try:
                result = scorer.score_people(image, [references[i] for i in ids], largest_face_only=not people)
            except Exception:  # a score is a view of the image: never the reason a job fails
                logger.exception("job %s: image %d could not be scored", job.id, index)
                scores.append(None)
                continue
            each = [
                {"identity_id": i, "similarity": round(p.similarity, 4), "no_face": p.no_face}
                for i, p in zip(ids, result.people, strict=True)
            ]
            weakest = min(each, key=lambda p: p["similarity"])
            scores.append({"recognizer": scorer.name, "similarity": weakest["similarity"], "people": each})
        return scores

    # ------------------------------------------------------------------ images, models, health
    def control_image_path(self, job_id: str, k: int, owner: str):
        row = self.job(job_id, owner)
        controls = JobInputs.parse(row.inputs).controls or ()
        path = self.data.control_image(job_id, k) if 0 <= k < len(controls) else None
        if path is None or not path.is_file():
            raise NotFound(
                f"generation {job_id} has no control image {k}"
                + (f" (it has {len(controls)}, once done)" if controls else " (it ran without ControlNets)")
            )
        return path

    def image_path(self, image_id: str, owner: str):
        row = self.store.image(image_id, owner) if is_id(image_id) else None
        if row is None:
            raise NotFound(f"no image {image_id}: image URLs come from GET /v1/generations/{{id}}")
        return self.data.image(image_id)

    def models(self) -> dict[str, Any]:
        """What is configured, what each worker holds (``loaded_models``: catalog indexes, least recently used
        first; ``memory``), the default model set's defaults and the catalog (each entry's ``loaded_on``)."""
        workers = [worker.describe() for worker in self.workers]
        # the defaults a request that leaves them open gets: the model's, within this server's limits
        defaults = (
            within_limits(GenerationSettings(), self.defaults, self.config).to_json()
            if self.defaults is not None
            else None
        )
        entries = self.catalog.entries if self.catalog is not None else []
        methods = (self.capabilities or Capabilities()).methods
        catalog = [
            {
                **e.describe(),
                "loaded_on": [w["device"] for w in workers if e.index in w.get("loaded_models", ())],
                "methods": describe_methods(e.family, methods),
                # the control kinds a request may give this model set: the server's ControlNets of its family
                "controlnets": {
                    kind: nets[e.family] for kind, nets in self.config.controlnets.items() if e.family in nets
                },
                "default_method": self.default_method(e),
            }
            for e in entries
        ]
        return {
            "configured": self.config.models,
            "workers": workers,
            "defaults": defaults,
            "catalog": catalog,
            **self._capabilities(),
        }

    def _capabilities(self) -> dict[str, Any]:
        """What requests may ask for (``capabilities.Capabilities``) and the server's limits."""
        caps, c = self.capabilities or Capabilities(), self.config
        return {
            "modes": list(caps.modes),
            # one source per kind; a kind with ControlNets of several families lists each (catalog[].controlnets:
            # the one of each model set)
            "controlnets": {kind: _sources(c.controlnets[kind]) for kind in caps.controlnets},
            "style_adapters": {name: c.style_adapters[name] for name in caps.style_adapters},
            "max_people": caps.max_people,
            "fast": caps.describe_fast(),
            "decoders": list(caps.decoders),
            "annotators": list(caps.annotators),
            "speech": self.transcriber.name if self.transcriber is not None else None,
            "limits": {
                "max_steps": c.max_steps,
                "max_side": c.max_side,
                "max_images": c.max_images,
                "max_batch": c.max_batch,
                "max_upload_bytes": c.max_upload_bytes,
                "max_photos": c.max_photos,
            },
        }

    def health(self) -> dict[str, Any]:
        loaded = [w.pipeline is not None for w in self.workers]
        return {
            "status": "ok"
            if any(loaded)
            else "loading"
            if not all(w.loaded.is_set() for w in self.workers)
            else "error",
            "version": __version__,
            "workers": len(self.workers),
            "workers_loaded": sum(loaded),
            "queue_depth": self.queue.depth,
            "running": self.queue.running,
            "authenticated": bool(self.config.api_keys),
        }


WAIT_POLL_SECONDS = 0.1  # how often ``Service.wait`` reads a job's status


def _end(status: str, error: str | None = None, images: list[str] = ()) -> dict[str, Any]:
    """The data of a job's last event."""
    data: dict[str, Any] = {"status": status}
    if error:
        data["error"] = error
    if images:
        data["images"] = list(images)
    return data


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sources(nets: dict[str, str]) -> str:
    """``GET /v1/models``' ``controlnets`` value of a kind: its source, or with several families each as FAMILY:
    SOURCE."""
    if len(nets) == 1:
        return next(iter(nets.values()))
    return "; ".join(f"{family}: {source}" for family, source in nets.items())


def image_url(image_id: str) -> str:
    return f"/v1/images/{image_id}.png"


def control_url(job_id: str, k: int) -> str:
    return f"/v1/generations/{job_id}/controls/{k}.png"


def upload_url(upload_id: str) -> str:
    return f"/v1/uploads/{upload_id}.png"


def crop_url(identity_id: str, k: int) -> str:
    return f"/v1/identities/{identity_id}/crops/{k}.png"


def analyzer_for_methods(analyzer, methods: dict[str, str], face_models: str | None):
    """The face analyzer of enrollment with the recognizer of every loaded method's insightface pack too (antelopev2
    for InstantID), so that an enrolled identity keeps each embedding a method reads; a missing pack stops the start,
    saying what to download. The analyzer given is left as it is (a copy gets the pack)."""
    from ..faces.model_files import face_pack_ready
    from ..methods import METHODS

    inner = given = getattr(analyzer, "analyzer", analyzer)  # a SerialAnalyzer's
    for name, folder in methods.items():
        method = METHODS[name]
        pack = method.face_pack
        have = {getattr(inner, "pack", None), *getattr(inner, "extra_recognizers", {})}
        if pack != "buffalo_l" and pack not in have:
            face_pack_ready(pack, face_models, what=f"method {name}")
            if not hasattr(inner, "with_pack"):
                raise FaceIDError(
                    f"method {name} needs the face analysis to embed with insightface's {pack} too, and this "
                    "server's analyzer cannot add a recognizer: give a faceid.faces.FaceAnalyzer"
                )
            inner = inner.with_pack(pack, face_models)
        if method.embedding_key not in (pack, *getattr(inner, "extra_recognizers", {})):
            inner = _with_method_recognizer(inner, name, folder, face_models)
    return analyzer if inner is given else inner


def _with_method_recognizer(analyzer, name: str, folder: str, face_models: str | None):
    """``analyzer`` with the recognizer of its own that method ``name`` reads (InfiniteYou: facexlib's IR-SE50, from
    the method's folder or the face models folder, as ``ModelSet.load_method`` finds it), so that enrollment keeps
    that embedding too; without the file the server does not start, saying where to put it."""
    from pathlib import Path

    from ..errors import MissingWeightsError
    from ..faces.irse50 import IRSE50_FILE, IRSE50_KEY, load_irse50
    from ..methods.infiniteyou import model_set_folder
    from ..model_set import find_recognizer

    if name != "infiniteyou":  # the one method whose embedding is not an insightface pack's
        raise FaceIDError(f"method {name}: enrollment has no recognizer for it")
    found = find_recognizer(model_set_folder(folder), face_models)
    if found is None:
        raise MissingWeightsError(
            f"--method-weights infiniteyou={folder}: InfiniteYou reads the embedding of facexlib's ArcFace IR-SE50 "
            f"({IRSE50_FILE}), which enrollment keeps for every photo, and it is in neither {Path(folder)} (nor its "
            "model set folders) nor the face models folder: download it "
            "(https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth) into "
            "one of them"
        )
    if not hasattr(analyzer, "with_recognizer"):
        raise FaceIDError(
            f"method {name} needs the face analysis to embed with {IRSE50_FILE} too, and this server's analyzer "
            "cannot add a recognizer: give a faceid.faces.FaceAnalyzer"
        )
    return analyzer.with_recognizer(IRSE50_KEY, load_irse50(found))
