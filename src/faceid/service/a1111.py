"""The AUTOMATIC1111 web UI API (``/sdapi/v1``) over the job service: what Open WebUI's default image engine,
SillyTavern, LibreChat and many bots speak.

Here a *checkpoint* is a person: ``GET /sdapi/v1/sd-models`` lists the caller's identities, and ``POST
/sdapi/v1/options`` with ``sd_model_checkpoint`` picks the one that later requests draw (kept per API key, across
restarts). A face photo sent the way A1111 users send one today, as a ControlNet-extension unit in
``alwayson_scripts`` with an IP-Adapter FaceID module (``ip-adapter_face_id``, ``ip-adapter_face_id_plus``), is the
person for that request instead; the extension's other identity modules name the identity method that draws them
(``instant_id_face_embedding``: InstantID, with ``instant_id_face_keypoints`` for the photo whose face keypoints its
IdentityNet follows; ``ip-adapter_pulid``: PuLID, its ``pulid_mode`` the extension's Fidelity or Extremely style),
run when the server has that method's weights. ``txt2img`` and ``img2img`` (with ``mask``: inpainting) run as ``/v1`` generations
through ``Service`` (the same keys, limits, queue, batching and capabilities) and answer as A1111 does:
``{"images": [base64 PNG], "parameters", "info"}`` with ``info`` a JSON string.

A1111 clients send images as base64 inside the JSON body; such a body may be as large as the images the server
takes as uploads (``body_limits``), and each image is checked as an upload is. HTTP basic auth (what A1111 clients
send) is accepted with the API key as the password, as is a bearer token. Fields A1111 itself ignores for a request
(``s_noise``, ``do_not_save_samples``...) are ignored; a value faceid cannot honour (a sampler it has not got, hires
fix, face restoration, another ControlNet module) is a 4xx in A1111's error shape, never a silent substitute.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import FaceIDError
from ..images import load_image
from . import oneshot
from .core import Service
from .error_shapes import Shape
from .errors import Conflict, NotFound
from .files import is_id
from .schema import DocumentedRoute, errors

PREFIX = "/sdapi/v1"
CHECKPOINT = "sd_model_checkpoint"  # the option that names the person
# The ControlNet extension's identity modules: a unit with one carries the person's photo. The value: the identity
# method (``GenerationSettings.method``) it stands for and, for FaceID, whether the module is the Plus one (which reads
# CLIP features of the face as well: the server's adapter must be a Plus one).
FACE_MODULES: dict[str, tuple[str, bool | None]] = {
    "ip-adapter_face_id": ("faceid", False),
    "ip-adapter_face_id_plus": ("faceid", True),
    "instant_id_face_embedding": ("instantid", None),
    "ip-adapter_pulid": ("pulid", None),
}
# The extension's PuLID unit's ``pulid_mode`` (its enum ``PuLIDMode``) and the values its attention then runs with
# (its ``PULID_SETTING_FIDELITY`` / ``PULID_SETTING_STYLE``: the PuLID authors' v1 app's two modes): PuLID's
# ``pulid_num_zero`` and ``pulid_ortho``. A unit without it gets the method's defaults (the authors' v1.1 app's).
PULID_MODES: dict[str, dict[str, Any]] = {
    "Fidelity": {"pulid_num_zero": 8, "pulid_ortho": "v2"},
    "Extremely style": {"pulid_num_zero": 16, "pulid_ortho": "v1"},
}
# InstantID's second unit in the extension: the face of its image gives the keypoints IdentityNet follows (the pose
# and place of the face), its weight is IdentityNet's scale.
KEYPOINTS_MODULE = "instant_id_face_keypoints"
# A1111's samplers and schedule types -> faceid's schedulers (``faceid.fast.SCHEDULERS``). "Automatic" is the
# sampler's own default schedule in A1111 (Karras for DPM++ 2M); "SGM Uniform" is diffusers' trailing spacing.
SAMPLERS: dict[str, dict[str, str]] = {
    "DDIM": {"automatic": "ddim", "uniform": "ddim", "normal": "ddim", "sgm_uniform": "ddim-trailing"},
    "Euler": {"automatic": "euler", "uniform": "euler", "normal": "euler", "sgm_uniform": "euler-trailing"},
    "Euler a": {"automatic": "euler-a", "uniform": "euler-a", "normal": "euler-a"},
    "DPM++ 2M": {
        "automatic": "dpm++-karras",
        "karras": "dpm++-karras",
        "uniform": "dpm++",
        "normal": "dpm++",
        "sgm_uniform": "dpm++-trailing",
    },  # fmt: skip
    "LCM": {"automatic": "lcm"},
    "TCD": {"automatic": "tcd"},
}
SAMPLER_ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a",
                   "k_dpmpp_2m": "DPM++ 2M", "DPM++ 2M Karras": "DPM++ 2M"}  # fmt: skip
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "normal": "Normal", "karras": "Karras",
                   "sgm_uniform": "SGM Uniform"}  # fmt: skip
# Fields of A1111's requests that ask for work faceid does not do: refused when set, with what to leave out.
NOT_HONOURED = {
    "enable_hr": "hires fix (enable_hr): generate at the size you want, or upscale the image elsewhere",
    "restore_faces": "face restoration (restore_faces)",
    "tiling": "tiling",
    "styles": "prompt styles (styles): put the style's words in the prompt",
    "script_name": "scripts (script_name)",
    "subseed_strength": "variation seeds (subseed_strength)",
    "s_churn": "s_churn",
}


class A1111Error(Exception):
    """An error in A1111's shape: ``{"error", "detail", "body", "errors"}``."""

    def __init__(self, status: int, message: str, error: str = "HTTPException", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error, self.headers = status, message, error, headers

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.message, "body": "", "errors": self.message}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class A1111ErrorBody(BaseModel):
    error: str
    detail: str
    body: str
    errors: str


