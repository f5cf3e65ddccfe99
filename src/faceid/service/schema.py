"""What ``/openapi.json`` promises, kept true: the response models of every route, the one error body, binary
uploads and PNGs, and readable operation ids.

* ``ErrorBody``: every error is ``{"error": {"code", "message"}}``; ``DocumentedRoute`` declares it for each status a
  route can give, worked out from the route itself (401 when it takes the API key, 404 when its path names
  something, 422 when it reads parameters or a body, 400 and 413 for a body, 403 and 500 everywhere) plus the
  ones only its body knows (``errors(400, 409, 429)``). FastAPI's ``HTTPValidationError`` is never declared: it is not what a
  422 sends.
* ``BinaryFile``: an upload, typed ``type: string, format: binary`` (what client generators read as a file part).
* ``PNG``, ``EVENT_STREAM``, ``TEXT``: the non-JSON responses.
* ``operation_id``: a route's operation id is its function's name (``create_generation``, ``get_image``...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, WithJsonSchema, model_serializer

from ..settings import GenerationSettings
from .core import crop_url, upload_url
from .inputs import JobInputs


# ---------------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    code: str = Field(
        description="what went wrong, for programs: bad_request, bad_image, unauthorized, not_found, conflict, "
        "limit_exceeded, invalid_request, no_face, queue_full, internal_error..."
    )
    message: str = Field(description="what went wrong and what to do about it, for people")


class ErrorBody(BaseModel):
    """Every error the API sends."""

    error: ErrorDetail


ERROR_STATUSES: dict[int, str] = {
    400: "the body cannot be read: not UTF-8 JSON, or broken multipart (code bad_request); or an uploaded file "
    "is not an image this server reads (code bad_image)",
    401: "this server needs an API key: send 'Authorization: Bearer KEY' (code unauthorized)",
    403: "refused: a Host the server does not answer to, or a write from another origin",
    404: "no such thing for this key: an unknown id, or another key's (code not_found)",
    409: "not in a state that allows it, e.g. cancelling a finished generation (code conflict)",
    413: "too large: the request body or an upload (code limit_exceeded)",
    422: "invalid request: the message names each field at fault and what it takes",
    429: "too many: the queue is full (header Retry-After) or a quota is used up",
    500: "internal error; the server log has the details (code internal_error)",
    504: "the images took longer than this server waits for them (--sync-timeout): the job was cancelled",
}


def errors(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries declaring ``model`` (``ErrorBody``, or a protocol's own) for ``statuses``."""
    return {status: {"model": model, "description": ERROR_STATUSES[status]} for status in statuses}


def _takes_key(dependant: Dependant) -> bool:
    return any(isinstance(d.call, SecurityBase) or _takes_key(d) for d in dependant.dependencies)


def _reads_input(dependant: Dependant) -> bool:
    if dependant.path_params or dependant.query_params or dependant.header_params or dependant.body_params:
        return True
    return any(_reads_input(d) for d in dependant.dependencies if not isinstance(d.call, SecurityBase))


class DocumentedRoute(APIRoute):
    """A route whose OpenAPI ``responses`` declare ``ErrorBody`` for every status it can give: the ones its shape
    implies (see the module's docstring) and those given by ``responses=errors(...)``. A protocol that answers in
    its own error shape (the OpenAI and A1111 APIs) subclasses it with its ``error_model`` and the status it gives an
    invalid request (``invalid_status``: OpenAI's is 400)."""

    error_model: type[BaseModel] = ErrorBody
    invalid_status = 422

    def __init__(self, path: str, endpoint: Any, *, responses: dict | None = None, **kwargs: Any) -> None:
        dependant = get_dependant(path=path, call=endpoint)
        statuses = {403, 500}
        if _takes_key(dependant):
            statuses.add(401)
        if dependant.path_params:
            statuses.add(404)
        if _reads_input(dependant):
            statuses.add(self.invalid_status)
        if {"POST", "PUT", "PATCH"} & set(kwargs.get("methods") or ()):
            statuses.add(413)  # the body limit (BodyLimit) applies to every write
        if dependant.body_params:
            statuses.add(400)  # a body that cannot be parsed
        declared = errors(*sorted(statuses), model=self.error_model)
        super().__init__(path, endpoint, responses={**declared, **(responses or {})}, **kwargs)


