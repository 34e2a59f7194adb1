"""Knobs of the fake LiveChat, including every unconfirmed (❓) behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

# HTTP status per error type: LiveChat does not document them (§10), so these
# are assumptions and every one can be changed per test.
DEFAULT_STATUS: dict[str, int] = {
    "authentication": 401,
    "authorization": 403,
    "missing_access": 403,
    "validation": 400,
    "chat_inactive": 400,
    "not_found": 404,
    "group_not_found": 404,
    "customer_not_found": 404,
    "entity_too_large": 413,
    "misdirected_request": 421,
    "too_many_requests": 429,
    "request_timeout": 504,
    "internal": 500,
    "service_unavailable": 503,
    "limit_reached": 400,
}


@dataclass
class FakeConfig:
    """Behaviour switches. Defaults follow livechat-api.md; ❓ points are knobs.

    Attributes:
        status_map: error type -> HTTP status (unknown types: 400).
        unknown_method_error: error type for methods that do not exist
            (``close_chat``, ``get_groups``); its status comes from status_map.
        org_error_type: error type for a missing/wrong ``organization_id`` on
            the customer API (❓).
        deactivate_inactive: what ``deactivate_chat`` on an inactive chat does:
            ``"error"`` (chat_inactive) or ``"noop"`` (❓).
        resume_active_error: error type when resuming an active chat (❓).
        start_existing_customer_error: error type when ``start_chat`` names a
            customer who already has a chat (❓); ``""`` starts a second chat.
        unknown_group_error: error type of ``get_group``/routing to an unknown
            group (❓ ``group_not_found`` or ``not_found``).
        pat_author: whose id authors events sent with a PAT: ``"email"`` (the
            agent's login) or ``"account_id"`` (❓).
        initial_events_webhook: whether ``start_chat``'s initial events also
            fire ``incoming_event`` (❓).
        author_filter_drops_system: whether ``author_type`` filters drop
            ``system_message`` events (❓).
        pat_chats_have_client_id: whether chats started with a PAT carry
            ``source.client_id`` (for ``only_my_chats``) (❓).
        require_response_type: the cookie grant requires ``response_type`` (❓).
        reject_unknown_keys: unknown top-level request keys give validation (❓).
        list_webhooks_shows_secret: ``list_webhooks`` includes ``secret_key`` (❓).
        auto_assign: a group transfer with ``ignore_agents_availability``
            assigns an available agent at once, as LiveChat routes it (False:
            it always queues).
        max_text_bytes: the message text limit.
        max_upload_bytes: the upload limit.
        webhook_attempts: delivery attempts (1 + retries).
        webhook_retry_delays: seconds before each retry (❓ real schedule).
        webhook_timeout: seconds the fake waits for a webhook answer.
        token_lifetime: customer token lifetime in seconds.
        legacy_header / deprecation_header: add these lifecycle headers to
            every chat API answer when set.
    """

    status_map: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STATUS))
    unknown_method_error: str = "not_found"
    org_error_type: str = "validation"
    deactivate_inactive: str = "error"
    resume_active_error: str = "validation"
    start_existing_customer_error: str = "validation"
    unknown_group_error: str = "group_not_found"
    pat_author: str = "email"
    initial_events_webhook: bool = False
    author_filter_drops_system: bool = True
    pat_chats_have_client_id: bool = False
    require_response_type: bool = True
    reject_unknown_keys: bool = False
    list_webhooks_shows_secret: bool = True
    auto_assign: bool = True
    max_text_bytes: int = 16 * 1024
    max_upload_bytes: int = 10 * 1024 * 1024
    webhook_attempts: int = 4
    webhook_retry_delays: tuple[float, ...] = (0.02, 0.05, 0.1)
    webhook_timeout: float = 10.0
    token_lifetime: int = 28800
    legacy_header: str = ""
    deprecation_header: str = ""

    def status_for(self, error_type: str) -> int:
        """The HTTP status answered for an error type."""
        return self.status_map.get(error_type, 400)
