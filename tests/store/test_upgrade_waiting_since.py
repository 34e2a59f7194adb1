"""Migration 0004 (sessions.waiting_since) on a database that already has
handoffs waiting: one an agent gave back to the queue before the upgrade
has waited since then, not since it was created."""

from __future__ import annotations

from hitl_service.domain import SessionState
from hitl_service.store.base import Store
from providers.types import Agent, AgentAssigned, Queued, Started, Transferred
from tests.store.conftest import Backend, OpenStore
from tests.store.factories import at, make_session, make_user

JANE = Agent(id="jane@acme.example", name="Jane")


async def back_to_version_3(backend: Backend) -> None:
    """The schema as the previous release left it (its rows kept)."""
    if backend.name == "sqlite":  # PostgreSQL has had this one since version 1
        await backend.execute("DROP INDEX dead_letters_by_received")  # version 6
    await backend.execute(
        "DROP INDEX sessions_starting",  # version 9
        "DROP INDEX sessions_failed",  # version 8
        "DROP INDEX outbox_due",  # version 7
        "DROP INDEX outbox_queued",
        "ALTER TABLE outbox DROP COLUMN queued",
        "DROP INDEX sessions_ended",  # version 6
        "ALTER TABLE sessions DROP COLUMN waiting_since",
        "DELETE FROM schema_version WHERE version >= 4",
    )


async def add(store: Store, state: SessionState, kinds: list[tuple[float, object]]) -> str:
    user = make_user()
    session = make_session(user.id, state=state, created_at=at(0), updated_at=at(0))
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(session)
        for seconds, kind in kinds:
            await tx.append_event(session.id, user.id, at(seconds), kind)  # type: ignore[arg-type]
    return session.id


async def test_a_handoff_given_back_before_the_upgrade_waits_from_then(
    backend: Backend, open_store: OpenStore
) -> None:
    store = await open_store()
    started = (0, Started(provider="livechat", external_chat_id="c1"))
    given_back = await add(
        store,
        SessionState.QUEUED,
        [
            started,
            (1, Queued(position=1, wait_seconds=60)),
            (600, AgentAssigned(agent=JANE)),
            (3000, Transferred(from_agent=JANE, reason="agent_left")),  # back in the queue
            (3010, Queued(position=2, wait_seconds=60)),  # a later position report
        ],
    )
    never_taken = await add(
        store,
        SessionState.QUEUED,
        [started, (1, Queued(position=1, wait_seconds=60)), (90, Queued(1, 30))],
    )
    held = await add(store, SessionState.ASSIGNED, [started, (600, AgentAssigned(agent=JANE))])
    await store.close()
    await back_to_version_3(backend)

    upgraded = await open_store()
    assert (await upgraded.get_session(given_back)).waiting_since == at(3000)  # type: ignore[union-attr]
    assert (await upgraded.get_session(never_taken)).waiting_since is None  # type: ignore[union-attr]
    assert (await upgraded.get_session(held)).waiting_since is None  # type: ignore[union-attr]