def operation_id(route: APIRoute) -> str:
    """A route's operation id: its function's name (FastAPI's default appends the path and method)."""
    return route.name


# ---------------------------------------------------------------------------------------------- non-JSON bodies
# An uploaded file. FastAPI types UploadFile as a string with contentMediaType only, which client generators read
# as a text part; "format: binary" is what OpenAPI 3 names a file.
BinaryFile = Annotated[
    UploadFile, WithJsonSchema({"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"})
]
_BINARY = {"type": "string", "format": "binary"}
PNG: dict[int | str, dict[str, Any]] = {
    200: {"description": "a PNG image", "content": {"image/png": {"schema": _BINARY}}}
}
EVENT_KINDS = ["queued", "progress", "preview", "done", "failed", "cancelled"]
# Server-sent events, each an "event: KIND" line and a "data: JSON" line; the schema is one event's.
EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "server-sent events: queued, progress (each step), preview (with --preview-every), then one "
        "of done, failed, cancelled",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": EVENT_KINDS},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "description": "a JSON object: queued {queue_position}, progress {step, total}, preview "
                            "{step, total, images, image_index}, done {status, images}, failed {status, error}, "
                            "cancelled {status}",
                        },
                    },
                }
            }
        },
    }
}
TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


# ---------------------------------------------------------------------------------------------- views
class View(BaseModel):
    """A response body. A key the model does not declare is an error (a 500 and a failing test), never dropped."""

    model_config = ConfigDict(extra="forbid")


def _without_none(value: BaseModel, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
    """What ``to_json()`` stores (``exclude_none``): the fields left ``None`` omitted, in the nested models too (every
    mapping in these settings and inputs is a model's, none holds a ``None`` that means something)."""

    def prune(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: prune(v) for key, v in item.items() if v is not None}
        if isinstance(item, list | tuple):
            return [prune(v) for v in item]
        return item

    return prune(handler(value))


class JobSettings(GenerationSettings):
    """A generation's ``GenerationSettings`` as the server stores and shows them: ``to_json()``, the fields left
    unset (``None``) omitted, every default the server resolved filled in; only the fields the stored record holds
    (a record that cannot be read shows ``{}``, not defaults it never had)."""

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):
        return {key: v for key, v in _without_none(self, handler).items() if key in self.model_fields_set}


class JobInputsView(JobInputs):
    """A generation's inputs as requested (``JobInputs``, by upload and identity id), unset fields omitted."""

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):
        return _without_none(self, handler)


class FaceView(View):
    k: int = Field(description="the photo's place among the identity's photos")
    box: list[float] = Field(description="the face's box in the photo: x1, y1, x2, y2 (pixels)")
    score: float = Field(description="the detector's confidence")
    faces_found: int = Field(description="faces in the photo (the largest is used)")
    crop_url: str = Field(description="the aligned 112x112 face (PNG)")


class IdentityView(View):
    id: str
    name: str | None
    created: float = Field(description="when it was enrolled (Unix time)")
    faces: list[FaceView]
    warnings: list[str] = Field([], description="what may spoil it (small or several faces), at enrollment")


class Progress(View):
    step: int = Field(description="denoising steps done")
    total: int | None = Field(description="denoising steps in all")


class PersonScore(View):
    identity_id: str
    similarity: float = Field(description="cosine similarity of the face and the person's embedding, in [-1, 1]")
    no_face: bool = Field(description="no face of the image is this person's (similarity 0)")


class ImageScore(View):
    recognizer: str = Field(description="the recognizer that measured it (arcface: buffalo_l's, as faceid score)")
    similarity: float = Field(description="the person's similarity; with several people, the weakest one's")
    people: list[PersonScore]


