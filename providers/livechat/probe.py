"""``probe``: checks each LiveChat setting and names the one that is wrong."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from providers.errors import ProviderAuthError, ProviderError
from providers.livechat import settings as names
from providers.livechat.budget import Budget
from providers.livechat.client import ApiError
from providers.livechat.failures import is_group_error, map_api_error, token_error
from providers.livechat.models import as_dict, as_str

if TYPE_CHECKING:
    from providers.livechat.provider import LiveChatProvider

log = structlog.get_logger(__name__)

PROBE_COOKIES_FILE: Final = "livechat-probe-customer.json"
"""Where the probe keeps its customer's cookies, so repeated checks reuse one
LiveChat customer instead of creating a new one each time."""


def _problem(err: ProviderError) -> str:
    setting = getattr(err, "setting", "")
    text = str(err)
    return text if not setting or text.startswith(setting) else f"{setting}: {text}"


def _read_cookies(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: as_str(v) for k, v in as_dict(as_dict(data).get("cookies")).items()}


def _write_cookies(path: Path, cookies: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"cookies": cookies}, handle)
    except OSError as exc:
        log.warning("livechat.probe_cookies_not_saved", error=type(exc).__name__)


async def run_probe(provider: LiveChatProvider, budget: Budget) -> list[str]:
    """Checks the agent token, the default group and the customer settings.

    Returns:
        Problems in plain words, each starting with the setting to fix.
    """
    client, s = provider.client, provider.settings
    problems: list[str] = []
    token_ok = True
    try:
        await client.agent("list_chats", {"limit": 1}, timeout=budget.left(), idempotent=True)
    except ApiError as err:
        token_ok = err.type not in ("authentication", "misdirected_request")
        problems.append(_problem(map_api_error(err)))
    if token_ok:
        try:
            await client.configuration(
                "get_group", {"id": s.group_id}, timeout=budget.left(), idempotent=True
            )
        except ApiError as err:
            if is_group_error(err):
                problems.append(
                    f"{names.GROUP_ID}: LiveChat has no group {s.group_id}; use an existing "
                    "group number (0 is General)"
                )
            elif err.type in ("authorization", "missing_access"):
                problems.append(
                    f"{names.AGENT_TOKEN}: the personal access token cannot read groups; "
                    "give it the groups--my:ro (or groups--all:ro) scope"
                )
            else:
                problems.append(_problem(map_api_error(err)))
    problems.extend(await _probe_customer(provider, budget))
    return problems


async def _probe_customer(provider: LiveChatProvider, budget: Budget) -> list[str]:
    client, s = provider.client, provider.settings
    path = provider.data_dir / PROBE_COOKIES_FILE
    cookies = await asyncio.to_thread(_read_cookies, path)
    try:
        grant = await client.customer_token(cookies, timeout=budget.left())
    except ApiError as err:
        return [_problem(token_error(err))]
    await asyncio.to_thread(_write_cookies, path, grant.cookies)
    if grant.organization_id and grant.organization_id.lower() != s.organization_id:
        return [
            f"{names.ORGANIZATION_ID}: LiveChat says the app belongs to another organization; "
            "copy the id from Developer Console > Settings > Account"
        ]
    try:
        await client.customer(
            "list_chats",
            {"limit": 1},
            token=grant.access_token,
            timeout=budget.left(),
            idempotent=True,
        )
    except ApiError as err:
        mapped = map_api_error(err)
        if isinstance(mapped, ProviderAuthError):
            return [_problem(mapped)]
        return [
            f"{names.ORGANIZATION_ID}: LiveChat refused a customer call ({err.type}); check "
            "the organization id"
        ]
    return []
