"""The HTTP API: ``create_app(config)`` -> a FastAPI app over a ``Service``. Routes only translate HTTP.

Errors are JSON, ``{"error": {"code": ..., "message": ...}}``, with a message that says what to do. With
API keys every request (but ``/health`` and the API docs) needs ``Authorization: Bearer KEY``, and what a
key creates (identities, generations, images) is visible to that key only: another key gets 404. What each route
answers, errors included, is declared in ``schema.py`` (``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import FaceIDError, FaceSelectionError, ImageError, NoFaceError
from ..settings import GenerationSettings
from . import a1111, openai_api
from .config import ServeConfig
from .core import Service
from .error_shapes import ErrorShapes
from .errors import Conflict, LimitExceeded, NotFound
from .inputs import JobInputs
from .jobs import QueueFull
from .metrics import CONTENT_TYPE
from .policy import INVALID_TEXT, TextFields, body_too_large, install_policy, printable, read_upload
from .schema import (
    EVENT_STREAM,
    PNG,
    TEXT,
    BinaryFile,
    DocumentedRoute,
    GenerationPage,
    HealthView,
    IdentityView,
    JobAccepted,
    JobView,
    ModelsView,
    UploadView,
    drop_undeclared_422,
    errors,
    identity_view,
    operation_id,
    upload_view,
)
from .store import FINISHED

logger = logging.getLogger(__name__)

JSON_BODY_LIMIT = 1024 * 1024
SSE_POLL_SECONDS = 0.05
SSE_KEEPALIVE_SECONDS = 15.0
STATIC_DIR = Path(__file__).with_name("static")  # the web app: a static page over this API


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    message = printable(message)  # a message quoting a request's bad text stays encodable
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class GenerationRequest(TextFields, JobInputs, GenerationSettings):
    """A generation: the ``GenerationSettings`` fields, whose face, and its inputs (``JobInputs``: none for
    text-to-image; uploads by id for img2img, inpainting, ControlNet, swap and style references; several people by
    identity id). ``JobInputs`` comes first: its ``regions`` and ``style`` (what a request asks, with upload ids) are
    the request's, the settings' ones record what the library made of them. ``TextFields``: every text in it is
    valid text (``policy``)."""

    identity_id: str | None = Field(None, description="the person, for every prompt (from POST /v1/identities)")
    identity_ids: list[str] | None = Field(None, description="one person per prompt (prompt must then be a list)")


bearer = HTTPBearer(auto_error=False, description="one of the server's API keys (--api-key)")


def owner(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The owner of a request: its API key's (hashed), or the local owner when the server has no keys."""
    found = request.app.state.service.config.owner_of(credentials.credentials if credentials else None)
    if found is None:
        raise ApiError(
            401,
            "unauthorized",
            "this server needs an API key: send the header 'Authorization: Bearer KEY' with one of its keys",
            {"WWW-Authenticate": "Bearer"},
        )
    return found


Owner = Annotated[str, Depends(owner)]


