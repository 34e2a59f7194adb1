"""HTTP routes of the agent console: the page, its state, live updates and
the agent's actions. No build step: the page is one static HTML file.

The console has no login: whoever reaches it acts as an agent. So it answers
only requests addressed to this host by name (a DNS-rebound page carries its
own name in ``Host``), refuses cross-site origins, and takes actions only as
``application/json``, which a cross-site form or "simple" request cannot send
without a preflight that gets no CORS approval.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from providers.errors import ProviderError, ProviderRejected
from providers.local.provider import agent_from_name
from providers.types import GROUP_ID_PATTERN, GROUP_ID_RULE

if TYPE_CHECKING:
    from starlette.routing import BaseRoute
    from starlette.types import Receive, Scope, Send

    from providers.local.provider import LocalProvider

_MAX_BODY = 64 * 1024
_MAX_TEXT = 16_000
_STREAM_SECONDS = 25.0  # EventSource reconnects by itself; short streams end cleanly
# Live-update streams open at once: each re-encodes the whole state on every
# change, so a tab left open per agent is fine and a runaway client is not.
MAX_STREAMS = 64
_ACTIONS = ("take", "reply", "transfer", "end")
_LOOPBACK_NAMES = frozenset({"localhost"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    # ASCII digits only: int() takes other scripts' digits and raises past 4300.
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > _MAX_BODY)
    ):
        raise ValueError(f"body larger than {_MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_BODY:
            raise ValueError(f"body larger than {_MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise ValueError("body is nested too deeply") from None
    except ValueError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def _text(
    data: dict[str, Any], key: str, *, limit: int, required: bool = False, as_typed: bool = False
) -> str:
    """``data[key]`` checked, and stripped unless ``as_typed`` (a reply keeps
    its indentation and line breaks: the end user sees it as written)."""
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON may carry a lone surrogate ("\ud800"), which no store,
        # provider or client can take.
        raise ValueError(f"{key} is not valid Unicode text (a lone surrogate)") from None
    if "\x00" in value:
        # As StartHitl and SendMessage refuse it: PostgreSQL's text columns
        # (a session's end reason, its group) cannot hold it.
        raise ValueError(f"{key} must not contain NUL characters")
    if not as_typed:
        value = value.strip()
    if required and not value.strip():
        raise ValueError(f"{key} is required")
    if len(value) > limit:
        raise ValueError(f"{key} must be at most {limit} characters")
    return value


def _host_port(authority: str, scheme: str) -> tuple[str, int] | None:
    """(lower-case host, port) of ``host[:port]``; None when malformed."""
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path:
        return None
    return host, port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_allowed(host: str, bound: str) -> bool:
    """Whether ``host`` (from the Host header) names this console.

    Loopback names and addresses always do, and so does the host the
    sidecar is bound to. Bound to all interfaces, any IP address and this
    machine's name do too: DNS rebinding needs a name of the attacker's.
    """
    if host in _LOOPBACK_NAMES or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
        return True
    bound = bound.lower()
    if not bound or (_is_ip(bound) and ipaddress.ip_address(bound).is_unspecified):
        return _is_ip(host) or host == socket.gethostname().lower()
    if _is_ip(bound) and _is_ip(host):
        return ipaddress.ip_address(host) == ipaddress.ip_address(bound)
    return host == bound


def security_headers(page: str) -> dict[str, str]:
    """Headers for every console response: no framing (clickjacking), no
    script but the page's own inline one (by hash), fetches only to this
    origin, no MIME sniffing, no Referer to the image and link hosts end
    users choose, and no copy in any cache (the state and the actions'
    answers carry end users' names, e-mails and transcripts)."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "img-src 'self' http: https:; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _guard(handler: Handler, bound: str, headers: dict[str, str]) -> Handler:
    """Refuses requests for another host, from another origin, and action
    bodies that are not JSON; then runs ``handler``. Every answer carries
    ``headers``."""

    async def guarded(request: Request) -> Response:
        response = await _checked(request)
        response.headers.update(headers)
        return response

    async def _checked(request: Request) -> Response:
        scheme = request.url.scheme
        target = _host_port(request.headers.get("host", ""), scheme)
        if target is None or not host_allowed(target[0], bound):
            return _error(403, "the console answers only requests addressed to this host")
        origin = request.headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            source = _host_port(parts.netloc, parts.scheme) if parts.scheme else None
            if source != target:
                return _error(403, "cross-origin requests to the console are refused")
        if request.method == "POST":
            media_type = request.headers.get("content-type", "").partition(";")[0]
            if media_type.strip().lower() != "application/json":
                return _error(415, "send the body as application/json")
        return await handler(request)

    return guarded


class _CountedStream(StreamingResponse):
    """A stream that calls ``closed`` once it ends, however it ends (also
    when the client left before it started, when its generator never runs)."""

    def __init__(self, content: AsyncIterator[str], closed: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._closed = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._closed()


def console_routes(provider: LocalProvider) -> list[BaseRoute]:
    """Routes for ``/console`` and ``/console/api/...``."""
    page = (resources.files("providers.local") / "console.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        return Response(provider.console_json()[1], media_type="application/json")

    open_streams = 0

    def closed() -> None:
        nonlocal open_streams
        open_streams -= 1

    async def stream(request: Request) -> Response:
        nonlocal open_streams
        if open_streams >= MAX_STREAMS:
            response = _error(503, f"{MAX_STREAMS} console streams are open; retry later")
            response.headers["Retry-After"] = "5"
            return response
        open_streams += 1

        # Set once the service shuts down: the stream ends at once instead
        # of holding the HTTP drain until it is cancelled (see Provider.routes).
        draining: asyncio.Event | None = getattr(request.app.state, "draining", None)

        async def events() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _STREAM_SECONDS
            version = -1
            while True:
                current, payload = provider.console_json()
                if current != version:
                    version = current
                    yield f"data: {payload}\n\n"
                remaining = deadline - loop.time()
                if remaining <= 0 or (draining is not None and draining.is_set()):
                    return
                if await request.is_disconnected():
                    return
                await provider.wait_for_change(version, min(remaining, 5.0), unless=draining)

        return _CountedStream(
            events(),
            closed,
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
                    chat_id,
                    agent,
                    _text(data, "text", limit=_MAX_TEXT, required=True, as_typed=True),
                )
            elif action == "transfer":
                group = _text(data, "group_id", limit=64)
                if group and not GROUP_ID_PATTERN.fullmatch(group):
                    # The session takes it as its group_id, which callers
                    # may pass to a later StartHitl: one StartHitl accepts.
                    raise ValueError(f"group_id {GROUP_ID_RULE}")
                await provider.transfer(chat_id, agent, group, _text(data, "reason", limit=500))
            else:
                await provider.end(chat_id, agent, _text(data, "reason", limit=500))
        except ValueError as exc:
            return _error(400, str(exc))
        except ProviderRejected as exc:
            status = 404 if exc.code == "CHAT_NOT_FOUND" else 409
            return _error(status, str(exc))
        except ProviderError as exc:  # ProviderUnavailable: the store is down, say
            response = _error(503, str(exc))
            response.headers["Retry-After"] = "5"
            return response
        return JSONResponse({"ok": True})

    bound, headers = provider.http_host, security_headers(page)
    return [
        Route("/console", _guard(index, bound, headers), methods=["GET"]),
        Route("/console/api/state", _guard(state, bound, headers), methods=["GET"]),
        Route("/console/api/stream", _guard(stream, bound, headers), methods=["GET"]),
        Route(
            "/console/api/conversations/{chat_id}/{action}",
            _guard(act, bound, headers),
            methods=["POST"],
        ),
    ]
