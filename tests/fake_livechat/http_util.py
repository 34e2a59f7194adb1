"""HTTP helpers of the fake: auth headers, multipart, odd responses."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tests.fake_livechat.errors import LcError


def auth_of(request: Request) -> tuple[str, str]:
    """``(scheme, credentials)`` of the Authorization header (lower-case scheme)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return (scheme.lower() if header else "none"), value.strip()


def decode_basic(value: str) -> tuple[str, str]:
    """``(account_id, pat)``; Basic splits at the first colon (PATs hold one)."""
    try:
        raw = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise LcError("authentication", "Invalid access token") from None
    account_id, sep, pat = raw.partition(":")
    if not sep:
        raise LcError("authentication", "Invalid access token")
    return account_id, pat


def parse_cookies(header: str) -> dict[str, str]:
    """A ``Cookie`` header as a dict."""
    cookies = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            cookies[name] = value
    return cookies


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes, str]]:
    """``{field: (filename, content, content_type)}`` of a multipart body.

    A small parser, because Starlette's needs python-multipart, which the
    project does not depend on.
    """
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise LcError("validation", "multipart boundary missing")
    fields: dict[str, tuple[str, bytes, str]] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n")
        head, _, content = chunk.partition(b"\r\n\r\n")
        content = content.removesuffix(b"\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = {}
        for item in headers.get("content-disposition", "").split(";")[1:]:
            key, _, value = item.strip().partition("=")
            disposition[key] = value.strip('"')
        if "name" in disposition:
            fields[disposition["name"]] = (
                disposition.get("filename", ""),
                content,
                headers.get("content-type", "application/octet-stream"),
            )
    return fields


def debug_headers() -> dict[str, str]:
    """Headers every chat API answer carries."""
    return {"x-debug-id": secrets.token_hex(8)}


def error_response(
    error: LcError, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A LiveChat error answer."""
    return JSONResponse(
        error.body(), status_code=status, headers={**debug_headers(), **(headers or {})}
    )


def json_response(data: Any, headers: dict[str, str] | None = None) -> Response:
    """A success answer."""
    return Response(
        json.dumps(data),
        media_type="application/json",
        headers={**debug_headers(), **(headers or {})},
    )


class DroppedResponse(Response):
    """Starts a response and then abandons it, so the client sees the
    connection close before the answer is complete ("lost response")."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )
        # Returning without the body makes uvicorn close the connection.
