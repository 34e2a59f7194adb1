"""LiveChat refusals to the contract's errors, with the setting to fix."""

from __future__ import annotations

import re
from typing import Final

from providers.errors import (
    ChatInactive,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
)
from providers.livechat import settings as names
from providers.livechat.client import ApiError
from providers.livechat.models import as_str

NO_AGENT_MARKER: Final = "cannot assign any agent"
_CODE_RE: Final = re.compile(r"[^A-Z0-9]+")


def code_for(error_type: str) -> str:
    """A stable UPPER_SNAKE code for a LiveChat error type."""
    return _CODE_RE.sub("_", error_type.upper()).strip("_") or "REJECTED"


def is_no_agent(err: ApiError) -> bool:
    """The transfer error LiveChat gives when no agent can take a chat."""
    return err.type == "validation" and NO_AGENT_MARKER in err.detail.lower()


def is_group_error(err: ApiError) -> bool:
    """An unknown group id."""
    return err.type == "group_not_found" or (
        err.type in ("validation", "not_found") and "group" in err.detail.lower()
    )


def group_error(err: ApiError, group_id: int, default_group: int) -> ProviderError:
    """An unknown group: a setting problem for the default, else a bad request."""
    if group_id == default_group:
        return ProviderAuthError(
            names.GROUP_ID,
            f"LiveChat has no group {group_id}; set {names.GROUP_ID} to an existing group "
            "(Agents > Groups shows the numbers; 0 is General)",
        )
    return ProviderRejected("GROUP_NOT_FOUND", f"LiveChat has no group {group_id}")


def foreign_error(err: ApiError) -> ProviderError:
    """A refusal that is not LiveChat's (its error body missing): a proxy,
    a load balancer or a wrong base URL answered. Its page is not read for
    LiveChat's wording: "client" on a proxy's page names no setting."""
    setting = names.ACCOUNTS_URL if err.api == "accounts" else names.API_URL
    return ProviderRejected(
        code_for(err.type),
        f"LiveChat {err.method}: {err.detail}, not LiveChat's error answer: something between "
        f"the service and LiveChat answered (a proxy or load balancer), or {setting} is wrong",
    )


def token_error(err: ApiError) -> ProviderError:
    """The accounts API refused the customer-token grant."""
    if err.foreign:
        return foreign_error(err)
    text = err.detail.lower()
    if "redirect" in text:
        return ProviderAuthError(
            names.REDIRECT_URI,
            f"LiveChat refused the redirect URI; {names.REDIRECT_URI} must be one of the "
            "Redirect URIs registered for the app in the Developer Console",
        )
    if "organization" in text or "license" in text:
        return ProviderAuthError(
            names.ORGANIZATION_ID,
            f"LiveChat refused the organization id; check {names.ORGANIZATION_ID} "
            "(Developer Console > Settings > Account)",
        )
    if err.type in ("invalid_client", "unauthorized_client", "access_denied") or "client" in text:
        return ProviderAuthError(
            names.CLIENT_ID,
            f"LiveChat refused the app's client id ({err.type}); check {names.CLIENT_ID} "
            "and that the app is installed on the account",
        )
    return ProviderRejected(
        "CUSTOMER_TOKEN_REFUSED", f"LiveChat refused a customer token: {err.type}: {err.detail}"
    )


def map_api_error(err: ApiError) -> ProviderError:
    """The contract error for a refusal no caller handled more precisely."""
    kind = err.type
    if err.foreign:
        return foreign_error(err)
    if err.api == "accounts":
        return token_error(err)
    if kind == "chat_inactive":
        return ChatInactive()
    if kind == "misdirected_request":
        region = as_str(err.data.get("region")) or "the region LiveChat names"
        return ProviderAuthError(
            names.REGION,
            f"LiveChat serves this account from another data centre; set {names.REGION}={region}",
        )
    if "organization" in err.detail.lower() and err.api == "customer":
        return ProviderAuthError(
            names.ORGANIZATION_ID,
            f"LiveChat refused the organization id ({kind}); check {names.ORGANIZATION_ID}",
        )
    if kind == "authentication":
        if err.api == "customer":
            return ProviderRejected(
                "CUSTOMER_TOKEN_REFUSED", "LiveChat refused the end user's customer token"
            )
        return ProviderAuthError(
            names.AGENT_TOKEN,
            f"LiveChat refused the agent token; {names.AGENT_TOKEN} must be the Base64 of "
            "account_id:PAT of a valid personal access token",
        )
    if kind in ("authorization", "missing_access"):
        return ProviderAuthError(
            names.AGENT_TOKEN,
            f"the personal access token in {names.AGENT_TOKEN} lacks a scope or access needed "
            f"for {err.method} ({kind}); create one with the scopes docs/livechat.md lists",
        )
    if kind in ("license_expired", "license_not_found", "wrong_product_version"):
        setting = names.ORGANIZATION_ID if err.api == "customer" else names.AGENT_TOKEN
        return ProviderAuthError(setting, f"LiveChat says the account cannot be used: {kind}")
    return ProviderRejected(code_for(kind), f"LiveChat refused {err.method}: {kind}: {err.detail}")
