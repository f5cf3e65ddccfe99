"""The OpenAI Images API over the job service, at ``/openai/v1``: what a client's ``base_url`` is set to.

The tools people already make images with (Open WebUI, LibreChat, the ``openai`` package, countless scripts) speak
this protocol. Here a *model* is a person: ``GET /models`` lists the caller's identities, and
``POST /images/generations`` with ``model`` = an identity's name (or id) makes images of them.
``POST /images/edits`` takes photos instead: without a mask it makes images of the person in them (no enrollment
kept), with a mask it redraws the masked area of the first photo with that person (inpainting).

Every request goes through ``Service`` as a ``/v1`` generation does (the same keys, limits, queue, batching and
capabilities); the request waits for its job and answers in OpenAI's shapes: ``{"created", "data": [...]}``, and
errors as ``{"error": {"message", "type", "code", "param"}}``. Fields OpenAI's own server ignores for a model
(``style``, ``user``, ``moderation``...) are ignored here too; a value faceid cannot honour is a 400 that says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from . import oneshot
from .core import Service
from .error_shapes import Shape
from .errors import NotFound
from .files import is_id
from .schema import PNG, BinaryFile, DocumentedRoute, errors

PREFIX = "/openai/v1"
URL_LIFETIME = 3600  # seconds a response_format=url link stays valid (OpenAI's: 60 minutes)
# OpenAI's quality names -> the fraction of the model's default steps (within the server's --max-steps).
QUALITY_STEPS = {"auto": 1.0, "standard": 1.0, "medium": 1.0, "low": 0.5, "high": 1.5, "hd": 1.5}
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIError(Exception):
    """An error in OpenAI's shape: ``type`` is OpenAI's class of error, ``code`` its machine-readable reason."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class OpenAIErrorBody(BaseModel):
    """Every error of the OpenAI API, in OpenAI's shape."""

    class Detail(BaseModel):
        message: str
        type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error")
        code: str | None
        param: str | None

    error: Detail


class OpenAIRoute(DocumentedRoute):
    """Its errors declared in OpenAI's shape; an invalid request is a 400, as OpenAI answers one."""

    error_model = OpenAIErrorBody
    invalid_status = 400


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the image, base64 (response_format b64_json)")
    url: str | None = Field(None, description=f"a link to the image, valid {URL_LIFETIME // 60} minutes without a key")
    revised_prompt: str | None = Field(None, description="the prompt the image was made from")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time")
    data: list[ImageData]


class Transcription(BaseModel):
    text: str