class A1111Route(DocumentedRoute):
    """Its errors declared in A1111's shape."""

    error_model = A1111ErrorBody


class A1111Request(BaseModel):
    """The fields of ``txt2img`` and ``img2img`` that faceid reads; A1111's others are accepted and ignored unless
    they ask for work faceid does not do (``NOT_HONOURED``)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: a random one; image i gets seed + i")
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    eta: float | None = None
    override_settings: dict[str, Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    # img2img
    init_images: list[str] | None = None
    denoising_strength: float | None = Field(None, ge=0, le=1)
    mask: str | None = None
    inpainting_mask_invert: int = 0


class ImagesAnswer(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with the settings that reproduce it in its text chunks")
    parameters: dict[str, Any] = Field(description="the request, as received (without its images)")
    info: str = Field(description="a JSON string, as A1111 writes it: seeds, prompts, size, sampler, infotexts")


class Checkpoint(BaseModel):
    title: str = Field(description="what sd_model_checkpoint takes: the identity's name and its id's start")
    model_name: str
    hash: str
    sha256: str
    filename: str
    config: None = None


def body_limits(config) -> dict[str, int]:
    """The body size ``txt2img`` and ``img2img`` may have: their images as base64 (4/3 of their bytes), as many
    as a request can carry (the face photos of an identity, an init image and a mask), plus the JSON around them."""
    images = (config.max_photos + 2) * config.max_upload_bytes
    limit = images * 4 // 3 + 1024 * 1024
    return {f"{PREFIX}/txt2img": limit, f"{PREFIX}/img2img": limit}


basic = HTTPBasic(auto_error=False, description="any user name; the password is one of the server's API keys")
bearer = HTTPBearer(auto_error=False, description="one of the server's API keys")


def owner(
    request: Request,
    _basic: Annotated[HTTPBasicCredentials | None, Depends(basic)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The owner, from HTTP basic auth (the key as password: what A1111 clients send) or a bearer token. (The two
    schemes are parameters so that the schema states them; the header is read here, one answer for both.)"""
    header = request.headers.get("authorization", "")
    key = None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            key = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            key = None
    elif scheme.lower() == "bearer":
        key = value.strip()
    found = request.app.state.service.config.owner_of(key or None)
    if found is None:
        raise A1111Error(
            401,
            "this server needs an API key: give it as the password of HTTP basic auth (any user name), as A1111 "
            "clients send one, or as 'Authorization: Bearer KEY'",
            headers={"WWW-Authenticate": 'Basic realm="faceid"'},
        )
    return found


