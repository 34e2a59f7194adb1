"""The fake's Starlette app: accounts, chat APIs, CDN, media and control routes."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_livechat import agent_api, configuration_api, customer_api
from tests.fake_livechat.control_api import control_routes
from tests.fake_livechat.errors import LcError, OAuthError
from tests.fake_livechat.faults import Fault
from tests.fake_livechat.http_util import (
    DroppedResponse,
    auth_of,
    debug_headers,
    decode_basic,
    error_response,
    json_response,
    parse_cookies,
    parse_multipart,
)
from tests.fake_livechat.model import Call

if TYPE_CHECKING:
    from tests.fake_livechat.server import FakeLiveChat

_SAFE_HEADERS = ("x-region", "user-agent", "content-type", "cookie", "x-api-version")


def _record(fake: FakeLiveChat, request: Request, api: str, method: str, body: Any) -> Call:
    scheme, _ = auth_of(request)
    call = Call(
        api=api,
        method=method,
        body=body,
        auth=scheme if scheme in ("basic", "bearer", "none") else "other",
        query=dict(request.query_params),
        headers={k: v for k, v in request.headers.items() if k in _SAFE_HEADERS},
        path=request.url.path,
    )
    fake.state.calls.append(call)
    return call


async def _pre_fault(fake: FakeLiveChat, fault: Fault | None, call: Call) -> Response | None:
    """Faults that act before the method runs."""
    if fault is None:
        return None
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    if fault.kind == "delay":
        await fake.wait_released(fault.delay)
        return None
    if fault.kind == "drop":
        call.error_type = "dropped"
        return DroppedResponse()
    if fault.kind == "status":
        call.status = fault.status or 500
        return Response(
            fault.body, status_code=call.status, headers=headers, media_type=fault.content_type
        )
    if fault.kind == "error" and call.api == "accounts":
        # The accounts host has its own error format (livechat-api.md §4.3).
        oauth = OAuthError(fault.error_type, fault.message, fault.status or 401)
        call.status, call.error_type = oauth.status, oauth.kind
        return JSONResponse(oauth.body(), status_code=oauth.status, headers=headers)
    if fault.kind == "error":
        status = fault.status or fake.state.config.status_for(fault.error_type)
        call.status, call.error_type = status, fault.error_type
        return error_response(LcError(fault.error_type, fault.message, fault.data), status, headers)
    return None


def _post_fault(fault: Fault | None, call: Call) -> Response | None:
    """Faults that act after the method ran."""
    if fault is None:
        return None
    if fault.kind == "lost_response":
        call.error_type = "lost_response"
        return DroppedResponse()
    if fault.kind == "bad_json":
        call.error_type = "bad_json"
        return Response("{not json", media_type="application/json", headers=debug_headers())
    return None


async def chat_api(request: Request) -> Response:
    """``POST /v3.x/{agent,customer,configuration}/action/<method>``."""
    fake: FakeLiveChat = request.app.state.fake
    state = fake.state
    version, api, method = (request.path_params[k] for k in ("version", "api", "method"))
    raw = await request.body()
    content_type = request.headers.get("content-type", "")
    is_upload = content_type.startswith("multipart/form-data")
    body: Any
    try:
        body = {} if is_upload or not raw else json.loads(raw)
        bad_json = False
    except ValueError:
        body, bad_json = raw[:200].decode("utf-8", "replace"), True
    call = _record(fake, request, api, method, "<multipart>" if is_upload else body)
    fault = fake.faults.take(api, method)
    if (early := await _pre_fault(fake, fault, call)) is not None:
        return early
    lifecycle: dict[str, str] = {}
    if version == "v3.5":
        lifecycle["Legacy"] = "2026-12-31"
    if state.config.legacy_header:
        lifecycle["Legacy"] = state.config.legacy_header
    if state.config.deprecation_header:
        lifecycle["Deprecation"] = state.config.deprecation_header
    try:
        if version not in ("v3.5", "v3.6"):
            raise LcError("unsupported_version", f"API version {version} is not served")
        if bad_json or not isinstance(body, dict):
            raise LcError("validation", "Invalid message")
        result = _run(fake, request, api, method, body, raw, content_type)
    except LcError as error:
        status = state.config.status_for(error.type)
        call.status, call.error_type = status, error.type
        return error_response(error, status, lifecycle)
    call.status = 200
    if (late := _post_fault(fault, call)) is not None:
        return late
    return json_response(result, lifecycle)


def _run(
    fake: FakeLiveChat,
    request: Request,
    api: str,
    method: str,
    body: dict[str, Any],
    raw: bytes,
    content_type: str,
) -> Any:
    state = fake.state
    scheme, credentials = auth_of(request)
    if api == "customer":
        if scheme != "bearer":
            raise LcError("authentication", "Invalid access token")
        customer = state.customer_for_token(credentials)
        if request.query_params.get("organization_id") != state.seed.organization_id:
            raise LcError(state.config.org_error_type, "organization_id is missing or invalid")
        if method == "upload_file":
            return _upload(fake, raw, content_type)
        customer_handler = customer_api.METHODS.get(method)
        if customer_handler is None:
            raise LcError(state.config.unknown_method_error, f"Method {method} not found")
        return customer_handler(state, customer, body)
    if scheme == "basic":
        agent = state.agent_for_basic(*decode_basic(credentials))
    elif scheme == "bearer":
        agent = state.agent_for_bearer(credentials)
    else:
        raise LcError("authentication", "Invalid access token")
    if api == "agent" and method == "upload_file":
        return _upload(fake, raw, content_type)
    table = agent_api.METHODS if api == "agent" else configuration_api.METHODS
    handler = table.get(method)
    if handler is None:
        raise LcError(state.config.unknown_method_error, f"Method {method} not found")
    return handler(state, agent, body)


def _upload(fake: FakeLiveChat, raw: bytes, content_type: str) -> Any:
    if not content_type.startswith("multipart/form-data"):
        raise LcError("validation", "upload_file needs multipart/form-data")
    fields = parse_multipart(content_type, raw)
    if "file" not in fields:
        raise LcError("validation", "field file is required")
    name, content, file_type = fields["file"]
    return fake.state.upload(name or "file", content, file_type)


async def customer_token(request: Request) -> Response:
    """``POST /v2/customer/token`` (cookie and agent_token grants)."""
    fake: FakeLiveChat = request.app.state.fake
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    call = _record(fake, request, "accounts", "customer_token", body)
    fault = fake.faults.take("accounts", "customer_token")
    if (early := await _pre_fault(fake, fault, call)) is not None:
        return early
    scheme, credentials = auth_of(request)
    cookies = parse_cookies(request.headers.get("cookie", ""))
    try:
        answer, customer = fake.state.customer_token(
            body, cookies, credentials if scheme == "bearer" else ""
        )
    except OAuthError as error:
        call.status, call.error_type = error.status, error.kind
        return JSONResponse(error.body(), status_code=error.status)
    call.status = 200
    if (late := _post_fault(fault, call)) is not None:
        return late
    response = JSONResponse(answer)
    # Host-only cookies (no Domain), so a client jar that kept them would
    # leak them into other users' grants, which a test would notice.
    for name, value in (("__lc_cid", customer.cid), ("__lc_cst", customer.cst)):
        response.set_cookie(
            name, value, max_age=63072000, path="/v2/customer", httponly=True, samesite="none"
        )
    return response


async def cdn(request: Request) -> Response:
    """``GET /cdn/<id>/<name>``: files uploaded with ``upload_file``."""
    stored = request.app.state.fake.state.file(request.path_params["file_id"])
    if stored is None:
        return Response(status_code=404)
    content, _, content_type, _ = stored
    return Response(content, media_type=content_type)


async def media(request: Request) -> Response:
    """``GET /_media/<size>/<name>``: a caller's media URL serving ``size`` bytes
    (``?redirect=<url>``: a 302 there instead; ``?gzip_layers=N``: ``size``
    zero bytes gzipped N times, sent with ``Content-Encoding: gzip`` N times
    whatever the request accepts: a compression bomb)."""
    fake: FakeLiveChat = request.app.state.fake
    _record(fake, request, "media", request.path_params["name"], None)
    if request.path_params["name"].startswith("missing"):
        return Response(status_code=404)
    if target := request.query_params.get("redirect"):
        return Response(status_code=302, headers={"Location": target})
    size = int(request.path_params["size"])
    content_type = request.query_params.get("type", "application/octet-stream")
    if layers := int(request.query_params.get("gzip_layers", "0")):
        body = _gzipped_zeros(size)  # never holds the zeros themselves
        for _ in range(layers - 1):
            body = gzip.compress(body)
        encoding = ", ".join(["gzip"] * layers)
        return Response(body, media_type=content_type, headers={"Content-Encoding": encoding})
    return Response((bytes(range(251)) * (size // 251 + 1))[:size], media_type=content_type)


def _gzipped_zeros(size: int) -> bytes:
    """``gzip.compress(bytes(size))``, compressed a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    block = bytes(min(size, 1 << 20))
    parts = []
    for start in range(0, size, len(block) or 1):
        parts.append(packer.compress(block[: size - start]))
    parts.append(packer.flush())
    return b"".join(parts)


def build_app(fake: FakeLiveChat) -> Starlette:
    """The fake's ASGI app."""
    app = Starlette(
        routes=[
            Route("/{version:str}/{api:str}/action/{method:str}", chat_api, methods=["POST"]),
            Route("/v2/customer/token", customer_token, methods=["POST"]),
            Route("/cdn/{file_id:str}/{name:str}", cdn, methods=["GET"]),
            Route("/_media/{size:int}/{name:str}", media, methods=["GET"]),
            *control_routes(),
        ]
    )
    app.state.fake = fake
    return app