def create_app(config: ServeConfig) -> FastAPI:
    service = Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.start)
        if not config.api_keys:
            logger.warning(
                "serving WITHOUT authentication: anyone who can reach this address can use the API and read "
                "its identities (give --api-key KEY to require keys)"
            )
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="faceid",
        version=__version__,
        lifespan=lifespan,
        description="Identity-preserving image generation (IP-Adapter-FaceID): enroll a person from photos, "
        'then generate images of them. Errors are `{"error": {"code", "message"}}` (`ErrorBody`).',
        generate_unique_id_function=operation_id,
    )
    app.router.route_class = DocumentedRoute  # every route declares the errors it can give (schema.py)
    drop_undeclared_422(app)
    app.state.service = service
    form_overhead = 65536
    app.add_middleware(
        BodyLimit,
        limits={
            "/v1/identities": config.max_photos * config.max_upload_bytes + form_overhead,
            "/v1/uploads": config.max_upload_bytes + form_overhead,
            "/openai/v1/images/edits": (config.max_photos + 1) * config.max_upload_bytes + form_overhead,
            "/openai/v1/audio/transcriptions": config.max_upload_bytes + form_overhead,
            **a1111.body_limits(config),
        },
    )
    _install_error_handlers(app)
    install_policy(app, service)  # Host and Origin checks, quota errors
    # outermost: every error under a protocol's prefix in that protocol's shape, whoever answered it
    app.add_middleware(ErrorShapes, shapes=[openai_api.SHAPE, *a1111.SHAPES])

    # ------------------------------------------------------------------ identities
    @app.post(
        "/v1/identities", status_code=201, response_model=IdentityView, responses=errors(400, 429), tags=["identities"]
    )
    def create_identity(
        who: Owner,
        photos: Annotated[list[BinaryFile], File(description="one or more photos of one person")],
        name: Annotated[str | None, Form(description="a name to show")] = None,
    ) -> IdentityView:
        """Enroll a person: every photo is analysed (the largest face is used), and its photo, aligned crop and
        embedding stored. Runs in the request's thread, never behind generation."""
        uploads = []
        for i, photo in enumerate(photos):
            label = f"photos[{i}]" + (f" ({photo.filename[:80]!r})" if photo.filename else "")
            uploads.append((label, read_upload(photo, label, config.max_upload_bytes, service.metrics)))
        identity, warnings = service.enroll(who, name, uploads)
        return identity_view(identity, warnings)

    @app.get("/v1/identities", response_model=list[IdentityView], tags=["identities"])
    def list_identities(who: Owner) -> list[IdentityView]:
        return [identity_view(i) for i in service.identities(who)]

    @app.get("/v1/identities/{identity_id}", response_model=IdentityView, tags=["identities"])
    def get_identity(identity_id: str, who: Owner) -> IdentityView:
        return identity_view(service.identity(identity_id, who))

    @app.get(
        "/v1/identities/{identity_id}/crops/{k}.png",
        response_class=FileResponse,
        responses=PNG,
        tags=["identities"],
    )
    def get_crop(identity_id: str, k: int, who: Owner):
        """The aligned 112x112 face of photo ``k``."""
        return FileResponse(service.crop_path(identity_id, k, who), media_type="image/png")

    @app.delete("/v1/identities/{identity_id}", status_code=204, tags=["identities"])
    def delete_identity(identity_id: str, who: Owner) -> Response:
        """Delete the identity: its photos, crops and embeddings, from disk and database."""
        service.delete_identity(identity_id, who)
        return Response(status_code=204)

    # ------------------------------------------------------------------ uploads
    @app.post("/v1/uploads", status_code=201, response_model=UploadView, responses=errors(400, 429), tags=["uploads"])
    def create_upload(
        who: Owner,
        image: Annotated[BinaryFile, File(description="an image: init image, mask, control photo or swap target")],
    ) -> UploadView:
        """Upload an image a generation names by its id (``init_image``, ``mask_image``, ``controls[].image``,
        ``swap.target``, ``regions``' masks or photo, ``style[].image`` and ``style[].region``). It is decoded and checked first (size, pixels, format), and stored upright (its EXIF
        orientation applied) without its metadata."""
        data = read_upload(image, "image", config.max_upload_bytes, service.metrics)
        return upload_view(service.add_upload(who, image.filename, data))

    @app.get("/v1/uploads", response_model=list[UploadView], tags=["uploads"])
    def list_uploads(who: Owner) -> list[UploadView]:
        """Your uploads, newest first."""
        return [upload_view(u) for u in service.uploads(who)]

    @app.get(
        "/v1/uploads/{upload_id}.png",
        response_class=FileResponse,
        responses=PNG,
        tags=["uploads"],
    )
    def get_upload_image(upload_id: str, who: Owner):
        """The uploaded image as generation reads it (upright PNG)."""
        return FileResponse(service.upload_path(upload_id, who), media_type="image/png")

    @app.get("/v1/uploads/{upload_id}", response_model=UploadView, tags=["uploads"])
    def get_upload(upload_id: str, who: Owner) -> UploadView:
        return upload_view(service.upload(upload_id, who))

    @app.delete("/v1/uploads/{upload_id}", status_code=204, tags=["uploads"])
    def delete_upload(upload_id: str, who: Owner) -> Response:
        """Delete an upload: its file and its row. A queued generation that names it fails, saying so."""
        service.delete_upload(upload_id, who)
        return Response(status_code=204)

    # ------------------------------------------------------------------ generations
    @app.post(
        "/v1/generations", status_code=202, response_model=JobAccepted, responses=errors(429), tags=["generations"]
    )
    def create_generation(request: GenerationRequest, who: Owner) -> JobAccepted:
        """Queue a generation. Seeds: none draws one per image; an int gives image i seed + i; a list, one each."""
        job, position = service.submit(who, request.model_dump(exclude_unset=True))
        return JobAccepted(
            id=job.id,
            status="queued",
            queue_position=position,
            url=f"/v1/generations/{job.id}",
            events_url=f"/v1/generations/{job.id}/events",
        )

    @app.get("/v1/generations", response_model=GenerationPage, tags=["generations"])
    def list_generations(
        who: Owner,
        limit: Annotated[int, Query(ge=1, le=100, description="generations per page")] = 20,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        """Your generations, newest first, a page at a time: follow ``next_cursor`` until it is null."""
        return service.generations(who, limit, cursor)

    @app.get("/v1/generations/{job_id}", response_model=JobView, tags=["generations"])
    def get_generation(job_id: str, who: Owner) -> dict[str, Any]:
        """Status (queued, running, done, failed, cancelled), queue position, progress, image URLs, settings."""
        return service.job_view(job_id, who)

    @app.delete(
        "/v1/generations/{job_id}",
        response_model=JobView,
        responses={204: {"description": "purged: the generation and its images are deleted"}, **errors(409)},
        tags=["generations"],
    )
    def cancel_generation(
        job_id: str,
        who: Owner,
        purge: Annotated[bool, Query(description="delete a finished generation and its images")] = False,
    ) -> Any:
        """Cancel: a queued job at once, a running one at its next step (409 once finished). With
        ``?purge=true``: delete a finished generation, its images' files and rows (409 while it is queued or
        running: cancel it first); 404 for it afterwards."""
        if purge:
            service.delete_generation(job_id, who)
            return Response(status_code=204)
        return service.cancel(job_id, who)

    @app.get(
        "/v1/generations/{job_id}/events",
        response_class=StreamingResponse,
        responses=EVENT_STREAM,
        tags=["generations"],
    )
    async def generation_events(job_id: str, who: Owner):
        """Server-sent events: ``queued``, ``progress`` (each step), ``preview`` (with ``--preview-every``: the images
        so far, as JPEG data URLs; a late subscriber gets the newest one only), then one of ``done``, ``failed``,
        ``cancelled``."""
        view = await run_in_threadpool(service.job_view, job_id, who)
        return StreamingResponse(
            _event_stream(service, job_id, view),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/generations/{job_id}/controls/{k}.png",
        response_class=FileResponse,
        responses=PNG,
        tags=["generations"],
    )
    def get_control_image(job_id: str, k: int, who: Owner):
        """The control image ControlNet ``k`` of a done generation saw, at the output's size (made from its upload:
        edges, face landmarks, pose, depth)."""
        return FileResponse(service.control_image_path(job_id, k, who), media_type="image/png")

    @app.get(
        "/v1/images/{image_id}.png",
        response_class=FileResponse,
        responses=PNG,
        tags=["generations"],
    )
    def get_image(image_id: str, who: Owner):
        """A generated PNG, with the settings that reproduce it in its text chunks (as the CLI writes them)."""
        return FileResponse(service.image_path(image_id, who), media_type="image/png")

    @app.delete("/v1/images/{image_id}.png", status_code=204, tags=["generations"])
    def delete_image(image_id: str, who: Owner) -> Response:
        """Delete a generated image (DELETE its URL): its PNG and its row; its generation lists the others."""
        service.delete_image(image_id, who)
        return Response(status_code=204)

    # ------------------------------------------------------------------ server
    @app.get("/v1/models", response_model=ModelsView, tags=["server"])
    def models(who: Owner) -> dict[str, Any]:
        """What is configured and loaded, and the defaults a generation gets."""
        return service.models()

    # ------------------------------------------------------------------ the protocols other clients speak
    openai_api.install(app, service)
    a1111.install(app, service)

    # ------------------------------------------------------------------ the web app
    @app.get("/", include_in_schema=False)
    def web_app() -> FileResponse:
        """The web app (a static page that calls the /v1 API from the browser, with the key it is given)."""
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=HealthView, tags=["server"])
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/metrics", tags=["server"], response_class=Response, responses=TEXT)
    def metrics(who: Owner) -> Response:
        """Prometheus text format."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _event_stream(service: Service, job_id: str, view: dict[str, Any]):
    """The job's events from the database, as they come (whichever process runs the job), until its last one."""
    seen, quiet_since = 0, time.monotonic()
    while True:
        items = await run_in_threadpool(service.events_since, job_id, seen)
        if not items and seen == 0 and view["status"] in FINISHED:  # finished before its events were kept
            data = {"status": view["status"], "error": view["error"], "images": view["images"]}
            yield _sse(view["status"], {k: v for k, v in data.items() if v})
            return
        for number, kind, data in items:
            seen = number
            yield _sse(kind, data)
            if kind in FINISHED:
                return
        if service.queue.stopped:
            return
        if items:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > SSE_KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(SSE_POLL_SECONDS)


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------------------------------------- errors
def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int, code: str):
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return error_response(status, code, " ".join(str(exc).split()))

        return handle

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def limit(request: Request, exc: LimitExceeded) -> JSONResponse:
        return error_response(exc.status, "limit_exceeded", str(exc))

    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:  # counted by Service.submit
        return error_response(
            429,
            "queue_full",
            f"the generation queue is full; try again in {exc.retry_after} s",
            {"Retry-After": str(exc.retry_after)},
        )

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(error["type"] == INVALID_TEXT for error in exc.errors()):
            request.app.state.service.metrics.refused("invalid_text")
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field (GET /openapi.json lists the fields)"
            if tuple(error["loc"]) == ("body",):
                message += " (send a JSON object with the header Content-Type: application/json)"
            parts.append(f"{where}: {message}")
        return error_response(
            422, "invalid_request", "invalid request: " + "; ".join(parts) + "; fix it and send again"
        )

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        message = {
            400: f"{exc.detail}: send a JSON object in UTF-8 with the header Content-Type: application/json, or "
            "for uploads a multipart/form-data body (GET /openapi.json describes each request)",
            404: f"no such endpoint: {request.url.path} (GET /docs lists them)",
        }.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(message), exc.headers)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(NotFound, handler(404, "not_found"))
    app.add_exception_handler(Conflict, handler(409, "conflict"))
    app.add_exception_handler(LimitExceeded, limit)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ImageError, handler(400, "bad_image"))
    app.add_exception_handler(NoFaceError, handler(422, "no_face"))
    app.add_exception_handler(FaceSelectionError, handler(422, "no_face"))
    app.add_exception_handler(FaceIDError, handler(422, "invalid_request"))
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


class BodyLimit:
    """ASGI middleware: a request body larger than its path's limit (``limits``, else 1 MB) is refused with 413,
    from the Content-Length header or, for chunked bodies, as soon as the bytes read pass the limit."""

    def __init__(self, app, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"].rstrip("/"), JSON_BODY_LIMIT)
        message = body_too_large(scope["path"], limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(413, "limit_exceeded", body_too_large(scope["path"], limit, int(length)))(
                scope, receive, send
            )
            return
        state = {"seen": 0, "exceeded": False, "started": False}

        async def limited_receive():
            item = await receive()
            if item["type"] == "http.request":
                state["seen"] += len(item.get("body", b""))
                if state["seen"] > limit:
                    state["exceeded"] = True
                    raise LimitExceeded(message, status=413)
            return item

        async def guarded_send(item) -> None:
            if state["exceeded"]:
                return  # the app's own answer to the broken-off body is replaced by the 413 below
            state["started"] = True
            await send(item)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            await error_response(413, "limit_exceeded", message)(scope, receive, send)