Owner = Annotated[str, Depends(owner)]


def install(app, service: Service) -> None:
    """Add the A1111 routes (and ``/internal/ping``) to ``app``, with A1111's error shape under ``/sdapi/``."""
    app.include_router(router(service))

    async def a1111_error(request: Request, exc: A1111Error) -> JSONResponse:
        return exc.response()

    app.add_exception_handler(A1111Error, a1111_error)


def _error_body(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    """A faceid error (made outside these routes: validation, body limits, Host and Origin checks, unknown paths...)
    in A1111's shape, with its status."""
    return status, {"error": code, "detail": message, "body": "", "errors": message}


SHAPES = (Shape(PREFIX + "/", _error_body), Shape("/internal/", _error_body))


class InFlight:
    """The jobs each owner's A1111 requests are waiting on, for ``/progress`` and ``/interrupt`` (which speak of
    "the" current job, as A1111 runs one at a time)."""

    def __init__(self) -> None:
        self._jobs: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, owner: str, job_id: str) -> None:
        with self._lock:
            self._jobs.setdefault(owner, []).append(job_id)

    def remove(self, owner: str, job_id: str) -> None:
        with self._lock:
            self._jobs.get(owner, []).remove(job_id)

    def of(self, owner: str) -> list[str]:
        with self._lock:
            return list(self._jobs.get(owner, ()))


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["a1111"], route_class=A1111Route)
    inflight = InFlight()

    @api.get(f"{PREFIX}/sd-models", response_model=list[Checkpoint], operation_id="a1111_list_checkpoints")
    def list_checkpoints(who: Owner) -> list[Checkpoint]:
        """The caller's identities, one "checkpoint" each: ``sd_model_checkpoint`` picks the person to draw."""
        return [_checkpoint(identity) for identity in service.identities(who)]

    @api.get(f"{PREFIX}/options", operation_id="a1111_get_options")
    def get_options(who: Owner) -> dict[str, Any]:
        """The options A1111 clients read: ``sd_model_checkpoint`` (the person; null when none is picked)."""
        identity = _picked(service, who)
        return {
            CHECKPOINT: _checkpoint(identity).title if identity else None,
            "sd_checkpoint_hash": identity.id if identity else None,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
        }

    @api.post(f"{PREFIX}/options", operation_id="a1111_set_options", responses=errors(404, model=A1111ErrorBody))
    def set_options(options: dict[str, Any], who: Owner) -> None:
        """Set ``sd_model_checkpoint`` (an identity's title, name or id) for this key's later requests; A1111's
        other options are accepted and ignored, as A1111 ignores options it does not know."""
        if CHECKPOINT in options:
            identity = _identity(service, who, options[CHECKPOINT])
            service.store.set_option(who, CHECKPOINT, identity.id)

    @api.get(f"{PREFIX}/samplers", operation_id="a1111_list_samplers")
    def samplers(who: Owner) -> list[dict[str, Any]]:
        """The samplers this server has (A1111's names)."""
        aliases = {name: [a for a, to in SAMPLER_ALIASES.items() if to == name] for name in SAMPLERS}
        return [{"name": name, "aliases": aliases[name], "options": {}} for name in SAMPLERS]

    @api.get(f"{PREFIX}/schedulers", operation_id="a1111_list_schedulers")
    def schedulers(who: Owner) -> list[dict[str, Any]]:
        """The schedule types this server has (with at least one of its samplers)."""
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in SCHEDULE_LABELS.items()]  # fmt: skip

    @api.get(f"{PREFIX}/scripts", operation_id="a1111_list_scripts")
    def scripts(who: Owner) -> dict[str, list[str]]:
        """The always-on scripts: ControlNet (its IP-Adapter FaceID units carry a face photo)."""
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    for path, empty in (("sd-vae", []), ("loras", []), ("prompt-styles", []), ("upscalers", []),
                        ("latent-upscale-modes", []), ("embeddings", {"loaded": {}, "skipped": {}})):  # fmt: skip
        api.add_api_route(
            f"{PREFIX}/{path}",
            _nothing(empty),
            methods=["GET"],
            operation_id=f"a1111_list_{path.replace('-', '_')}",
            summary=f"{path}: none here",
            description="faceid has none of these; clients that list them get an empty answer.",
        )

    @api.get("/internal/ping", operation_id="a1111_ping")
    def ping(who: Owner) -> dict[str, Any]:
        """A1111's liveness check (SillyTavern calls it)."""
        return {}

    @api.get(f"{PREFIX}/progress", operation_id="a1111_progress")
    def progress(who: Owner) -> dict[str, Any]:
        """The caller's current A1111 request: the fraction of its steps done, its step, how many are waiting."""
        jobs = inflight.of(who)
        step, total, started = 0, 0, None
        for job_id in jobs[:1]:
            view = service.job_view(job_id, who)
            step, total = view["progress"]["step"], view["progress"]["total"] or 0
            started = view["started"]
        fraction = step / total if total else 0.0
        elapsed = time.time() - started if started else 0.0
        return {
            "progress": fraction,
            "eta_relative": elapsed / fraction - elapsed if fraction else 0.0,
            "state": {
                "skipped": False,
                "interrupted": False,
                "job": jobs[0] if jobs else "",
                "job_count": len(jobs),
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": step,
                "sampling_steps": total,
            },  # fmt: skip
            "current_image": None,
            "textinfo": None,
        }

    @api.post(f"{PREFIX}/interrupt", operation_id="a1111_interrupt")
    def interrupt(who: Owner) -> dict[str, Any]:
        """Cancel the caller's waiting A1111 requests (a running job stops at its next step); they answer 500."""
        for job_id in inflight.of(who):
            try:
                service.cancel(job_id, who)
            except (Conflict, NotFound):
                pass  # it just finished
        return {}

    generating = errors(400, 404, 429, 504, model=A1111ErrorBody)

    @api.post(f"{PREFIX}/txt2img", response_model=ImagesAnswer, operation_id="a1111_txt2img", responses=generating)
    def txt2img(body: A1111Request, who: Owner) -> ImagesAnswer:
        """Images of the person (``sd_model_checkpoint``, or a ControlNet IP-Adapter FaceID unit's photo)."""
        return _generate(service, inflight, who, body, image_to_image=False)

    @api.post(f"{PREFIX}/img2img", response_model=ImagesAnswer, operation_id="a1111_img2img", responses=generating)
    def img2img(body: A1111Request, who: Owner) -> ImagesAnswer:
        """``init_images[0]`` redrawn with the person (``denoising_strength``); with ``mask``: only where the mask
        is white (``inpainting_mask_invert``: 1 for black), inpainting."""
        return _generate(service, inflight, who, body, image_to_image=True)

    return api


