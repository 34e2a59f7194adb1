"""LiveChat settings, read from ``HITL_LIVECHAT_*`` variables.

Every problem is reported as ``ProviderConfigError(setting, message)`` at
``create()`` time; messages never repeat the value of a secret.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from hitl_service.secret import Secret
from providers.errors import ProviderConfigError

CLIENT_ID = "HITL_LIVECHAT_CLIENT_ID"
ORGANIZATION_ID = "HITL_LIVECHAT_ORGANIZATION_ID"
AGENT_TOKEN = "HITL_LIVECHAT_AGENT_TOKEN"  # noqa: S105 - a variable name, not a secret
AGENT_ID = "HITL_LIVECHAT_AGENT_ID"
WEBHOOK_SECRET = "HITL_LIVECHAT_WEBHOOK_SECRET"  # noqa: S105 - a variable name
WEBHOOK_SECRET_PREVIOUS = "HITL_LIVECHAT_WEBHOOK_SECRET_PREVIOUS"  # noqa: S105 - a variable name
GROUP_ID = "HITL_LIVECHAT_GROUP_ID"
REDIRECT_URI = "HITL_LIVECHAT_REDIRECT_URI"
API_URL = "HITL_LIVECHAT_API_URL"
ACCOUNTS_URL = "HITL_LIVECHAT_ACCOUNTS_URL"
REGION = "HITL_LIVECHAT_REGION"
REQUEST_TIMEOUT = "HITL_LIVECHAT_REQUEST_TIMEOUT"
SERVER_TIMEOUT = "HITL_LIVECHAT_SERVER_TIMEOUT"
MAX_UPLOAD_BYTES = "HITL_LIVECHAT_MAX_UPLOAD_BYTES"
MEDIA_HOSTS = "HITL_LIVECHAT_MEDIA_HOSTS"

DEFAULT_API_URL = "https://api.livechatinc.com"
DEFAULT_ACCOUNTS_URL = "https://accounts.livechat.com"
_TEN_MB = 10 * 1024 * 1024
_REGION_RE = re.compile(r"^[a-z]{2,8}$")
_HOST_PATTERN_RE = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^[0-9a-f:.]+$")


@dataclass(frozen=True, slots=True)
class LiveChatSettings:
    """Validated LiveChat configuration.

    Attributes:
        client_id: The LiveChat app's client id (customer tokens, webhooks).
        organization_id: The organization UUID, lower-case.
        account_id: The account id inside the agent token (the bridge itself).
        agent_token: Base64 of ``account_id:PAT``, used as Basic credentials.
        agent_id: The bridge agent's login e-mail, if configured; events it
            authored are echoes.
        webhook_secrets: Every secret a webhook may carry (current first).
        group_id: The default group new chats are routed to.
        redirect_uri: A redirect URI registered for the app.
        api_url: Base of the chat and configuration APIs, without a slash.
        accounts_url: Base of the accounts API, without a slash.
        region: Value of the ``X-Region`` header; empty sends none.
        request_timeout: Upper bound of one HTTP call, in seconds.
        max_upload_bytes: Largest media file fetched and uploaded.
        media_hosts: Hosts media may be fetched from (``host`` or
            ``*.domain``), private addresses included; empty: any host whose
            addresses are all public.
        server_timeout: How long LiveChat may keep working on a call (its
            documented 15 s server timeout). A send we got no answer for can
            still take effect until then, so it is looked for only after.
    """

    client_id: str
    organization_id: str
    account_id: str
    agent_token: Secret
    agent_id: str
    webhook_secrets: tuple[Secret, ...]
    group_id: int
    redirect_uri: str
    api_url: str
    accounts_url: str
    region: str = ""
    request_timeout: float = 15.0
    max_upload_bytes: int = _TEN_MB
    media_hosts: tuple[str, ...] = ()
    server_timeout: float = 15.0


MAX_GROUP_ID: Final = 2**31 - 1


def is_group_number(text: str) -> bool:
    """Whether ``text`` is a LiveChat group number: ASCII digits, at most
    ``MAX_GROUP_ID`` (LiveChat numbers a license's groups from 0; a larger
    number is a mistake, and one past 2^53 would not survive a JSON parser)."""
    return _is_count(text, 10) and int(text) <= MAX_GROUP_ID


def _is_count(text: str, digits: int) -> bool:
    """ASCII digits, at most ``digits`` of them past leading zeros (int()
    of a string past 4300 digits raises, and takes any script's digits)."""
    return text.isascii() and text.isdecimal() and len(text.lstrip("0")) <= digits


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _required(env: Mapping[str, str], name: str, what: str) -> str:
    value = _get(env, name)
    if not value:
        raise ProviderConfigError(name, f"is not set; it must hold {what}")
    return value


def _base_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name) or default
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProviderConfigError(name, "must be an http(s) URL such as " + default)
    return value.rstrip("/")


