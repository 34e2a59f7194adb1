"""HTTP routes of the agent console: the page, its state, live updates and
the agent's actions. No build step: the page is one static HTML file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from providers.errors import ProviderError, ProviderRejected
from providers.local.provider import agent_from_name

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from providers.local.provider import LocalProvider

_MAX_BODY = 64 * 1024
_MAX_TEXT = 16_000
_STREAM_SECONDS = 25.0  # EventSource reconnects by itself; short streams end cleanly
_ACTIONS = ("take", "reply", "transfer", "end")


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_BODY:
        raise ValueError(f"body larger than {_MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_BODY:
            raise ValueError(f"body larger than {_MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def _text(data: dict[str, Any], key: str, *, limit: int, required: bool = False) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    value = value.strip()
    if required and not value:
        raise ValueError(f"{key} is required")
    if len(value) > limit:
        raise ValueError(f"{key} must be at most {limit} characters")
    return value


def console_routes(provider: LocalProvider) -> list[BaseRoute]:
    """Routes for ``/console`` and ``/console/api/...``."""
    page = (resources.files("providers.local") / "console.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        version, conversations = provider.snapshot()
        return JSONResponse({"version": version, "conversations": conversations})

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _STREAM_SECONDS
            version = -1
            while True:
                current, conversations = provider.snapshot()
                if current != version:
                    version = current
                    payload = json.dumps({"version": version, "conversations": conversations})
                    yield f"data: {payload}\n\n"
                remaining = deadline - loop.time()
                if remaining <= 0 or await request.is_disconnected():
                    return
                await provider.wait_for_change(version, min(remaining, 5.0))

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def act(request: Request) -> Response:
        chat_id = request.path_params["chat_id"]
        action = request.path_params["action"]
        if action not in _ACTIONS:
            return _error(404, f"unknown action {action!r}; use one of {', '.join(_ACTIONS)}")
        try:
            data = await _json_body(request)
            agent = agent_from_name(_text(data, "agent", limit=80))
            if action == "take":
                await provider.take(chat_id, agent)
            elif action == "reply":
                await provider.reply(
                    chat_id, agent, _text(data, "text", limit=_MAX_TEXT, required=True)
                )
            elif action == "transfer":
                group = _text(data, "group_id", limit=64)
                await provider.transfer(chat_id, agent, group, _text(data, "reason", limit=500))
            else:
                await provider.end(chat_id, agent, _text(data, "reason", limit=500))
        except ValueError as exc:
            return _error(400, str(exc))
        except ProviderRejected as exc:
            status = 404 if exc.code == "CHAT_NOT_FOUND" else 409
            return _error(status, str(exc))
        except ProviderError as exc:
            return _error(503, str(exc))
        return JSONResponse({"ok": True})

    return [
        Route("/console", index, methods=["GET"]),
        Route("/console/api/state", state, methods=["GET"]),
        Route("/console/api/stream", stream, methods=["GET"]),
        Route("/console/api/conversations/{chat_id}/{action}", act, methods=["POST"]),
    ]