def _nothing(empty):
    def handler(who: Owner) -> Any:
        return empty

    return handler


def _checkpoint(identity) -> Checkpoint:
    name = identity.name or identity.id
    return Checkpoint(title=f"{name} [{identity.id[:10]}]", model_name=name, hash=identity.id[:10],
                      sha256=identity.id, filename=f"identities/{identity.id}")  # fmt: skip


def _identity(service: Service, owner: str, wanted: Any):
    """An identity by checkpoint title, name or id (case-insensitively, as clients lower-case names)."""
    text = str(wanted).strip()
    identities = service.identities(owner)
    for key in (lambda i: i.id, lambda i: _checkpoint(i).title.lower(), lambda i: (i.name or "").lower()):
        found = [i for i in identities if key(i) == text.lower() or key(i) == text]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise A1111Error(422, f"{CHECKPOINT} {text[:80]!r} names {len(found)} identities: give its title or id "
                             "(GET /sdapi/v1/sd-models lists them)")  # fmt: skip
    raise A1111Error(
        404,
        f"{CHECKPOINT} {text[:80]!r}: no such identity; GET /sdapi/v1/sd-models lists yours (POST /v1/identities "
        "enrolls a person, or send a face photo as a ControlNet ip-adapter_face_id unit)",
    )


