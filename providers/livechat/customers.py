"""End users as LiveChat customers: identity, tokens and customer API calls.

Each end user gets a customer through the ``cookie`` grant. The grant's
``__lc_cid``/``__lc_cst`` cookies are kept in ``ProviderUser.state``, so the
identity stays stable and the 8-hour token can be renewed by replaying them.
State keys: ``customer_id``, ``access_token``, ``expires_at`` (Unix seconds),
``cookies``, ``profile`` (a fingerprint of what was last sent) and ``chat_id``
(the customer's one chat, once known).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

import structlog

from hitl_service.clock import Clock
from hitl_service.secret import Secret
from providers.errors import ProviderAuthError, ProviderRejected
from providers.livechat import settings as names
from providers.livechat.budget import Budget
from providers.livechat.client import ApiError, LiveChatClient, TokenGrant
from providers.livechat.failures import token_error
from providers.livechat.models import as_dict, as_str
from providers.types import ProviderUser, UserProfile

log = structlog.get_logger(__name__)

REFRESH_MARGIN: Final = 15 * 60
"""Renew a customer token this many seconds before it expires."""


class Customers:
    """Creates and refreshes customer identities and calls the customer API.

    Args:
        client: The LiveChat client.
        clock: Wall time for token expiry.
        organization_id: The configured organization, to check grants against.
    """

    def __init__(self, client: LiveChatClient, clock: Clock, organization_id: str) -> None:
        self._client = client
        self._clock = clock
        self._organization_id = organization_id

    async def _grant(self, cookies: Mapping[str, str], budget: Budget) -> TokenGrant:
        try:
            grant = await self._client.customer_token(cookies, timeout=budget.left())
        except ApiError as err:
            raise token_error(err) from None
        if grant.organization_id and grant.organization_id.lower() != self._organization_id:
            raise ProviderAuthError(
                names.ORGANIZATION_ID,
                f"LiveChat issued the customer token for another organization; check "
                f"{names.ORGANIZATION_ID}",
            )
        return grant

    def _store(self, state: dict[str, Any], grant: TokenGrant) -> None:
        state["customer_id"] = grant.customer_id
        state["access_token"] = grant.access_token.reveal()
        state["expires_at"] = self._clock.now().timestamp() + grant.expires_in
        state["cookies"] = dict(grant.cookies)

    async def create(self, budget: Budget) -> ProviderUser:
        """A new customer (the cookie grant without cookies)."""
        grant = await self._grant({}, budget)
        user = ProviderUser(external_user_id=grant.customer_id)
        self._store(user.state, grant)
        log.info("livechat.customer_created", customer_id=grant.customer_id)
        return user

    async def refresh(self, user: ProviderUser, budget: Budget, *, adopt: bool = False) -> None:
        """Renews the token by replaying the user's cookies; updates the state.

        Args:
            user: The identity to renew (state updated in place).
            budget: Time left.
            adopt: Accept a different customer if LiveChat no longer knows
                the cookies (only when no chat depends on the old one).

        Raises:
            ProviderRejected: ``CUSTOMER_IDENTITY_LOST``: LiveChat answered
                for another customer and ``adopt`` is False.
        """
        cookies = {k: as_str(v) for k, v in as_dict(user.state.get("cookies")).items()}
        grant = await self._grant(cookies, budget)
        if grant.customer_id != user.external_user_id:
            if not adopt:
                raise ProviderRejected(
                    "CUSTOMER_IDENTITY_LOST",
                    "LiveChat no longer recognizes this end user's customer identity",
                )
            log.warning(
                "livechat.customer_replaced",
                old_customer_id=user.external_user_id,
                customer_id=grant.customer_id,
            )
            user.external_user_id = grant.customer_id
            user.state.pop("chat_id", None)
            user.state.pop("profile", None)
        self._store(user.state, grant)
        log.info("livechat.customer_token_refreshed", customer_id=grant.customer_id)

    def needs_refresh(self, user: ProviderUser) -> bool:
        """True when the token is missing or expires within the margin."""
        expires_at = user.state.get("expires_at")
        if not as_str(user.state.get("access_token")) or not isinstance(expires_at, int | float):
            return True
        return float(expires_at) - self._clock.now().timestamp() < REFRESH_MARGIN

    async def ensure_fresh(
        self, user: ProviderUser, budget: Budget, *, adopt: bool = False
    ) -> None:
        """Refreshes the token if it is missing or about to expire."""
        if self.needs_refresh(user):
            await self.refresh(user, budget, adopt=adopt)

    def _token(self, user: ProviderUser) -> Secret:
        return Secret(as_str(user.state.get("access_token")))

    async def call(
        self,
        user: ProviderUser,
        method: str,
        body: Mapping[str, Any],
        budget: Budget,
        *,
        idempotent: bool = False,
    ) -> Any:
        """A customer API call with the user's token, refreshed as needed.

        An ``authentication`` refusal renews the token once and repeats the
        call once (the refused call did nothing).
        """
        await self.ensure_fresh(user, budget)
        for attempt in (1, 2):
            timeout = budget.left() if idempotent else budget.sending()
            try:
                return await self._client.customer(
                    method, body, token=self._token(user), timeout=timeout, idempotent=idempotent
                )
            except ApiError as err:
                if err.type != "authentication" or attempt == 2:
                    raise
                log.info("livechat.customer_token_rejected", customer_id=user.external_user_id)
                await self.refresh(user, budget)
        raise AssertionError("unreachable")  # pragma: no cover

    async def upload(
        self, user: ProviderUser, filename: str, content: bytes, content_type: str, budget: Budget
    ) -> str:
        """Uploads a file as the customer; returns its CDN URL."""
        await self.ensure_fresh(user, budget)
        for attempt in (1, 2):
            try:
                return await self._client.customer_upload(
                    token=self._token(user),
                    filename=filename,
                    content=content,
                    content_type=content_type,
                    timeout=budget.left(),
                )
            except ApiError as err:
                if err.type != "authentication" or attempt == 2:
                    raise
                await self.refresh(user, budget)
        raise AssertionError("unreachable")  # pragma: no cover

    async def update_profile(
        self, user: ProviderUser, profile: UserProfile, budget: Budget
    ) -> None:
        """Sets name, e-mail and avatar when they changed since the last call."""
        fields = {
            "name": profile.name.strip(),
            "email": profile.email.strip(),
            "avatar": profile.picture_url.strip(),
        }
        fields = {k: v for k, v in fields.items() if v}
        fingerprint = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]
        if not fields or user.state.get("profile") == fingerprint:
            return
        try:
            await self.call(user, "update_customer", fields, budget, idempotent=True)
        except ApiError as err:
            if err.type != "validation":
                raise
            # A malformed e-mail or avatar must not cost the user their handoff.
            log.warning(
                "livechat.profile_refused",
                customer_id=user.external_user_id,
                error_type=err.type,
                fields=sorted(fields),
            )
            return
        user.state["profile"] = fingerprint