class JobView(View):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    queue_position: int | None = Field(description="jobs ahead of this one (0: next); None unless queued")
    progress: Progress
    images: list[str] = Field(description="URLs of the PNGs, once done")
    scores: list[ImageScore | None] = Field(
        description="how much each image looks like its person, by the server's recognizer (faceid score's "
        "similarity; None: not scored)"
    )
    image_index: list[int] = Field(
        description="each image's place among those the generation made: its seed is settings.seed[i], its prompt "
        "i // num_images_per_prompt (it stays when other images are deleted)"
    )
    identity_ids: list[str] = Field(
        description="the identity of each prompt; with inputs.people, those people (in every picture)"
    )
    mode: str = Field(description="text-to-image, img2img, inpaint, controlnet (+img2img, +inpaint) or swap")
    inputs: JobInputsView = Field(
        description="its input images by upload id, people, regions and style references, as requested (JobInputs); "
        "settings.regions and settings.style record what the library made of them"
    )
    control_images: list[str] = Field(
        description="URLs of the control images its ControlNets saw (at the output's size), once done"
    )
    settings: JobSettings = Field(description="the GenerationSettings it runs with, every default resolved")
    error: str | None = Field(description="why it failed")
    created: float = Field(description="when it was submitted (Unix time)")
    started: float | None
    finished: float | None


class UploadView(View):
    id: str
    name: str | None = Field(description="the uploaded file's name")
    width: int = Field(description="upright (its EXIF orientation applied), as generation reads it")
    height: int
    created: float
    url: str = Field(description="the image (PNG)")


class GenerationPage(View):
    generations: list[JobView] = Field(description="newest first")
    next_cursor: str | None = Field(description="the next page's ?cursor=; None on the last page")


class JobAccepted(View):
    id: str
    status: Literal["queued"]
    queue_position: int | None = Field(description="jobs ahead of this one (0: next)")
    url: str = Field(description="GET it for the generation's status and images")
    events_url: str = Field(description="its server-sent events")


class Memory(View):
    budget_bytes: int | None = Field(description="what the worker's models may take (None: no budget)")
    used_bytes: int = Field(description="what its loaded models take")


class WorkerView(View):
    """A worker (a device, or Ray Serve's replicas), and once loaded what it runs."""

    device: str
    loaded: bool = Field(description="its pipeline is loaded")
    error: str | None = Field(description="why it could not load")
    loaded_models: list[int] | None = Field(
        None, description="catalog indexes of the model sets it holds, least recently used first"
    )
    memory: Memory | None = None
    dtype: str | None = None
    family: str | None = Field(None, description="the base model family it last ran (SD1.5, SDXL...)")
    base_model: str | None = None
    adapter: str | None = None
    vae: str | None = None
    variant: str | None = Field(None, description="the adapter's variant (None: a model set without one, FLUX.1)")
    loras: Any = Field(None, description="the LoRA files on its pipeline")
    default_method: str | None = Field(None, description="the identity method of a request that names none")
    offload: str | None = Field(
        None, description="FLUX.1: its models offloaded to the CPU between uses (model, sequential)"
    )
    quantize: str | None = Field(None, description="FLUX.1: its 8-bit weights (int8, fp8)")


class FamilyDefaults(View):
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


class MethodView(View):
    """An identity method a model set runs (``GenerationSettings.method``; ``faceid.methods.METHODS``)."""

    name: str = Field(description="what a request's method names")
    title: str
    licence: str = Field(description="the licences of its weights and of the face models it needs")
    commercial: bool = Field(description="whether everything it loads allows commercial use")
    face_pack: str = Field(description="the insightface pack that embeds the face for it (buffalo_l, antelopev2)")
    defaults: dict[str, float | int | str] = Field(
        description="the settings it brings when the request leaves them open (InstantID: scale, identitynet_scale; "
        "PuLID: scale, pulid_num_zero, pulid_ortho; PuLID-FLUX: scale, true_cfg_start)"
    )