def _picked(service: Service, owner: str):
    """The identity this key picked with ``sd_model_checkpoint`` (None: none, or it was deleted since)."""
    identity_id = service.store.option(owner, CHECKPOINT)
    if identity_id is None or not is_id(identity_id):
        return None
    return service.store.identity(identity_id, owner)


def _scheduler(body: A1111Request) -> tuple[str | None, str | None]:
    """(faceid's scheduler, A1111's sampler name) for the request; (None, None): the model's default."""
    name = body.sampler_name or body.sampler_index
    if not name:
        return None, None
    sampler = SAMPLER_ALIASES.get(name, name)
    if sampler not in SAMPLERS:
        raise A1111Error(422, f"sampler {name[:60]!r}: this server has {', '.join(SAMPLERS)} "
                         "(GET /sdapi/v1/samplers)")  # fmt: skip
    schedule = (body.scheduler or "automatic").lower().replace(" ", "_")
    if name == "DPM++ 2M Karras" and schedule == "automatic":
        schedule = "karras"
    if schedule not in SAMPLERS[sampler]:
        raise A1111Error(422, f"scheduler {body.scheduler!r} with sampler {sampler!r}: this server has "
                         f"{', '.join(SAMPLERS[sampler])} for it")  # fmt: skip
    return SAMPLERS[sampler][schedule], sampler


def _image_bytes(value: Any, what: str) -> bytes:
    """A1111's base64 image (raw, or a data URL), as bytes."""
    if not isinstance(value, str) or not value:
        raise A1111Error(422, f"{what}: give the image as a base64 string (raw, or a data: URL)")
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise A1111Error(422, f"{what}: not base64; give the image as a base64 string (raw, or a data: URL)") from None


def _face_units(body: A1111Request, service: Service) -> tuple[list[tuple[str, bytes, dict]], tuple | None]:
    """The ControlNet units that carry a face (label, photo bytes, unit), and InstantID's keypoints unit (label,
    photo bytes or None, unit) if one is given; any other enabled unit is refused."""
    scripts = {key.lower(): value for key, value in (body.alwayson_scripts or {}).items()}
    units = (scripts.get("controlnet") or {}).get("args") or []
    faces, keypoints = [], None
    for k, unit in enumerate(units):
        if not isinstance(unit, dict):
            raise A1111Error(422, f"ControlNet unit {k}: give each unit as an object (module, image, weight...)")
        if not unit.get("enabled", True):
            continue
        module = str(unit.get("module", "none"))
        if module not in FACE_MODULES and module != KEYPOINTS_MODULE:
            raise A1111Error(
                422,
                f"ControlNet unit {k}: module {module[:60]!r} is not one this server runs over the A1111 API: it "
                f"takes the face units {', '.join(FACE_MODULES)} (the person's photo as the unit's image) and "
                f"InstantID's {KEYPOINTS_MODULE}",
            )
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):
            image = image.get("image")
        label = f"ControlNet unit {k} image"
        if module == KEYPOINTS_MODULE:
            if keypoints is not None:
                raise A1111Error(422, f"ControlNet unit {k}: one {KEYPOINTS_MODULE} unit per request")
            keypoints = (label, None if image is None else _image_bytes(image, label), unit)
            continue
        plus = _server_is_plus(service) if FACE_MODULES[module][0] == "faceid" else None
        if plus is not None and FACE_MODULES[module][1] != plus:
            runs = "a FaceID-Plus adapter: use ip-adapter_face_id_plus" if plus else "a FaceID adapter without CLIP " \
                "features: use ip-adapter_face_id"  # fmt: skip
            raise A1111Error(
                422, f"ControlNet unit {k}: module {module} needs another adapter; this server runs {runs}"
            )
        faces.append((label, _image_bytes(image, label), unit))
    return faces, keypoints


def _method(faces: list[tuple[str, bytes, dict]], keypoints: tuple | None) -> str | None:
    """The identity method the units ask for (None: none named, the server's default); units of two methods are
    refused."""
    methods = {FACE_MODULES[str(unit.get("module"))][0] for _, _, unit in faces}
    if keypoints is not None:
        methods.add("instantid")
    if len(methods) > 1:
        raise A1111Error(
            422,
            f"the ControlNet units ask for several identity methods ({', '.join(sorted(methods))}): one per request",
        )
    return methods.pop() if methods else None