class ModelObject(BaseModel):
    id: str = Field(description="the identity's name (its id when it has no name, or when the name is not unique)")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "faceid"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ImageGenerationRequest(BaseModel):
    """``POST /images/generations``: OpenAI's fields; the ones this server has no use for are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the person: an identity's name or id (GET /openai/v1/models lists them)")
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description='"WIDTHxHEIGHT" (multiples of 8) or "auto": the model\'s default')
    quality: str | None = Field(None, description="auto, standard, medium (the default steps), low (half), high or "
                                "hd (1.5 times), within the server's step limit")  # fmt: skip
    response_format: Literal["b64_json", "url"] | None = Field(None, description="default url")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp quality")
    user: str | None = Field(None, description="ignored")
    method: str | None = Field(
        None, max_length=40, description="faceid's own field (an OpenAI client sends it in extra_body): the identity "
        "method, one GET /v1/models lists for the model set (faceid, instantid...); default faceid"
    )  # fmt: skip


bearer = HTTPBearer(auto_error=False, description="one of the server's API keys (an OpenAI client's api_key)")


def owner(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The request's owner, as ``/v1`` finds it, or OpenAI's 401."""
    found = request.app.state.service.config.owner_of(credentials.credentials if credentials else None)
    if found is None:
        raise OpenAIError(
            401,
            "Incorrect API key provided: this server needs one of its API keys as the bearer token "
            "(the api_key of an OpenAI client)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


Owner = Annotated[str, Depends(owner)]


def install(app, service: Service) -> None:
    """Add the OpenAI routes to ``app`` (an app of ``create_app``), and OpenAI's error shape for every error under
    ``/openai/``: the route's own, and FastAPI's (an invalid body, an unknown path) that the app's handlers would
    answer in faceid's shape."""
    app.include_router(router(service))

    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    app.add_exception_handler(OpenAIError, openai_error)
    # an invalid request: OpenAI's 400 naming the parameter (ErrorShapes would give the 400 without it)
    app.add_exception_handler(RequestValidationError, _openai_shaped(app.exception_handlers[RequestValidationError]))


def _error_body(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    """A faceid error (made outside these routes: body limits, Host and Origin checks, unknown paths...) in OpenAI's
    shape: 400 for faceid's 422, OpenAI's type and code names."""
    status = 400 if status == 422 else status
    kind = {429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = {"unauthorized": "invalid_api_key", "queue_full": "rate_limit_exceeded"}.get(code, code)
    return status, {"error": {"message": message, "type": kind, "code": code, "param": None}}


SHAPE = Shape(PREFIX + "/", _error_body)


def _openai_shaped(faceid_handler):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if not request.url.path.startswith(PREFIX + "/"):
            return await faceid_handler(request, exc)
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "form")) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        return OpenAIError(400, f"invalid request: {message}", param=param).response()

    return handle


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["openai"], route_class=OpenAIRoute)
    signer = UrlSigner(service.config.data_dir / "url-secret")

    @api.get("/models", response_model=ModelList, operation_id="openai_list_models")
    def list_models(who: Owner) -> ModelList:
        """The caller's identities, one model each: a request's ``model`` names the person to draw."""
        with _openai_errors():
            identities = service.identities(who)
        names = [identity.name for identity in identities]
        return ModelList(
            data=[ModelObject(id=_model_id(identity, names), created=int(identity.created)) for identity in identities]
        )

    @api.post("/images/generations", response_model=ImagesResponse, operation_id="openai_create_image",
              responses=errors(404, 429, 504, model=OpenAIErrorBody))  # fmt: skip
    def create_image(body: ImageGenerationRequest, request: Request, who: Owner) -> ImagesResponse:
        """Images of the person ``model`` names, in the scene ``prompt`` asks for; waits for them."""
        with _openai_errors():
            identity = _identity(service, who, body.model)
            job = _settings(service, body.prompt, body.n, body.size, body.quality, body.method)
            job["identity_id"] = identity.id
            return _run(service, signer, request, who, job, body.response_format, body.output_format,
                        body.output_compression)  # fmt: skip

    @api.post("/images/edits", response_model=ImagesResponse, operation_id="openai_edit_image",
              responses=errors(429, 504, model=OpenAIErrorBody))  # fmt: skip
    async def edit_image(
        request: Request,
        who: Owner,
        prompt: Annotated[str, Form(min_length=1, max_length=4000)],
        image: Annotated[
            list[BinaryFile] | None,
            File(description="photos of the person (repeatable; also taken as image[], as some clients send several)"),
        ] = None,
        mask: Annotated[
            BinaryFile | None,
            File(description="redraw where it is transparent (alpha 0), in the first image, with the person"),
        ] = None,  # fmt: skip
        n: Annotated[int, Form(ge=1, le=10)] = 1,
        size: Annotated[str | None, Form()] = None,
        quality: Annotated[str | None, Form()] = None,
        response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
        output_format: Annotated[Literal["png", "jpeg", "webp"] | None, Form()] = None,
        output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
        method: Annotated[
            str | None, Form(max_length=40, description="faceid's own field: the identity method (default faceid)")
        ] = None,
    ) -> ImagesResponse:
        """Images of the person in ``image`` (one or more photos; nothing is kept after the answer). With ``mask``:
        the first image with its transparent area redrawn with that person (inpainting)."""
        # ``image[]``: the same field as some clients name it when they send several; read from the parsed form (a
        # parameter would put a second name for one field in the schema)
        photos = [*(image or ()), *(f for f in (await request.form()).getlist("image[]") if hasattr(f, "file"))]
        if not photos:
            raise OpenAIError(400, "give one or more photos of the person as 'image' (or 'image[]')", param="image")
        limit = service.config.max_upload_bytes
        read = [(f"image[{i}]" + (f" ({p.filename[:80]!r})" if p.filename else ""), await p.read(limit + 1))
                for i, p in enumerate(photos)]  # fmt: skip
        mask_bytes = await mask.read(limit + 1) if mask is not None else None

        def edit() -> ImagesResponse:
            with _openai_errors(), oneshot.person(service, who, read) as identity, oneshot.uploads(service, who) as add:
                job = _settings(service, prompt, n, size, quality, method) | {"identity_id": identity.id}
                if mask_bytes is not None:
                    init = add("openai edit image", read[0][1])
                    redraw = _redraw_mask(service, mask_bytes, (init.width, init.height))
                    job |= {"init_image": init.id, "mask_image": add("openai edit mask", redraw).id}
                return _run(service, signer, request, who, job, response_format, output_format, output_compression)

        return await run_in_threadpool(edit)

    @api.post("/audio/transcriptions", response_model=Transcription, operation_id="openai_create_transcription",
              responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})  # fmt: skip
    def create_transcription(
        who: Owner,
        file: Annotated[BinaryFile, File(description="a recording: wav, webm, ogg, mp3, m4a, flac...")],
        model: Annotated[str, Form(description="any name (whisper-1...): the server has one speech model")] = "",
        language: Annotated[str | None, Form(max_length=16, description="ISO-639-1 code; default: detected")] = None,
        prompt: Annotated[
            str | None, Form(max_length=2000, description="text that came before (names, spelling)")
        ] = None,
        response_format: Annotated[Literal["json", "text"], Form()] = "json",
        temperature: Annotated[float | None, Form(ge=0, le=0, description="0 only: decoding is greedy")] = None,
    ):
        """The text spoken in ``file``, by the server's speech model (``faceid serve --speech-model``): the web app's
        microphone button, or any OpenAI client's ``audio.transcriptions.create``."""
        with _openai_errors():
            text = service.transcribe(file.file.read(service.config.max_upload_bytes + 1), language, prompt)
        if response_format == "text":
            return PlainTextResponse(text)
        return Transcription(text=text)

    @api.get(
        "/images/{image_id}.png",
        response_class=FileResponse,
        responses=PNG,
        operation_id="openai_get_image",
    )
    def get_image(image_id: str, expires: int, signature: str) -> FileResponse:
        """A ``response_format=url`` link: the image, without a key, until ``expires`` (Unix time)."""
        if not signer.valid(image_id, expires, signature):
            raise OpenAIError(403, "this image link is not valid or has expired: ask for the image again",
                              code="invalid_link")  # fmt: skip
        path = service.data.image(image_id) if is_id(image_id) else None
        if path is None or not path.is_file():
            raise OpenAIError(404, f"no image {image_id}: it was deleted", code="not_found")
        return FileResponse(path, media_type="image/png")

    return api


