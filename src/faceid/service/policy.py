"""What a request may ask for: the one layer between HTTP (``app.py``) and the job service (``core.Service``).

The routes stay thin translators; the service calls this module wherever a request's content is judged:

* **Text** (``TextFields``, ``check_texts``): every text a request carries (prompts, negative prompts, identity
  names, upload file names, ids and names in a generation request) is valid Unicode text: no lone surrogate, no NUL
  or other control character but newline and tab. Refused with 422 ``invalid_request`` before anything is stored.
* **Defaults within limits** (``within_limits``): what a request leaves to the model (steps, size, a swap's
  resolution) is the model's default, brought within the server's ``--max-steps`` and ``--max-side``; an explicit
  value over a limit stays a 422.
* **Sizes** (``read_upload``, ``upload_too_large``, ``body_too_large``): a 413 says the true size when it is known,
  else "larger than" the limit.
* **Quotas per key** (``Policy``): identities, uploads, stored bytes and queued jobs of one owner; 429 for counts,
  413 for bytes, each naming the quota, its flag and what to delete. Deleting frees quota (usage is counted from
  what is stored, never remembered).
* **Shown rows** (``readable_view``): a stored generation that cannot be shown (a record that no longer parses,
  text that cannot be encoded) is shown as failed with an error that says so, never a 500 that breaks a listing.
* **Host and Origin** (``HostGuard``, ``bound_hosts``): the ``Host`` header must be one of the names the server is
  bound to (plus ``--allowed-host``), against DNS rebinding; a state-changing request with a foreign ``Origin`` is
  refused when the server has no keys, against cross-site requests (a multipart POST needs no preflight).

Every refusal this layer makes is counted by ``/metrics``: ``faceid_refusals_total{reason=...}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, TypeAdapter, field_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic reads a TypedDict of typing_extensions on Python < 3.12

from ..errors import FaceIDError
from ..settings import GenerationSettings
from .config import LOOPBACK_HOSTS
from .errors import LimitExceeded

if TYPE_CHECKING:
    from .config import ServeConfig
    from .files import DataDir
    from .jobs import JobQueue
    from .metrics import Metrics
    from .store import Store

logger = logging.getLogger(__name__)

MB = 1024 * 1024  # as --max-upload-mb and --max-stored-mb count them

# ---------------------------------------------------------------------------------------------- text
# A character no text field may hold: C0 and C1 control characters (but tab and newline) and lone surrogates (what
# a JSON "\ud800" escape decodes to: not a character, so no UTF-8 encoding, no database or response can hold it).
BAD_CHARACTER = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
INVALID_TEXT = "invalid_text"  # the pydantic error type of a bad text (counted by the validation handler)


class InvalidText(FaceIDError):
    """A text field holds what is not text (422 ``invalid_request``)."""


def text_problem(value: str) -> str | None:
    """What is wrong with ``value`` as text (its first bad character, by position and code point), or None."""
    found = BAD_CHARACTER.search(value)
    if found is None:
        return None
    code = ord(found.group())
    where = f"character {found.start() + 1}"
    if 0xD800 <= code <= 0xDFFF:
        return f"{where} is a lone surrogate (U+{code:04X}), not a character: send valid Unicode text (UTF-8)"
    return f"{where} is the control character U+{code:04X}: text may hold newlines and tabs, no other control character"


def _text_problems(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, problem) for every bad text in a JSON-like value: strings, lists, dict keys and values, models."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            yield where, problem
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _text_problems(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = printable(str(key))
            if isinstance(key, str) and text_problem(key):
                yield f"{where}.{name}" if where else name, f"the name: {text_problem(key)}"
            yield from _text_problems(item, f"{where}.{name}" if where else name)
    elif isinstance(value, BaseModel):
        for name in value.model_fields_set:
            yield from _text_problems(getattr(value, name), f"{where}.{name}" if where else name)


def check_texts(value: Any, where: str = "", metrics: Metrics | None = None) -> None:
    """Raise ``InvalidText`` naming the first bad text in ``value`` (a request's fields, a form field, a file name)."""
    for field, problem in _text_problems(value, where):
        if metrics is not None:
            metrics.refused("invalid_text")
        raise InvalidText(f"{field}: {problem}")


def printable(text: str) -> str:
    """``text`` with every character no text may hold written as an escape (for messages that quote a request)."""
    return BAD_CHARACTER.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class TextFields(BaseModel):
    """A request model mixin: every field's text (however nested: lists of prompts, dict keys, nested specs) is
    checked before the field's own validation, so the error names the field and the schema is the door's."""

    @field_validator("*", mode="before")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        for where, problem in _text_problems(value, ""):
            raise PydanticCustomError(
                INVALID_TEXT, "{message}", {"message": f"{where}: {problem}" if where else problem}
            )
        return value


# ---------------------------------------------------------------------------------------------- defaults
def _cells(value: float) -> int:
    return max(8, int(value) // 8 * 8)


def within_limits(given: GenerationSettings, resolved: GenerationSettings, config: ServeConfig) -> GenerationSettings:
    """``resolved`` with what ``given`` left to the model's defaults brought within the server's limits: steps to
    ``max_steps``, width and height to ``max_side`` (both left: the family's aspect kept, multiples of 8). What was
    given stays as it is: over a limit it is refused (``Service._check_limits``)."""
    changes: dict[str, Any] = {}
    if given.num_inference_steps is None and resolved.num_inference_steps > config.max_steps:
        changes["num_inference_steps"] = config.max_steps
    width, height = resolved.width, resolved.height
    side = config.max_side
    if given.width is None and given.height is None:
        if max(width, height) > side:
            shrink = side / max(width, height)
            changes.update(width=_cells(width * shrink), height=_cells(height * shrink))
    else:
        if given.width is None and width > side:
            changes["width"] = _cells(side)
        if given.height is None and height > side:
            changes["height"] = _cells(side)
    return resolved.replace(**changes) if changes else resolved


def swap_resolution(default: int, config: ServeConfig) -> int:
    """A swap's default resolution (the family's side), within ``max_side``."""
    return default if default <= config.max_side else _cells(config.max_side)


# ---------------------------------------------------------------------------------------------- sizes
def megabytes(size: int) -> str:
    """``size`` bytes in MB as ``--max-upload-mb`` counts them (2**20 bytes): "20 MB", "57.2 MB"."""
    value = size / MB
    return f"{value:.0f} MB" if value == int(value) else f"{value:.1f} MB"


def upload_too_large(label: str, size: int | None, limit: int) -> FaceIDError:
    """The 413 of an upload over ``limit``: its true size when known (None: only that it is larger)."""
    how = f" ({megabytes(size)})" if size is not None else ""
    return LimitExceeded(
        f"{label}{how} is larger than this server takes ({megabytes(limit)} an image, --max-upload-mb): downscale or "
        "recompress it",
        status=413,
    )


def read_upload(upload: Any, label: str, limit: int, metrics: Metrics | None = None) -> bytes:
    """An uploaded file's bytes (a FastAPI ``UploadFile``), its file name checked as text; a 413 with its true size
    when the form told it, else as soon as more than ``limit`` bytes are read."""
    if upload.filename is not None:
        check_texts(upload.filename, f"{label} file name", metrics)
    size = getattr(upload, "size", None)
    if size is not None and size > limit:
        raise upload_too_large(label, size, limit)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise upload_too_large(label, size, limit)
    return data


def body_too_large(path: str, limit: int, length: int | None = None) -> str:
    """The 413 message of a request body over its path's limit (``length``: the Content-Length, when given)."""
    how = f" ({megabytes(length)})" if length is not None else ""
    return f"the request body{how} is larger than this server takes for {path} ({megabytes(limit)}): send smaller or fewer photos"


# ---------------------------------------------------------------------------------------------- quotas
class QuotaExceeded(FaceIDError):
    """A key holds as much as the server keeps per key: 429 (a count) or 413 (bytes), code ``quota_exceeded``."""

    def __init__(self, message: str, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class Policy:
    """The quotas of one server, per owner (an API key, or the local owner without keys). Usage is counted from the
    database and the data dir when a request needs it, so deleting anything frees its quota at once."""

    def __init__(self, config: ServeConfig, store: Store, data: DataDir, queue: JobQueue, metrics: Metrics) -> None:
        self.config, self.store, self.data, self.queue, self.metrics = config, store, data, queue, metrics

    def _refuse(self, reason: str, status: int, message: str, retry_after: int | None = None) -> QuotaExceeded:
        self.metrics.refused(reason)
        return QuotaExceeded(message, status, reason, retry_after)

    def check_texts(self, value: Any, where: str = "") -> None:
        check_texts(value, where, self.metrics)

    # ------------------------------------------------------------------ what a request stores
    def check_identity(self, owner: str, incoming: int) -> None:
        """Before an identity of ``incoming`` photo bytes is stored."""
        limit = self.config.max_identities
        if limit is not None:
            from .store import Identity

            have = self._count(Identity, owner)
            if have >= limit:
                raise self._refuse(
                    "quota_identities",
                    429,
                    f"quota: this key has {have} identities, the most this server keeps per key (--max-identities "
                    f"{limit}): delete one you no longer need (DELETE /v1/identities/{{id}}; GET /v1/identities lists "
                    "them) and enroll again",
                )
        self._check_bytes(owner, incoming, "enroll again")

    def check_upload(self, owner: str, incoming: int) -> None:
        """Before an upload of ``incoming`` bytes is stored."""
        limit = self.config.max_uploads
        if limit is not None:
            from .store import Upload

            have = self._count(Upload, owner)
            if have >= limit:
                raise self._refuse(
                    "quota_uploads",
                    429,
                    f"quota: this key has {have} uploads, the most this server keeps per key (--max-uploads {limit}): "
                    "delete uploads you no longer need (DELETE /v1/uploads/{id}; GET /v1/uploads lists them) and "
                    "upload again",
                )
        self._check_bytes(owner, incoming, "upload again")

    def check_generation(self, owner: str) -> None:
        """Before a generation is queued: its images will be stored (their size is known once they are made, so a
        key under its byte quota may pass it by one generation's images)."""
        self._check_bytes(owner, 0, "submit again")

    def check_queued(self, owner: str, have: int, running: int) -> None:
        """Before a generation is queued, under the queue's lock in the database (``JobQueue.put``): the key's
        waiting jobs (``have``; ``running``: every running job, for Retry-After)."""
        limit = self.config.max_queued_per_key
        if limit is None:
            return
        if have >= limit:
            retry = self.queue.retry_after(have + running)
            raise self._refuse(
                "quota_queued",
                429,
                f"quota: this key has {have} generations waiting, the most this server queues per key "
                f"(--max-queued-per-key {limit}): wait until one has run (try again in {retry} s) or cancel one "
                "(DELETE /v1/generations/{id})",
                retry_after=retry,
            )

    def _check_bytes(self, owner: str, incoming: int, then: str) -> None:
        limit = self.config.max_stored_bytes
        if limit is None:
            return
        have = self.stored_bytes(owner)
        if have + incoming > limit:
            adding = f" and this request adds {megabytes(incoming)}" if incoming else ""
            raise self._refuse(
                "quota_stored_bytes",
                413,
                f"quota: this key stores {megabytes(have)}{adding}; this server keeps at most {megabytes(limit)} per "
                "key (--max-stored-mb): delete generated images or generations (DELETE /v1/images/{id}.png, DELETE "
                "/v1/generations/{id}?purge=true), uploads (DELETE /v1/uploads/{id}) or identities (DELETE "
                f"/v1/identities/{{id}}) you no longer need, then {then}",
            )

    # ------------------------------------------------------------------ usage
    def _count(self, model: Any, owner: str) -> int:
        from sqlalchemy import func, select

        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(model.owner == owner)) or 0)

    def usage(self, owner: str) -> dict[str, int]:
        """What ``owner`` holds: identities, uploads, queued generations and stored bytes."""
        from .store import Identity, Upload

        return {
            "identities": self._count(Identity, owner),
            "uploads": self._count(Upload, owner),
            "queued": self.queue.queued_of(owner),
            "stored_bytes": self.stored_bytes(owner),
        }

    def stored_bytes(self, owner: str) -> int:
        """The bytes ``owner``'s files take: identities' photos, crops and embeddings, uploads, generated images
        and their control images (from the rows that name them; a file already gone counts 0)."""
        from sqlalchemy import select

        from .store import Identity, ImageRow, Job, Upload

        with self.store.session() as s:
            identities = list(s.scalars(select(Identity.id).where(Identity.owner == owner)))
            uploads = list(s.scalars(select(Upload.id).where(Upload.owner == owner)))
            images = list(s.scalars(select(ImageRow.id).where(ImageRow.owner == owner)))
            jobs = list(s.execute(select(Job.id, Job.inputs).where(Job.owner == owner)))
        total = sum(_folder_bytes(self.data.identity_dir(i)) for i in identities)
        total += sum(_file_bytes(self.data.upload(u)) for u in uploads)
        total += sum(_file_bytes(self.data.image(i)) for i in images)
        for job_id, inputs in jobs:
            controls = inputs.get("controls") if isinstance(inputs, dict) else None
            if isinstance(controls, list):
                total += sum(_file_bytes(self.data.control_image(job_id, k)) for k in range(len(controls)))
        return total


def _file_bytes(path: os.PathLike) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _folder_bytes(path: os.PathLike) -> int:
    try:
        with os.scandir(path) as entries:
            return sum(entry.stat().st_size for entry in entries if entry.is_file())
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------- shown rows
class _Progress(TypedDict):
    step: int
    total: int | None


class _Shown(TypedDict):
    """The types a job view must have to be shown (``app.JobView``), checked before it is."""

    id: str
    status: str
    progress: _Progress
    images: list[str]
    image_index: list[int]
    identity_ids: list[str]
    mode: str
    inputs: dict[str, Any]
    control_images: list[str]
    settings: dict[str, Any]
    error: str | None
    created: float
    started: float | None
    finished: float | None


SHOWN = TypeAdapter(_Shown)
STATUSES = ("queued", "running", "done", "failed", "cancelled")


def readable_view(row: Any, view: Any, image_url: Any) -> dict[str, Any]:
    """``view(row)`` (a job's view) when it can be shown: built, of the types the API answers with, and encodable
    as the JSON response; else the row as a failed generation whose error says its record is unreadable (and how
    to delete it), logged. Never raises: one bad row never breaks a listing."""
    try:
        shown = view(row)
        SHOWN.validate_python(shown, strict=False)
        if shown["status"] not in STATUSES:
            raise ValueError(f"unknown status {shown['status']!r}")
        json.dumps(shown, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return shown
    except Exception as exc:
        job_id = getattr(row, "id", "?")
        logger.warning("generation %s cannot be shown (%s: %s); it is shown as failed", job_id, type(exc).__name__, exc)
        return unreadable_view(row, exc, image_url)


def unreadable_view(row: Any, exc: Exception, image_url: Any) -> dict[str, Any]:
    """A generation whose stored record cannot be shown, as a failed one that says so."""
    job_id = str(getattr(row, "id", ""))
    images, indexes = [], []
    try:
        for image in row.images:
            images.append(image_url(str(image.id)))
            indexes.append(int(image.index))
    except Exception:
        images, indexes = [], []

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and value == value else None

    created = number(getattr(row, "created_ns", None))
    return {
        "id": printable(job_id),
        "status": "failed",
        "queue_position": None,
        "progress": {"step": 0, "total": None},
        "images": images,
        "scores": [None] * len(images),
        "image_index": indexes,
        "identity_ids": [],
        "mode": "unknown",
        "inputs": {},
        "control_images": [],
        "settings": {},
        "error": f"this generation's stored record cannot be read ({type(exc).__name__}); its settings are lost. "
        f"Delete it with DELETE /v1/generations/{printable(job_id)}?purge=true (the server log has the details)",
        "created": created / 1e9 if created is not None else 0.0,
        "started": number(getattr(row, "started", None)),
        "finished": number(getattr(row, "finished", None)),
    }


# ---------------------------------------------------------------------------------------------- Host and Origin
WILDCARD_BINDS = ("0.0.0.0", "::", "")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def bound_hosts(host: str, port: int, allowed: Iterable[str] = ()) -> tuple[str, ...]:
    """The ``Host`` values a server bound to ``host``:``port`` answers (``ServeConfig.allowed_hosts``): a loopback
    bind its loopback names with the port; another address itself with the port; a wildcard bind (0.0.0.0, ::) any
    name (``*``: it is reached by names this server cannot know, and needs keys or --insecure-no-auth) unless
    ``allowed`` names them. ``allowed`` (``--allowed-host NAME[:PORT]``) is added in every case."""
    allowed = tuple(allowed)
    if host in LOOPBACK_HOSTS or (host in WILDCARD_BINDS and allowed):
        own = tuple(_with_port(name, port) for name in LOOPBACK_HOSTS)
    elif host in WILDCARD_BINDS:
        own = ("*",)
    else:
        own = (_with_port(host, port),)
    return tuple(dict.fromkeys((*own, *allowed)))


def _with_port(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def parse_host(value: str) -> tuple[str, int | None]:
    """``NAME``, ``NAME:PORT``, ``[IPV6]``, ``[IPV6]:PORT`` (a bare IPv6 address too, as an entry) -> (name in lower
    case, port or None); a ``FaceIDError`` when it is not one."""
    text = value.strip().lower()
    port: str | None = None
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise FaceIDError(f"not a host: {printable(value)!r}")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        name, port = text.split(":")
    else:
        name = text  # a name, or a bare IPv6 address (several colons)
    name = name.rstrip(".")
    if not name or any(c.isspace() or c in "/?#@" for c in name) or (port is not None and not port.isdigit()):
        raise FaceIDError(f"not a host name[:port]: {printable(value)!r}")
    return name, int(port) if port is not None else None


class HostRules:
    """Which ``Host`` values and which ``Origin``s a server accepts (``ServeConfig.allowed_hosts``).

    Entries: ``NAME`` (any port), ``NAME:PORT``, ``*.DOMAIN`` (its subdomains), ``*`` (any host). None: the
    loopback names (127.0.0.1, localhost, ::1) on the port the server listens on."""

    def __init__(self, entries: Iterable[str] | None) -> None:
        self.entries = None if entries is None else [parse_host(e) if e != "*" else ("*", None) for e in entries]

    def _entries(self, server_port: int | None) -> list[tuple[str, int | None]]:
        if self.entries is None:
            return [(name, server_port) for name in LOOPBACK_HOSTS]
        return self.entries

    def allows(self, name: str, port: int, server_port: int | None, wildcard: bool = True) -> bool:
        for entry, entry_port in self._entries(server_port):
            if entry == "*":
                if wildcard:
                    return True
                continue
            if entry.startswith("*.") and not name.endswith(entry[1:]):
                continue
            if not entry.startswith("*.") and entry != name:
                continue
            if entry_port is None or entry_port == port:
                return True
        return False

    def describe(self, server_port: int | None) -> str:
        names = []
        for name, port in self._entries(server_port):
            shown = f"[{name}]" if ":" in name else name
            names.append(shown if port is None else f"{shown}:{port}")
        return ", ".join(names)


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


class HostGuard:
    """ASGI middleware: a request whose ``Host`` is not one of the server's names is refused (403
    ``forbidden_host``: DNS rebinding); without API keys, a POST, PUT, PATCH or DELETE whose ``Origin`` is present
    and is not the server's own is refused (403 ``forbidden_origin``: a page of another site). A request without
    ``Origin`` (curl, scripts) passes; with keys a page of another site has no key, so ``Origin`` is not checked."""

    def __init__(self, app: Any, rules: HostRules, check_origin: bool, metrics: Metrics | None = None) -> None:
        self.app, self.rules, self.check_origin, self.metrics = app, rules, check_origin, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scheme = scope.get("scheme", "http")
        server = scope.get("server")
        server_port = int(server[1]) if server and server[1] is not None else None
        hosts = [value.decode("latin-1") for key, value in scope["headers"] if key == b"host"]
        refusal = self._host_refusal(hosts, scheme, server_port)
        if refusal is None and self.check_origin and scope.get("method") in STATE_CHANGING:
            origins = [value.decode("latin-1") for key, value in scope["headers"] if key == b"origin"]
            if origins:
                refusal = self._origin_refusal(origins[0], hosts[0], scheme, server_port)
        if refusal is not None:
            code, message = refusal
            if self.metrics is not None:
                self.metrics.refused(code)
            await error_json(403, code, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_refusal(self, hosts: list[str], scheme: str, server_port: int | None) -> tuple[str, str] | None:
        accepted = self.rules.describe(server_port)
        if len(hosts) != 1:
            return "forbidden_host", f"send one Host header (this server answers for {accepted})"
        try:
            name, port = parse_host(hosts[0])
        except FaceIDError:
            name, port = None, None
        if name is not None and self.rules.allows(name, port or _default_port(scheme), server_port):
            return None
        shown = printable(hosts[0][:100])
        return (
            "forbidden_host",
            f"this server does not answer for the host {shown!r} (it answers for {accepted}): if that is a name "
            f"this server is really reached by (a LAN name, a reverse proxy's), start it with --allowed-host "
            f"{printable((name or 'NAME')[:100])}",
        )

    def _origin_refusal(self, origin: str, host: str, scheme: str, server_port: int | None) -> tuple[str, str] | None:
        if self._same_origin(origin, host, scheme, server_port):
            return None
        shown = printable(origin[:100])
        return (
            "forbidden_origin",
            f"a request from the page {shown!r} may not change this server's data (its Origin is not this server's "
            f"own: {self.rules.describe(server_port)}): use the web app this server serves, send the request "
            "without an Origin header (curl, scripts), name the page's host with --allowed-host NAME, or require "
            "API keys (--api-key)",
        )

    def _same_origin(self, origin: str, host: str, scheme: str, server_port: int | None) -> bool:
        try:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return False
            name, port = parts.hostname.rstrip("."), parts.port or _default_port(parts.scheme)
            host_name, host_port = parse_host(host)
        except (ValueError, FaceIDError):
            return False
        if (name, port) == (host_name, host_port or _default_port(scheme)):
            return True  # the page this request's server serves (its Host was checked)
        return self.rules.allows(name, port, server_port, wildcard=False)


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    """The API's error response, ``{"error": {"code", "message"}}`` (as ``app.error_response``)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": printable(message)}}, status_code=status, headers=headers)


def install_policy(app: Any, service: Any) -> None:
    """The policy's parts of an app: the Host/Origin middleware (outermost) and the quota errors' answer."""
    config = service.config
    app.add_middleware(
        HostGuard, rules=HostRules(config.allowed_hosts), check_origin=not config.api_keys, metrics=service.metrics
    )

    async def quota(request: Any, exc: QuotaExceeded):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return error_json(exc.status, "quota_exceeded", str(exc), headers)

    app.add_exception_handler(QuotaExceeded, quota)