def _server_is_plus(service: Service) -> bool | None:
    """Whether the default model set's adapter reads CLIP features (Plus); None when this process has no model."""
    try:
        return service.pipeline.adapter.spec.perceiver is not None
    except (FaceIDError, AttributeError):
        return None


def _generate(service: Service, inflight: InFlight, owner: str, body: A1111Request,
              image_to_image: bool) -> ImagesAnswer:  # fmt: skip
    with _a1111_errors():
        for field, what in NOT_HONOURED.items():
            if getattr(body, "model_extra", {}).get(field):
                raise A1111Error(422, f"{what} is not something this server does: leave {field} out (or false)")
        scheduler, sampler = _scheduler(body)
        settings: dict[str, Any] = {"prompt": body.prompt, "num_images_per_prompt": body.batch_size * body.n_iter}
        if body.negative_prompt:
            settings["negative_prompt"] = body.negative_prompt
        if body.seed != -1:
            settings["seed"] = body.seed
        for field, value in (("num_inference_steps", body.steps), ("guidance_scale", body.cfg_scale),
                             ("width", body.width), ("height", body.height), ("scheduler", scheduler)):  # fmt: skip
            if value is not None:
                settings[field] = value
        if scheduler in ("ddim", "ddim-trailing", "tcd") and body.eta is not None:
            settings["eta"] = body.eta  # A1111 reads eta for DDIM only (faceid: for the schedulers that take it)
        for field in ("width", "height"):
            if settings.get(field, 8) % 8:
                raise A1111Error(422, f"{field} {settings[field]}: give a multiple of 8")
        faces, keypoints = _face_units(body, service)
        method = _method(faces, keypoints)
        if method is not None:
            settings["method"] = method
        if keypoints is not None:
            if "weight" in keypoints[2]:
                settings["identitynet_scale"] = float(keypoints[2]["weight"])
            if faces and _window(keypoints[2]) not in (None, _window(faces[0][2])):
                raise A1111Error(422, f"{keypoints[0]}: IdentityNet acts in the identity's window: give the keypoints "
                                 "unit the face unit's guidance_start and guidance_end (or leave them at 0 and 1)")  # fmt: skip
        override = (body.override_settings or {}).get(CHECKPOINT)
        with oneshot.uploads(service, owner) as upload:
            if image_to_image:
                if not body.init_images:
                    raise A1111Error(422, "img2img: give init_images (one base64 image)")
                init = upload("init_images[0]", _image_bytes(body.init_images[0], "init_images[0]"))
                settings["init_image"] = init.id
                if body.denoising_strength is not None:
                    settings["strength"] = body.denoising_strength
                if body.mask:
                    settings["mask_image"] = upload("mask", _mask(body)).id
            if keypoints is not None and keypoints[1] is not None:
                settings["kps"] = upload(keypoints[0], keypoints[1]).id
            if keypoints is not None and not faces and (window := _window(keypoints[2])) is not None:
                settings["identity_window"] = window
            if faces:
                window = _window(faces[0][2])
                if window is not None:
                    settings["identity_window"] = window
                if "weight" in faces[0][2]:
                    settings["scale"] = float(faces[0][2]["weight"])
                settings.update(_pulid_mode(faces[0][2]))
                with oneshot.person(service, owner, [(label, data) for label, data, _ in faces]) as identity:
                    view, image_ids = _run(service, inflight, owner, settings | {"identity_id": identity.id})
                name = "ControlNet face unit"
            else:
                identity = _identity(service, owner, override) if override else _picked(service, owner)
                if identity is None:
                    raise A1111Error(422, "no person: set sd_model_checkpoint (POST /sdapi/v1/options; GET "
                                     "/sdapi/v1/sd-models lists yours) or send a face photo as a ControlNet "
                                     "ip-adapter_face_id unit")  # fmt: skip
                view, image_ids = _run(service, inflight, owner, settings | {"identity_id": identity.id})
                name = _checkpoint(identity).title
        images = [base64.b64encode(service.image_path(i, owner).read_bytes()).decode() for i in image_ids]
        return ImagesAnswer(images=images, parameters=_parameters(body), info=json.dumps(_info(view, name, sampler)))