def _model_id(identity, names: list) -> str:
    """An identity's model id: its name where that names it alone, else its id."""
    name = identity.name
    usable = name and names.count(name) == 1 and not is_id(name)
    return name if usable else identity.id


def _identity(service: Service, owner: str, model: str):
    if is_id(model):
        try:
            return service.identity(model, owner)
        except NotFound:
            pass
    found = [identity for identity in service.identities(owner) if identity.name == model]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise OpenAIError(400, f"model {model!r}: {len(found)} identities have this name; give the id of one "
                          "(GET /openai/v1/models lists them)", param="model")  # fmt: skip
    raise OpenAIError(
        404,
        f"The model {model!r} does not exist: a model here is an enrolled person (GET /openai/v1/models lists "
        "yours; POST /v1/identities enrolls one, or send photos to /openai/v1/images/edits)",
        code="model_not_found",
        param="model",
    )


def _settings(service: Service, prompt: str, n: int, size: str | None, quality: str | None,
              method: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's prompt, n, size and quality (and faceid's method) as a /v1 generation's fields."""
    settings: dict[str, Any] = {"prompt": prompt, "num_images_per_prompt": n}
    if method is not None:
        settings["method"] = method
    if size not in (None, "", "auto"):
        found = SIZE.fullmatch(size)
        if found is None:
            raise OpenAIError(400, f"size {size[:40]!r}: give WIDTHxHEIGHT (for example 1024x1024) or auto",
                              param="size")  # fmt: skip
        width, height = int(found[1]), int(found[2])
        if width % 8 or height % 8:
            raise OpenAIError(400, f"size {size}: width and height must be multiples of 8", param="size")
        settings |= {"width": width, "height": height}
    if quality is not None:
        if quality not in QUALITY_STEPS:
            raise OpenAIError(400, f"quality {quality[:40]!r}: give one of {', '.join(QUALITY_STEPS)}",
                              param="quality")  # fmt: skip
        if QUALITY_STEPS[quality] != 1.0:
            default = service.defaults.num_inference_steps
            steps = round(default * QUALITY_STEPS[quality])
            settings["num_inference_steps"] = max(1, min(steps, service.config.max_steps))
    return settings


