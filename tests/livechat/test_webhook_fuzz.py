"""Property tests: parse_webhook returns a batch or raises WebhookRejected."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.errors import WebhookRejected
from providers.livechat import LiveChatProvider
from providers.types import WebhookBatch
from tests.livechat.conftest import WEBHOOK_SECRET, offline_provider

_PROVIDER: LiveChatProvider | None = None


def provider() -> LiveChatProvider:
    global _PROVIDER
    if _PROVIDER is None:
        import tempfile
        from pathlib import Path

        _PROVIDER = offline_provider(Path(tempfile.gettempdir()))
    return _PROVIDER


def check(body: bytes) -> None:
    rejected: WebhookRejected | None = None
    try:
        result = provider().parse_webhook({}, body)
    except WebhookRejected as exc:  # the only exception allowed
        rejected = exc
    if rejected is not None:
        assert rejected.status in (400, 401)
        assert WEBHOOK_SECRET not in rejected.reason
        return
    assert isinstance(result, WebhookBatch)
    for event in result.events:
        assert event.dedupe_key
        assert isinstance(event.external_chat_id, str)


@given(st.binary(max_size=8192))
def test_random_bytes(body: bytes) -> None:
    check(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
ACTIONS = [
    "incoming_event",
    "incoming_chat",
    "user_added_to_chat",
    "user_removed_from_chat",
    "chat_transferred",
    "chat_deactivated",
    "event_updated",
    "something_new",
]
ids = (
    st.sampled_from(
        ["PX1QZ8RK2M", "RT5M2K9QAA", "", "jane@acme.com", "5f1c2a8e-9b7d-4e2a-8c11-0c3f7d2b6a90"]
    )
    | json_values
)
event = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "type": st.sampled_from(["message", "file", "rich_message", "system_message", "custom"])
        | json_values,
        "author_id": ids,
        "custom_id": st.sampled_from(["hitl:x:0", "req"]) | json_values,
        "visibility": st.sampled_from(["all", "agents"]) | json_values,
        "recipients": st.sampled_from(["all", "agents"]),
        "text": json_values,
        "url": json_values,
        "content_type": json_values,
        "size": json_values,
        "created_at": st.sampled_from(["2026-03-02T10:15:07.123456Z", "x"]) | json_values,
        "elements": st.lists(
            st.dictionaries(st.sampled_from(["title", "buttons", "image"]), json_values), max_size=3
        )
        | json_values,
        "system_message_type": json_values,
    },
)
payload = st.fixed_dictionaries(
    {},
    optional={
        "chat_id": ids,
        "thread_id": ids,
        "event": event | json_values,
        "user": st.fixed_dictionaries(
            {},
            optional={
                "id": ids,
                "type": json_values,
                "visibility": json_values,
                "name": json_values,
            },
        )
        | json_values,
        "user_id": ids,
        "user_type": st.sampled_from(["agent", "customer"]) | json_values,
        "requester_id": ids,
        "reason": json_values,
        "transferred_to": st.fixed_dictionaries(
            {}, optional={"group_ids": json_values, "agent_ids": json_values}
        )
        | json_values,
        "queue": st.fixed_dictionaries(
            {},
            optional={"position": json_values, "wait_time": json_values, "queued_at": json_values},
        )
        | json_values,
        "chat": st.fixed_dictionaries(
            {},
            optional={
                "id": ids,
                "users": json_values,
                "thread": st.fixed_dictionaries(
                    {},
                    optional={
                        "id": ids,
                        "active": json_values,
                        "events": st.lists(event, max_size=3),
                        "queue": json_values,
                    },
                ),
            },
        )
        | json_values,
    },
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(
    action=st.sampled_from(ACTIONS) | json_values,
    payload=payload | json_values,
    secret=st.sampled_from([WEBHOOK_SECRET, WEBHOOK_SECRET, "nope"]) | json_values,
    organization=st.sampled_from(["0b8e6f3e-2f0c-4a9e-b8a1-7d2c5e9f1a33", None]) | json_values,
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_generated_envelopes(
    action: Any, payload: Any, secret: Any, organization: Any, extra: dict[str, Any]
) -> None:
    body: dict[str, Any] = {**extra, "secret_key": secret, "action": action, "payload": payload}
    if organization is not None:
        body["organization_id"] = organization
    check(json.dumps(body).encode())