def decode_agent_token(token: str) -> tuple[str, str]:
    """Splits the Developer Console's Base64 agent token.

    Returns:
        ``(account_id, pat)``.

    Raises:
        ProviderConfigError: It is not Base64 of ``account_id:PAT``. The
            message never contains the token.
    """
    try:
        raw = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ProviderConfigError(
            AGENT_TOKEN,
            "is not valid Base64; paste the Base64 string of account_id:PAT "
            "that the Developer Console shows next to the personal access token",
        ) from None
    account_id, sep, pat = raw.partition(":")
    if not sep or not account_id.strip() or not pat.strip():
        raise ProviderConfigError(
            AGENT_TOKEN, "does not decode to account_id:PAT (the colon or a part is missing)"
        )
    return account_id.strip(), pat


# Seconds, or a duration as the core's settings take it (``15s``, ``500ms``, ``1m``).
_SECONDS_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "": 1.0}


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _get(env, name)
    if not value:
        return default
    match = _SECONDS_RE.fullmatch(value)
    if match is None:
        raise ProviderConfigError(name, "must be a number of seconds, or a duration like 15s")
    number = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < number < 3600:
        raise ProviderConfigError(name, "must be more than 0 seconds and under an hour")
    return number


def parse_settings(env: Mapping[str, str]) -> LiveChatSettings:
    """Reads and validates the ``HITL_LIVECHAT_*`` variables.

    Raises:
        ProviderConfigError: A required variable is missing or malformed.
    """
    client_id = _required(env, CLIENT_ID, "the Client ID of your LiveChat app")
    org = _required(env, ORGANIZATION_ID, "the organization id (a UUID)")
    try:
        organization_id = str(uuid.UUID(org))
    except ValueError:
        raise ProviderConfigError(
            ORGANIZATION_ID, "must be a UUID (Developer Console > Settings > Account)"
        ) from None
    token = _required(env, AGENT_TOKEN, "the Base64 of account_id:PAT")
    account_id, _pat = decode_agent_token(token)
    secret = _required(env, WEBHOOK_SECRET, "the secret LiveChat puts in every webhook")
    secrets = [Secret(secret)]
    if previous := _get(env, WEBHOOK_SECRET_PREVIOUS):
        secrets.append(Secret(previous))
    group = _get(env, GROUP_ID) or "0"
    if not is_group_number(group):
        raise ProviderConfigError(
            GROUP_ID, "must be a LiveChat group number such as 0 or 19 (up to 2147483647)"
        )
    redirect_uri = _required(env, REDIRECT_URI, "one of your app's registered redirect URIs")
    if urlsplit(redirect_uri).scheme not in ("http", "https"):
        raise ProviderConfigError(REDIRECT_URI, "must be an http(s) URL registered for the app")
    region = _get(env, REGION).lower()
    if region and not _REGION_RE.match(region):
        raise ProviderConfigError(REGION, "must be a data-centre prefix such as dal or fra")
    max_upload = _get(env, MAX_UPLOAD_BYTES)
    if max_upload and not (_is_count(max_upload, 8) and 0 < int(max_upload) <= _TEN_MB):
        raise ProviderConfigError(MAX_UPLOAD_BYTES, "must be a byte count up to 10485760")
    media_hosts = tuple(h.strip().lower() for h in _get(env, MEDIA_HOSTS).split(",") if h.strip())
    for host in media_hosts:
        if not _HOST_PATTERN_RE.match(host):
            raise ProviderConfigError(
                MEDIA_HOSTS,
                "must be host names or addresses, comma-separated, such as "
                "cdn.example.com, *.files.example.com or 10.0.0.5 (no scheme, port or path)",
            )
    return LiveChatSettings(
        client_id=client_id,
        organization_id=organization_id,
        account_id=account_id,
        agent_token=Secret(token),
        agent_id=_get(env, AGENT_ID),
        webhook_secrets=tuple(secrets),
        group_id=int(group),
        redirect_uri=redirect_uri,
        api_url=_base_url(env, API_URL, DEFAULT_API_URL),
        accounts_url=_base_url(env, ACCOUNTS_URL, DEFAULT_ACCOUNTS_URL),
        region=region,
        request_timeout=_seconds(env, REQUEST_TIMEOUT, 15.0),
        max_upload_bytes=int(max_upload) if max_upload else _TEN_MB,
        media_hosts=media_hosts,
        server_timeout=_seconds(env, SERVER_TIMEOUT, 15.0),
    )
