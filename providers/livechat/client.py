"""A thin async client for the LiveChat HTTP APIs.

One ``httpx.AsyncClient`` serves the agent, customer and configuration chat
APIs (v3.6) and the accounts API. Each method makes exactly one HTTP attempt;
the core owns retries. Transport failures and transient error types become
``ProviderUnavailable``; every other refusal becomes :class:`ApiError`, which
the provider maps to the contract's errors with the context it knows.

Credentials go on each request, never on the client, so fetching a media URL
carries none. The client never stores cookies: customer cookies belong to
one end user each and travel explicitly.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final
from urllib.parse import urljoin

import httpx
import structlog
from prometheus_client import CollectorRegistry, Counter

from hitl_service.secret import Secret
from providers.errors import ProviderUnavailable
from providers.livechat import media_guard
from providers.livechat.models import as_dict, as_int, as_str, loads_json
from providers.livechat.settings import LiveChatSettings

log = structlog.get_logger(__name__)

API_VERSION: Final = "v3.6"
# Types LiveChat uses for trouble on its side; worth retrying (core's policy).
TRANSIENT_TYPES: Final = frozenset(
    {"too_many_requests", "internal", "service_unavailable", "request_timeout"}
)
_SERVER_SIDE_TYPES: Final = frozenset({"internal", "service_unavailable", "request_timeout"})
# Types that are an answer whatever HTTP status carries them (livechat-api.md
# §10: statuses are undocumented, so decide by type): a 5xx does not make
# them worth retrying. An unknown type on a 5xx still counts as trouble.
PERMANENT_TYPES: Final = frozenset(
    {
        "authentication",
        "authorization",
        "missing_access",
        "validation",
        "chat_inactive",
        "not_found",
        "group_not_found",
        "customer_not_found",
        "chat_not_found",
        "entity_too_large",
        "misdirected_request",
        "agent_offline",
        "license_expired",
        "license_not_found",
        "limit_reached",
        "unsupported_version",
        "wrong_product_version",
        "already_exists",
        "customer_banned",
        "group_offline",
        "group_unavailable",
        "groups_offline",
        "greeting_not_found",
        "chat_anonymized",
    }
)
# LiveChat gave up waiting, which the docs do not say stops the work itself.
_STILL_RUNNING_TYPES: Final = frozenset({"request_timeout"})
# Statuses something in between (a proxy, a load balancer) answers, without
# LiveChat's error body, for trouble that passes, as the type to treat them
# as: a 408 is that something giving up, so the call may still run behind it.
_PASSING_STATUSES: Final = {
    408: "request_timeout",
    425: "too_early",
    429: "too_many_requests",
}
_EXCERPT_LIMIT: Final = 80
_HIDDEN_RE: Final = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG_RE: Final = re.compile(r"<[^<>]*>|<")
# Credentials a page might echo back from our request.
_CREDENTIAL_RE: Final = re.compile(
    r"\b(?:basic|bearer)\s+\S+|\b[a-z]{2,8}:(?!//)[A-Za-z0-9_~+/=.-]{8,}", re.IGNORECASE
)
_COOKIE_NAME_RE: Final = re.compile(r"^__lc[A-Za-z0-9_]*$")
_COOKIE_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9._~+/=:-]*$")
_USER_AGENT: Final = "hitl-service-livechat/1"
# livechat-api.md §10: rate limited without Retry-After, back off exponentially
# from 1 s (1, 2, 4 ... capped at 30 s) while the limit lasts.
_RATE_LIMIT_FLOOR: Final = 1.0
_RATE_LIMIT_CAP: Final = 30.0
_MAX_REDIRECTS: Final = 3  # for media URLs


class ApiError(Exception):
    """LiveChat refused a call with a (non-transient) ``error.type``.

    Attributes:
        api: ``agent``, ``customer``, ``configuration`` or ``accounts``.
        method: The method (or endpoint) called.
        type: LiveChat's ``error.type`` (accounts: its ``oauth_exception``).
        detail: LiveChat's message, shortened; never holds our secrets.
        status: The HTTP status.
        data: ``error.data``, if any.
        foreign: The answer was not LiveChat's error body (a proxy's error
            page, say): ``type`` is then ``http_<status>`` and ``detail``
            quotes the start of the page, which is not LiveChat's word.
    """

    def __init__(
        self,
        api: str,
        method: str,
        type_: str,
        detail: str,
        status: int,
        data: Mapping[str, Any] | None = None,
        *,
        foreign: bool = False,
    ) -> None:
        super().__init__(f"LiveChat {api} {method} refused: {type_}: {detail}")
        self.api = api
        self.method = method
        self.type = type_
        self.detail = detail
        self.status = status
        self.data: Mapping[str, Any] = data or {}
        self.foreign = foreign


class AnsweredUnavailable(ProviderUnavailable):
    """A transient failure LiveChat itself answered (a JSON ``error.type``).

    Unlike a timeout or a lost connection, the call is over at LiveChat: it
    can no longer take effect later. A 5xx without LiveChat's error body (a
    proxy or load balancer giving up) and ``request_timeout`` are not this:
    the call may still be running behind them.
    """


class FetchFailed(Exception):
    """A media URL could not be fetched within the limits."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A customer token from the cookie grant.

    Attributes:
        access_token: The customer's Bearer token.
        customer_id: ``entity_id``: the customer id.
        expires_in: Lifetime in seconds.
        organization_id: The organization the token belongs to.
        cookies: The ``__lc_*`` cookies to replay for the same customer.
    """

    access_token: Secret
    customer_id: str
    expires_in: int
    organization_id: str
    cookies: dict[str, str] = field(default_factory=dict, repr=False)  # credentials


@dataclass(frozen=True, slots=True)
class Fetched:
    """Bytes of a fetched media URL."""

    content: bytes
    content_type: str


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Refuses every cookie, so one user's cookies never reach another's call."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(response: httpx.Response) -> str:
    """What an answer that is not LiveChat's says, in a few words: enough to
    recognize the proxy or page that sent it, as one line of plain text,
    markup and anything like a credential left out (a debugging proxy may
    echo our request's headers)."""
    text = response.content[:4096].decode("utf-8", "replace")
    text = _TAG_RE.sub(" ", _HIDDEN_RE.sub(" ", text))
    sent = response.request.headers
    for value in (sent.get("authorization", "").partition(" ")[2], sent.get("cookie", "")):
        for part in filter(None, (p.strip() for p in value.replace(";", " ").split())):
            text = text.replace(part.partition("=")[2] or part, "…")
    text = _CREDENTIAL_RE.sub("…", text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    head = f"HTTP {response.status_code} ({_short(kind, 40)})"
    return f"{head}: “{_short(text, _EXCERPT_LIMIT)}”" if text else f"{head} without text"


def cookie_header(cookies: Mapping[str, str]) -> str:
    """The ``Cookie`` header for a customer's saved ``__lc_*`` cookies."""
    parts = [
        f"{name}={value}"
        for name, value in sorted(cookies.items())
        if _COOKIE_NAME_RE.match(name) and _COOKIE_VALUE_RE.match(value)
    ]
    return "; ".join(parts)


def cookies_from(response: httpx.Response) -> dict[str, str]:
    """The ``__lc_*`` cookies a response sets (empty values are dropped)."""
    found: dict[str, str] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(header)
        except CookieError:
            continue
        for name, morsel in jar.items():
            if _COOKIE_NAME_RE.match(name) and morsel.value:
                found[name] = morsel.value
    return found


async def _read_media(response: httpx.Response, max_bytes: int) -> Fetched:
    """The body of a media answer, refused beyond ``max_bytes``.

    The body is read as sent, never decompressed: httpx would inflate each
    network chunk whole (and a ``Content-Encoding: gzip, gzip`` chain layer
    by layer), so a few hundred bytes from a media host could take
    gigabytes of memory before the limit is checked. The request asks for
    ``identity``; an answer encoded anyway is refused (sent as a link).
    """
    if response.status_code != 200:
        raise FetchFailed(f"HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchFailed("the answer is compressed")
    if as_int(response.headers.get("content-length"), -1) > max_bytes:
        raise FetchFailed("larger than the upload limit")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > max_bytes:
            raise FetchFailed("larger than the upload limit")
        chunks.append(chunk)
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    return Fetched(b"".join(chunks), content_type)


class _Borrowed(httpx.AsyncBaseTransport):
    """An injected transport lent to a short-lived client, which must not close it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Left to the owner."""


class LiveChatClient:
    """Calls the LiveChat APIs; one instance per provider.

    Args:
        settings: Base URLs, credentials and limits.
        transport: httpx transport to use; None for the network.
        registry: Where to register the client's metrics.
    """

    def __init__(
        self,
        settings: LiveChatSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._transport = transport
        # Labels are bounded: our own method names and four outcomes.
        self._requests = Counter(
            "hitl_livechat_api_requests",
            "LiveChat API calls by API, method and outcome (ok, refused, unavailable).",
            ["api", "method", "outcome"],
            registry=registry,
        )
        self._http: httpx.AsyncClient | None = None
        self._warned_lifecycle: set[tuple[str, str]] = set()
        # Rate-limit answers since the last other answer: the limit is the
        # account's, so every call backs off further while it lasts.
        self._rate_limited = 0

    def _rate_limit_wait(self, retry_after: float | None) -> float:
        """The wait for a rate-limit answer: LiveChat's ``Retry-After`` if it
        gave one, else 1 s doubled per rate-limit answer in a row."""
        streak, self._rate_limited = self._rate_limited, min(self._rate_limited + 1, 16)
        if retry_after is not None:
            return retry_after
        return min(_RATE_LIMIT_CAP, _RATE_LIMIT_FLOOR * 2.0**streak)

    async def open(self) -> None:
        """Creates the HTTP client."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                transport=self._transport,
                cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
                headers={"User-Agent": _USER_AGENT},
                timeout=self._settings.request_timeout,
                follow_redirects=False,
            )

    async def aclose(self) -> None:
        """Closes the HTTP client."""
        if self._http is not None:
            http_client, self._http = self._http, None
            await http_client.aclose()

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("LiveChatClient.open() was not called")
        return self._http

    def _timeout(self, timeout: float) -> httpx.Timeout:
        if timeout <= 0:
            raise ProviderUnavailable("the call ran out of time before reaching LiveChat")
        return httpx.Timeout(min(timeout, self._settings.request_timeout))

    def _region_headers(self) -> dict[str, str]:
        return {"X-Region": self._settings.region} if self._settings.region else {}

    async def agent(
        self, method: str, body: Mapping[str, Any], *, timeout: float, idempotent: bool = False
    ) -> Any:
        """Calls an Agent Chat API method with the agent token (Basic)."""
        return await self._action("agent", method, body, timeout=timeout, idempotent=idempotent)

    async def configuration(
        self, method: str, body: Mapping[str, Any], *, timeout: float, idempotent: bool = False
    ) -> Any:
        """Calls a Configuration API method with the agent token (Basic)."""
        return await self._action(
            "configuration", method, body, timeout=timeout, idempotent=idempotent
        )

    async def customer(
        self,
        method: str,
        body: Mapping[str, Any],
        *,
        token: Secret,
        timeout: float,
        idempotent: bool = False,
    ) -> Any:
        """Calls a Customer Chat API method with a customer token (Bearer)."""
        return await self._action(
            "customer", method, body, timeout=timeout, idempotent=idempotent, token=token
        )

    async def customer_upload(
        self, *, token: Secret, filename: str, content: bytes, content_type: str, timeout: float
    ) -> str:
        """Uploads a file with customer ``upload_file``.

        Returns:
            The CDN URL to put in a ``file`` event.
        """
        result = await self._send(
            "customer",
            "upload_file",
            files={"file": (filename, content, content_type or "application/octet-stream")},
            token=token,
            timeout=timeout,
            idempotent=True,  # an upload alone changes nothing the agent sees
        )
        url = as_str(as_dict(result).get("url"))
        if not url:
            raise ApiError("customer", "upload_file", "invalid_response", "no url returned", 200)
        return url

    async def _action(
        self,
        api: str,
        method: str,
        body: Mapping[str, Any],
        *,
        timeout: float,
        idempotent: bool,
        token: Secret | None = None,
    ) -> Any:
        return await self._send(
            api, method, json_body=body, token=token, timeout=timeout, idempotent=idempotent
        )

    async def _send(
        self,
        api: str,
        method: str,
        *,
        timeout: float,
        idempotent: bool,
        json_body: Mapping[str, Any] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
        token: Secret | None = None,
    ) -> Any:
        url = f"{self._settings.api_url}/{API_VERSION}/{api}/action/{method}"
        headers = self._region_headers()
        params: dict[str, str] = {}
        if api == "customer":
            if token is None:
                raise ValueError("customer API calls need a customer token")
            headers["Authorization"] = "Bearer " + token.reveal()
            params["organization_id"] = self._settings.organization_id
        else:
            headers["Authorization"] = "Basic " + self._settings.agent_token.reveal()
        request = self._client.build_request(
            "POST",
            url,
            json=dict(json_body) if json_body is not None else None,
            files=files,
            headers=headers,
            params=params,
            timeout=self._timeout(timeout),
        )
        response = await self._exchange(request, api, method, idempotent=idempotent)
        return self._decode(response, api, method, idempotent=idempotent)

    async def _exchange(
        self, request: httpx.Request, api: str, method: str, *, idempotent: bool
    ) -> httpx.Response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            response = await self._client.send(request)
        except httpx.HTTPError as exc:
            self._requests.labels(api, method, "unavailable").inc()
            raise self._transport_error(exc, request, api, method, idempotent=idempotent) from None
        self._check_lifecycle(api, response)
        log.debug(
            "livechat.call",
            api=api,
            method=method,
            status=response.status_code,
            debug_id=response.headers.get("x-debug-id", ""),
            bytes=len(response.content),
            ms=round((loop.time() - started) * 1000, 1),
        )
        return response

    def _transport_error(
        self,
        exc: httpx.HTTPError,
        request: httpx.Request,
        api: str,
        method: str,
        *,
        idempotent: bool,
    ) -> ProviderUnavailable:
        """Maps a transport failure; ``uncertain`` when the request may have run."""
        where = f"LiveChat {api} {method}"
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return ProviderUnavailable(f"{where}: timed out connecting")
        if isinstance(exc, httpx.TimeoutException):
            log.warning("livechat.timeout", api=api, method=method)
            return ProviderUnavailable(
                f"{where}: timed out waiting for the answer", uncertain=not idempotent
            )
        if isinstance(exc, httpx.ConnectError):
            return ProviderUnavailable(f"{where}: cannot connect to {request.url.netloc.decode()}")
        # The connection broke after the request went out: it may have run.
        log.warning("livechat.connection_lost", api=api, method=method, error=type(exc).__name__)
        return ProviderUnavailable(
            f"{where}: the connection was lost before the answer", uncertain=not idempotent
        )

    def _check_lifecycle(self, api: str, response: httpx.Response) -> None:
        for header in ("legacy", "deprecation"):
            value = response.headers.get(header)
            if value and (header, value) not in self._warned_lifecycle:
                self._warned_lifecycle.add((header, value))
                log.warning(
                    "livechat.api_lifecycle",
                    api=api,
                    stage=header,
                    until=_short(value, 40),
                    version=API_VERSION,
                )

    def _decode(self, response: httpx.Response, api: str, method: str, *, idempotent: bool) -> Any:
        status = response.status_code
        debug_id = response.headers.get("x-debug-id", "")
        try:
            body: Any = loads_json(response.content) if response.content else {}
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            body = None
        if 200 <= status < 300:
            if body is None:
                self._requests.labels(api, method, "unavailable").inc()
                log.warning("livechat.bad_json", api=api, method=method, debug_id=debug_id)
                raise AnsweredUnavailable(
                    f"LiveChat {api} {method}: the answer is not JSON", uncertain=not idempotent
                )
            self._requests.labels(api, method, "ok").inc()
            self._rate_limited = 0  # an answer: the limit is over
            return body
        error = as_dict(as_dict(body).get("error"))
        error_type = as_str(error.get("type"))
        # Without LiveChat's error body the answer comes from something in
        # between (a gateway timing out, a proxy's page): the status is all
        # there is to go by, and a 5xx may leave LiveChat running the call.
        foreign = not error_type
        if foreign:
            error_type = _PASSING_STATUSES.get(status) or (
                "internal" if status >= 500 else f"http_{status}"
            )
        still_running = (foreign and status >= 500) or error_type in _STILL_RUNNING_TYPES
        if error_type != "too_many_requests":
            self._rate_limited = 0
        if foreign:
            detail = excerpt(response)  # the page's own words, not LiveChat's
        else:
            detail = _short(as_str(error.get("message")) or f"HTTP {status}")
        log.warning(
            "livechat.error",
            api=api,
            method=method,
            status=status,
            error_type=error_type,
            debug_id=debug_id,
            **({"foreign": True, "bytes": len(response.content)} if foreign else {}),
        )
        transient = (
            error_type in TRANSIENT_TYPES
            or (status >= 500 and error_type not in PERMANENT_TYPES)
            or (foreign and status in _PASSING_STATUSES)
        )
        self._requests.labels(api, method, "unavailable" if transient else "refused").inc()
        if still_running:
            raise ProviderUnavailable(
                f"LiveChat {api} {method}: no answer from LiveChat ({error_type}: {detail})",
                retry_after=_retry_after(response.headers),
                uncertain=not idempotent,
            )
        if transient:
            server_side = error_type in _SERVER_SIDE_TYPES or status >= 500
            retry_after = _retry_after(response.headers)
            if error_type == "too_many_requests":
                retry_after = self._rate_limit_wait(retry_after)
            raise AnsweredUnavailable(
                f"LiveChat {api} {method} failed: {error_type}: {detail}",
                retry_after=retry_after,
                uncertain=server_side and not idempotent,
            )
        raise ApiError(
            api, method, error_type, detail, status, as_dict(error.get("data")), foreign=foreign
        )

    async def customer_token(self, cookies: Mapping[str, str], *, timeout: float) -> TokenGrant:
        """Runs the ``cookie`` grant: a token for the customer the cookies name.

        Without cookies LiveChat creates a new customer; with them it returns
        a fresh token for the same one.

        Raises:
            ApiError: The accounts API refused (``type`` is its
                ``oauth_exception``).
            ProviderUnavailable: Transport failure or server trouble.
        """
        s = self._settings
        body = {
            "grant_type": "cookie",
            "client_id": s.client_id,
            "response_type": "token",
            "organization_id": s.organization_id,
            "redirect_uri": s.redirect_uri,
        }
        headers = self._region_headers()
        if jar := cookie_header(cookies):
            headers["Cookie"] = jar
        request = self._client.build_request(
            "POST",
            f"{s.accounts_url}/v2/customer/token",
            json=body,
            headers=headers,
            timeout=self._timeout(timeout),
        )
        # Without cookies a lost answer may have created a customer we never learn of.
        response = await self._exchange(request, "accounts", "customer_token", idempotent=True)
        status = response.status_code
        try:
            payload = as_dict(loads_json(response.content))
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            payload = {}
        outcome = "ok" if 200 <= status < 300 else "refused"
        if status != 429:
            self._rate_limited = 0
        if status in _PASSING_STATUSES or status >= 500:
            outcome = "unavailable"
        self._requests.labels("accounts", "customer_token", outcome).inc()
        if outcome == "unavailable":
            retry_after = _retry_after(response.headers)
            if status == 429:
                retry_after = self._rate_limit_wait(retry_after)
            raise ProviderUnavailable(
                f"LiveChat accounts customer token: HTTP {status}", retry_after=retry_after
            )
        if not 200 <= status < 300:
            kind = as_str(payload.get("oauth_exception")) or as_str(
                as_dict(payload.get("error")).get("type")
            )
            detail = as_str(payload.get("exception_description")) or as_str(
                as_dict(payload.get("error")).get("message")
            )
            log.warning("livechat.error", api="accounts", status=status, error_type=kind)
            if not kind:  # not the accounts API's error body: a proxy's page, say
                raise ApiError(
                    "accounts",
                    "customer_token",
                    f"http_{status}",
                    excerpt(response),
                    status,
                    foreign=True,
                )
            raise ApiError("accounts", "customer_token", kind, _short(detail), status)
        access_token = as_str(payload.get("access_token"))
        customer_id = as_str(payload.get("entity_id"))
        if not access_token or not customer_id:
            raise ProviderUnavailable("LiveChat accounts customer token: incomplete answer")
        merged = {**dict(cookies), **cookies_from(response)}
        return TokenGrant(
            access_token=Secret(access_token),
            customer_id=customer_id,
            expires_in=as_int(payload.get("expires_in"), 28800) or 28800,
            organization_id=as_str(payload.get("organization_id")),
            cookies=merged,
        )

    async def fetch(self, url: str, *, max_bytes: int, timeout: float) -> Fetched:
        """Downloads a media URL given by the caller, up to ``max_bytes``.

        No credentials are sent. Only URLs ``media_guard`` lets through are
        fetched, each redirect checked again (up to ``_MAX_REDIRECTS``). Each
        fetch has a client of its own: connections go to checked addresses,
        and a pooled one must never serve another host name.

        Raises:
            FetchFailed: Refused by the guard, unreachable, not 200, or larger
                than ``max_bytes``.
        """
        transport = _Borrowed(self._transport) if self._transport is not None else None
        try:
            request_timeout = self._timeout(timeout)  # ProviderUnavailable when none is left
            # One bound for everything: name lookups, every hop, the body.
            async with (
                asyncio.timeout(timeout),
                httpx.AsyncClient(
                    transport=transport,
                    cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
                    headers={"User-Agent": _USER_AGENT},
                    follow_redirects=False,
                ) as client,
            ):
                for _hop in range(_MAX_REDIRECTS + 1):
                    pinned = await media_guard.vet(url, self._settings.media_hosts)
                    async with client.stream(
                        "GET",
                        pinned.url,
                        headers={"Host": pinned.host_header, "Accept-Encoding": "identity"},
                        timeout=request_timeout,
                        extensions={"sni_hostname": pinned.sni_hostname},
                    ) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        return await _read_media(response, max_bytes)
                raise FetchFailed("too many redirects")
        except media_guard.MediaRefused as exc:
            raise FetchFailed(str(exc)) from None
        except httpx.HTTPError as exc:
            raise FetchFailed(type(exc).__name__) from None
        except (ProviderUnavailable, TimeoutError):
            raise FetchFailed("no time left") from None