class CatalogEntry(JobSettings):
    """A model set this server serves: its model fields (a request names it by them) as ``GenerationSettings``
    (with the settings' own defaults), its family and its family's defaults."""

    index: int = Field(description="its place in the catalog (0: the default)")
    family: str = Field(description="its base model family (SD1.5, SDXL...)")
    defaults: FamilyDefaults = Field(description="its family's size, steps and guidance")
    loaded_on: list[str] = Field(description="the workers that hold it now")
    methods: list[MethodView] = Field(
        description="the identity methods a request may name (method) on this model set, faceid first"
    )
    default_method: str = Field(description="the method of a request that names none (FLUX.1: the one it loaded)")
    controlnets: dict[str, str] = Field(
        description="the control kinds a request may give it (controls[].kind): the server's ControlNet of each kind "
        "made for its family, by source"
    )
    faceid_adapter: bool = Field(description="whether it has a FaceID adapter (False: FLUX.1, its methods only)")
    negative_prompt: bool = Field(description="whether it takes a negative prompt (False: FLUX.1's embedded guidance)")


class FastPresetView(View):
    title: str
    families: list[str] = Field(description="the model families it exists for (sd15, sdxl)")
    num_inference_steps: int = Field(description="what it sets when the request leaves it open")
    scheduler: str
    guidance_scale: float
    eta: float | None = Field(
        None, exclude_if=lambda v: v is None, description="its scheduler's eta (presets that set one)"
    )


class LimitsView(View):
    """The server's limits (faceid serve --max-*): a request beyond one is refused, with what to change."""

    max_steps: int
    max_side: int = Field(description="pixels, width and height")
    max_images: int = Field(description="images per request")
    max_batch: int = Field(description="images per pipeline call when compatible jobs run together")
    max_upload_bytes: int = Field(description="per uploaded image")
    max_photos: int = Field(description="per identity")


class ModelsView(View):
    """``GET /v1/models``: what the server runs. A new capability is a field here."""

    configured: dict[str, Any] = Field(description="what the server was started with")
    workers: list[WorkerView]
    defaults: JobSettings | None = Field(description="the default model set's defaults (None until it is loaded)")
    catalog: list[CatalogEntry] = Field(description="the model sets a request may name (base_model, adapter...)")
    modes: list[str] = Field(description="what a generation can do: text-to-image, img2img, inpaint, ...")
    controlnets: dict[str, str] = Field(
        description="ControlNet by control kind (controls[].kind): its source, or with one per family several as "
        "'FAMILY: SOURCE; ...' (catalog[].controlnets: the kinds each model set runs)"
    )
    style_adapters: dict[str, str] = Field(description="style adapters by name (style[].adapter)")
    max_people: int = Field(description="people in one picture (inputs.people)")
    fast: dict[str, FastPresetView] = Field(description="the few-step presets loaded (the request's fast)")
    decoders: list[Literal["full", "tiny"]] = Field(description="what may decode the image (the request's decoder)")
    annotators: list[str] = Field(description="annotator models loaded for the control kinds (openpose, depth)")
    speech: str | None = Field(description="the speech model that transcribes spoken prompts (None: none)")
    limits: LimitsView


class HealthView(View):
    status: Literal["ok", "loading", "error"] = Field(
        description="ok: a worker runs; loading: still loading; error: none could load"
    )
    version: str
    workers: int
    workers_loaded: int
    queue_depth: int = Field(description="queued generations")
    running: int = Field(description="running generations")
    authenticated: bool = Field(description="the server needs API keys")


def upload_view(upload) -> UploadView:
    return UploadView(
        id=upload.id,
        name=upload.name,
        width=upload.width,
        height=upload.height,
        created=upload.created,
        url=upload_url(upload.id),
    )


def identity_view(identity, warnings: list[str] = ()) -> IdentityView:
    return IdentityView(
        id=identity.id,
        name=identity.name,
        created=identity.created,
        faces=[
            FaceView(k=f.k, box=f.box, score=f.score, faces_found=f.faces_found, crop_url=crop_url(identity.id, f.k))
            for f in identity.faces
        ],
        warnings=list(warnings),
    )


def drop_undeclared_422(app) -> None:
    """FastAPI declares its ``HTTPValidationError`` 422 on every route that reads input and declares no 422 itself.
    Every route of this app that can send a 422 declares it (``DocumentedRoute``); one that does not answers an
    invalid request with another status (the OpenAI API's 400) and never sends FastAPI's: those are removed from
    ``app``'s schema, and the components with them."""
    import json

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for methods in schema["paths"].values():
            for operation in methods.values():
                if "HTTPValidationError" in json.dumps(operation["responses"].get("422", {})):
                    del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
