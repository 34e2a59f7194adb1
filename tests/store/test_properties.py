"""Contract properties: arbitrary text and JSON survive a round trip on both backends.

Plain text columns exclude NUL: PostgreSQL ``text`` cannot hold it (SQLite
can). JSON columns hold it escaped, so metadata and messages may carry it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitl_service.domain import SessionState
from hitl_service.store.base import Store
from providers.types import Agent, AgentMessage, Message
from tests.store.factories import T0, make_session, make_user

# Each example uses fresh ids, so sharing the function-scoped store is safe.
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
json_text = st.text(st.characters(codec="utf-8"), max_size=40)  # NUL allowed
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)
instants = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@PROPERTY
@given(
    name=text,
    title=text,
    description=text,
    metadata=st.dictionaries(json_text, json_text, max_size=6),
    chat_state=st.dictionaries(json_text, json_values, max_size=4),
    agent_name=text,
    created_at=instants,
)
async def test_session_round_trip(
    store: Store,
    name: str,
    title: str,
    description: str,
    metadata: dict[str, str],
    chat_state: dict[str, Any],
    agent_name: str,
    created_at: datetime,
) -> None:
    user = make_user(name=name, email=name)
    user.external_id += name  # unique per example, with arbitrary text in it
    session = make_session(
        user.id,
        state=SessionState.ASSIGNED,
        title=title,
        description=description,
        metadata=metadata,
        chat_state=chat_state,
        agent=Agent(id=agent_name or "a", name=agent_name),
        end_reason=title,
        created_at=created_at,
    )
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(session)
        assert await tx.get_user_by_external_id(user.external_id) == user
    stored_user = await store.get_user(user.id)
    assert stored_user == user
    assert await store.get_session(session.id) == session


@PROPERTY
@given(body=json_text, agent_name=json_text)
async def test_agent_message_text_round_trip(store: Store, body: str, agent_name: str) -> None:
    kind = AgentMessage(message=Message(body=body), agent=Agent(id="a", name=agent_name))
    async with store.transaction() as tx:
        cursor = await tx.append_event("ses_1", "usr_1", T0, kind)
    (event,) = await store.read_events(after=cursor - 1, limit=1)
    assert event.kind == kind