def _redraw_mask(service: Service, mask: bytes, size: tuple[int, int]) -> bytes:
    """OpenAI's mask (edit where alpha is 0) as faceid's (white where redrawn), a PNG; ``size``: the image's."""
    service._check_upload_size("mask", mask)
    image = _decode_rgba(mask, service)
    if image.size != size:
        raise OpenAIError(400, f"mask is {image.width}x{image.height} but the first image is {size[0]}x{size[1]}: "
                          "give a mask of the image's size", param="mask")  # fmt: skip
    redraw = image.getchannel("A").point(lambda a: 255 if a == 0 else 0)
    if redraw.getbbox() is None:
        raise OpenAIError(400, "mask has no transparent pixel: make the area to redraw transparent (alpha 0)",
                          param="mask")  # fmt: skip
    buffer = io.BytesIO()
    redraw.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_rgba(data: bytes, service: Service) -> Image.Image:
    """The mask with its alpha channel (``load_image`` gives RGB): checked by the same rules first."""
    from ..images import load_image

    load_image(data, max_pixels=service.config.max_pixels)  # size, pixels, format: the uploads' checks
    image = Image.open(io.BytesIO(data))
    if "A" not in image.getbands() and image.mode != "P":
        raise OpenAIError(400, "mask has no alpha channel: give a PNG whose transparent area (alpha 0) is redrawn",
                          param="mask")  # fmt: skip
    return image.convert("RGBA")


def _run(service: Service, signer: UrlSigner, request: Request, owner: str, job: dict[str, Any],
         response_format: str | None, output_format: str | None, compression: int | None) -> ImagesResponse:  # fmt: skip
    """Run a generation, and answer with its images."""
    view, image_ids = oneshot.run(service, owner, job)
    prompts = view["settings"]["prompt"]
    data = []
    for image_id in image_ids:
        item = ImageData(revised_prompt=prompts if isinstance(prompts, str) else None)
        path = service.image_path(image_id, owner)
        if response_format == "b64_json" or output_format not in (None, "png"):
            encoded = _encode(path, output_format or "png", compression)
        if response_format == "b64_json":
            item.b64_json = base64.b64encode(encoded).decode()
        else:
            item.url = str(request.base_url).rstrip("/") + signer.url(image_id)
            if output_format not in (None, "png"):
                raise OpenAIError(400, "output_format: links are to PNGs; ask for response_format b64_json to get "
                                  f"{output_format}", param="output_format")  # fmt: skip
        data.append(item)
    return ImagesResponse(created=int(view["finished"] or time.time()), data=data)


def _encode(path: Path, output_format: str, compression: int | None) -> bytes:
    if output_format == "png":
        return path.read_bytes()
    buffer = io.BytesIO()
    options = {"quality": compression} if compression is not None else {}
    Image.open(path).convert("RGB").save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


class UrlSigner:
    """Links to images that need no key until they expire: an HMAC of the image id and expiry time, with a secret
    kept in the data dir (made on first use), so links stay valid across restarts and ingress replicas."""

    def __init__(self, secret_file: Path) -> None:
        self.secret_file = secret_file
        self._secret: bytes | None = None

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            if not self.secret_file.is_file():
                self.secret_file.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(self.secret_file, "xb") as out:  # "x": two processes never write two secrets
                        out.write(secrets.token_bytes(32))
                except FileExistsError:
                    pass
                self.secret_file.chmod(0o600)
            self._secret = self.secret_file.read_bytes()
        return self._secret

    def _sign(self, image_id: str, expires: int) -> str:
        return hmac.new(self.secret, f"{image_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, image_id: str) -> str:
        expires = int(time.time()) + URL_LIFETIME
        return f"{PREFIX}/images/{image_id}.png?expires={expires}&signature={self._sign(image_id, expires)}"

    def valid(self, image_id: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self._sign(image_id, expires).encode(), signature.encode())


@contextmanager
def _openai_errors() -> Iterator[None]:
    """The service's errors in OpenAI's shape: the statuses ``/v1`` gives, but 400 where it gives 422 (OpenAI's
    status for a request it cannot take)."""
    try:
        yield
    except OpenAIError:
        raise
    except Exception as exc:
        error = oneshot.classify(exc)
        if error is None:
            raise
        status = 400 if error.status == 422 else error.status
        kind = {429: "rate_limit_error", 500: "server_error", 504: "server_error"}.get(status, "invalid_request_error")
        code = {"queue_full": "rate_limit_exceeded"}.get(error.code, error.code)
        param = {"no_face": "image", "bad_image": "image", "bad_audio": "file"}.get(error.code)
        raise OpenAIError(status, error.message, type=kind, code=code, param=param, headers=error.headers) from None
