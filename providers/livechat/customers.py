"""End users as LiveChat customers: identity, tokens and customer API calls.

Each end user gets a customer through the ``cookie`` grant. The grant's
``__lc_cid``/``__lc_cst`` cookies are kept in ``ProviderUser.state``, so the
identity stays stable and the 8-hour token can be renewed by replaying them.
State keys: ``customer_id``, ``access_token``, ``expires_at`` (Unix seconds),
``lifetime`` (the token's, in seconds), ``cookies``, ``profile`` (a fingerprint
of what was last sent) and ``chat_id`` (the customer's one chat, once known).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from hitl_service.clock import Clock
from hitl_service.secret import Secret
from providers.errors import ProviderAuthError, ProviderRejected
from providers.livechat import settings as names
from providers.livechat.budget import Budget
from providers.livechat.client import ApiError, LiveChatClient, TokenGrant
from providers.livechat.failures import token_error
from providers.livechat.memory import Lru
from providers.livechat.models import as_dict, as_str
from providers.types import ProviderUser, UserProfile

log = structlog.get_logger(__name__)

REFRESH_MARGIN: Final = 15 * 60
"""Renew a customer token this many seconds before it expires, or at
``REFRESH_SHARE`` of its lifetime left if that is less."""
REFRESH_SHARE: Final = 0.5
"""Of a token living less than twice ``REFRESH_MARGIN``: with the full
margin, every call would find it about to expire and renew it."""
RECENT_GRANT: Final = 60.0
"""How long a renewal serves calls that waited for it (or read the user's
state before it was saved) instead of a grant of their own."""


@dataclass(frozen=True, slots=True)
class _Renewal:
    """A token the cookie grant gave for a customer, and when."""

    at: float  # monotonic
    access_token: str = field(repr=False)  # credentials
    expires_at: float = 0.0  # Unix seconds
    lifetime: float = 0.0  # seconds
    cookies: dict[str, str] = field(default_factory=dict, repr=False)


def refresh_margin(lifetime: object) -> float:
    """How long before expiry to renew a token that lasts ``lifetime``
    seconds (unknown, as in state saved before it was kept: the full margin)."""
    if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and lifetime > 0:
        return min(float(REFRESH_MARGIN), float(lifetime) * REFRESH_SHARE)
    return float(REFRESH_MARGIN)


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
        # One renewal at a time per customer, and the latest one: calls that
        # find the token expired (or refused) together renew it once.
        self._renewing: dict[str, tuple[asyncio.Lock, int]] = {}
        self._renewed: Lru[str, _Renewal] = Lru(4096)

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
        state["lifetime"] = grant.expires_in
        state["cookies"] = dict(grant.cookies)
        self._renewed.put(
            grant.customer_id,
            _Renewal(
                self._clock.monotonic(),
                state["access_token"],
                state["expires_at"],
                grant.expires_in,
                dict(grant.cookies),
            ),
        )

    async def create(self, budget: Budget) -> ProviderUser:
        """A new customer (the cookie grant without cookies)."""
        grant = await self._grant({}, budget)
        user = ProviderUser(external_user_id=grant.customer_id)
        self._store(user.state, grant)
        log.info("livechat.customer_created", customer_id=grant.customer_id)
        return user

    async def refresh(self, user: ProviderUser, budget: Budget, *, adopt: bool = False) -> None:
        """Renews the token by replaying the user's cookies; updates the state.

        Concurrent renewals of one customer make one grant: a call that
        waited for another's renewal (or holds a token older than one made a
        moment ago) takes that token. A renewal that failed is not one: the
        next call asks again.

        Args:
            user: The identity to renew (state updated in place).
            budget: Time left.
            adopt: Accept a different customer if LiveChat no longer knows
                the cookies (only when no chat depends on the old one).

        Raises:
            ProviderRejected: ``CUSTOMER_IDENTITY_LOST``: LiveChat answered
                for another customer and ``adopt`` is False.
        """
        customer_id = user.external_user_id
        held = as_str(user.state.get("access_token"))
        lock, users = self._renewing.get(customer_id) or (asyncio.Lock(), 0)
        self._renewing[customer_id] = (lock, users + 1)
        try:
            async with lock:
                if self._take_recent(user, held):
                    return
                await self._renew(user, budget, adopt=adopt)
        finally:
            lock, users = self._renewing[customer_id]
            if users > 1:
                self._renewing[customer_id] = (lock, users - 1)
            else:
                del self._renewing[customer_id]

    def _take_recent(self, user: ProviderUser, held: str) -> bool:
        """Takes a renewal made a moment ago for this customer, if it is not
        the token ``held`` (the one found stale or refused)."""
        recent = self._renewed.get(user.external_user_id)
        if (
            recent is None
            or hmac.compare_digest(recent.access_token.encode(), held.encode())
            or self._clock.monotonic() - recent.at > RECENT_GRANT
            or recent.expires_at - self._clock.now().timestamp() < refresh_margin(recent.lifetime)
        ):
            return False
        user.state["customer_id"] = user.external_user_id
        user.state["access_token"] = recent.access_token
        user.state["expires_at"] = recent.expires_at
        user.state["lifetime"] = recent.lifetime
        user.state["cookies"] = dict(recent.cookies)
        log.info("livechat.customer_token_shared", customer_id=user.external_user_id)
        return True

    async def _renew(self, user: ProviderUser, budget: Budget, *, adopt: bool) -> None:
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
        """True when the token is missing or expires within its margin
        (see :func:`refresh_margin`)."""
        expires_at = user.state.get("expires_at")
        if not as_str(user.state.get("access_token")) or not isinstance(expires_at, int | float):
            return True
        left = float(expires_at) - self._clock.now().timestamp()
        return left < refresh_margin(user.state.get("lifetime"))

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
