"""Each protocol's errors in its own shape, from one place.

faceid's errors are ``{"error": {"code", "message"}}``, made by the app's exception handlers and by its middleware
(body limits, Host and Origin checks). A client of another protocol (the OpenAI API, the AUTOMATIC1111 API) reads
that protocol's shape. ``ErrorShapes``, the outermost middleware, rewrites every faceid-shaped error answered under a
protocol's path prefix with that protocol's ``Shape``, whoever made it; an error a protocol's route made in its own
shape passes untouched. An exception nothing handled becomes the protocol's 500 (logged here, as the app's 500s are).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """A protocol's error shape for the paths under ``prefix``: ``body(status, code, message)`` -> (status, JSON)."""

    prefix: str
    body: Callable[[int, str, str], tuple[int, dict[str, Any]]]


def faceid_error(body: bytes) -> tuple[str, str] | None:
    """(code, message) of a faceid-shaped error body, else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) and len(data) == 1 else None
    if isinstance(error, dict) and set(error) == {"code", "message"}:
        return str(error["code"]), str(error["message"])
    return None


class ErrorShapes:
    """ASGI middleware: faceid-shaped error answers under a ``Shape``'s prefix, rewritten in that shape."""

    def __init__(self, app, shapes: list[Shape]) -> None:
        self.app = app
        self.shapes = shapes

    async def __call__(self, scope, receive, send) -> None:
        shape = next((s for s in self.shapes if scope["type"] == "http" and scope["path"].startswith(s.prefix)), None)
        if shape is None:
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}  # an error's start message, held until its body is known
        chunks: list[bytes] = []
        state = {"started": False}

        async def reshaping_send(message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.update(message)
                    return
                state["started"] = True
                await send(message)
                return
            if message["type"] == "http.response.body" and held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                await self._send(send, shape, held, b"".join(chunks))
                held.clear()
                state["started"] = True
                return
            await send(message)

        try:
            await self.app(scope, receive, reshaping_send)
        except Exception:
            if state["started"]:
                raise
            logger.exception("internal error on %s %s", scope.get("method"), scope["path"])
            status, body = shape.body(500, "internal_error", "internal server error; the server log has the details")
            await _send_json(send, status, body, [])

    @staticmethod
    async def _send(send, shape: Shape, start: dict[str, Any], body: bytes) -> None:
        found = faceid_error(body)
        headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
        if found is None:  # already the protocol's own (or not an error body we know): as it was
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        status, data = shape.body(start["status"], *found)
        await _send_json(send, status, data, [(k, v) for k, v in headers if k.lower() != b"content-type"])


async def _send_json(send, status: int, data: dict[str, Any], headers: list) -> None:
    body = json.dumps(data).encode()
    headers = [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