def _run(service: Service, inflight: InFlight, owner: str, request: dict[str, Any]):
    """``oneshot.run``, with the job known to ``/progress`` and ``/interrupt`` while it runs."""
    job, _ = service.submit(owner, request)
    inflight.add(owner, job.id)
    try:
        return oneshot.wait(service, owner, job.id)
    finally:
        inflight.remove(owner, job.id)


def _mask(body: A1111Request) -> bytes:
    """A1111's mask (white: redrawn, unless ``inpainting_mask_invert``) as faceid's (white: redrawn), a PNG."""
    data = _image_bytes(body.mask, "mask")
    if not body.inpainting_mask_invert:
        return data
    inverted = ImageOps.invert(load_image(data).convert("L"))
    out = io.BytesIO()
    inverted.save(out, format="PNG")
    return out.getvalue()


def _pulid_mode(unit: dict) -> dict[str, Any]:
    """A PuLID unit's ``pulid_mode`` as PuLID's settings (``PULID_MODES``); nothing when the unit has none or is
    not PuLID's (the extension sends its default, ``Fidelity``, with every unit)."""
    mode = unit.get("pulid_mode")
    if mode is None or FACE_MODULES[str(unit.get("module"))][0] != "pulid":
        return {}
    if mode not in PULID_MODES:
        raise A1111Error(422, f"pulid_mode {str(mode)[:40]!r}: give one of {', '.join(PULID_MODES)} (the ControlNet "
                         "extension's PuLID modes)")  # fmt: skip
    return PULID_MODES[mode]


def _window(unit: dict) -> tuple[float, float] | None:
    start, end = float(unit.get("guidance_start", 0.0)), float(unit.get("guidance_end", 1.0))
    return None if (start, end) == (0.0, 1.0) else (start, end)


def _parameters(body: A1111Request) -> dict[str, Any]:
    """The request as A1111 echoes it, its images left out (they can be megabytes)."""
    data = body.model_dump()
    data["init_images"] = None
    data["mask"] = None
    if data.get("alwayson_scripts"):
        data["alwayson_scripts"] = {"ControlNet": {"args": "(face photos not echoed)"}}
    return data


def _info(view: dict[str, Any], model_name: str, sampler: str | None) -> dict[str, Any]:
    """A1111's ``info`` for a finished generation: seeds, prompts, size, and one infotext per image."""
    s = view["settings"]
    seeds = list(s["seed"])
    prompt = s["prompt"]
    negative = s.get("negative_prompt") or ""
    sampler = sampler or s.get("scheduler") or "default"
    infotexts = []
    for seed in seeds:
        lines = [prompt]
        if negative:
            lines.append(f"Negative prompt: {negative}")
        lines.append(
            f"Steps: {s['num_inference_steps']}, Sampler: {sampler}, CFG scale: {s['guidance_scale']}, Seed: {seed}, "
            f"Size: {s['width']}x{s['height']}, Model: {model_name}, Version: faceid {__version__}"
        )
        infotexts.append("\n".join(lines))
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * len(seeds),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": s["width"],
        "height": s["height"],
        "sampler_name": sampler,
        "cfg_scale": s["guidance_scale"],
        "steps": s["num_inference_steps"],
        "batch_size": len(seeds),
        "restore_faces": False,
        "sd_model_name": model_name,
        "denoising_strength": s.get("strength"),
        "extra_generation_params": {"faceid generation": view["id"]},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(view["created"])),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"faceid {__version__}",
    }


@contextlib.contextmanager
def _a1111_errors() -> Iterator[None]:
    """The service's errors in A1111's shape, with the statuses ``/v1`` gives."""
    try:
        yield
    except A1111Error:
        raise
    except Exception as exc:
        error = oneshot.classify(exc)
        if error is None:
            raise
        raise A1111Error(error.status, error.message, error=error.code, headers=error.headers or None) from None
