"""Contract: a row this release cannot read (a value a newer release wrote, a
hand edit) costs only that row in the background loops' reads; the others
are still listed and claimed. An event of the log keeps its place, with no
kind."""

from __future__ import annotations

from structlog.testing import capture_logs

from hitl_service.domain import Session
from hitl_service.store.base import Store
from providers.types import InboundEvent, Queued
from tests.store.conftest import Backend
from tests.store.factories import T0, at, make_outbox, make_session, make_user


async def _open_sessions_the_second_unreadable(
    store: Store, backend: Backend, count: int
) -> list[Session]:
    """``count`` open sessions of one user, in id order; the second one is
    in a state a newer release may add (still open, in this release's terms)."""
    user = make_user()
    sessions = sorted(
        (make_session(user.id, provider=f"p{n}") for n in range(count)), key=lambda s: s.id
    )
    async with store.transaction() as tx:
        await tx.insert_user(user)
        for session in sessions:
            await tx.insert_session(session)
    await backend.execute(f"UPDATE sessions SET state = 'paused' WHERE id = '{sessions[1].id}'")
    return sessions


async def test_an_unreadable_open_session_is_left_out_of_the_listing(
    store: Store, backend: Backend
) -> None:
    sessions = await _open_sessions_the_second_unreadable(store, backend, 3)
    bad = sessions[1]

    with capture_logs() as logs:
        listed = await store.list_open_sessions(after_id="", limit=10)

    assert [s.id for s in listed] == [sessions[0].id, sessions[2].id]
    assert [(e["event"], e["table"], e["id"]) for e in logs] == [
        ("store.row_unreadable", "sessions", bad.id)
    ]


async def test_an_unreadable_outbox_item_does_not_hold_back_other_sessions(
    store: Store, backend: Backend
) -> None:
    user = make_user()
    first, second = make_session(user.id, provider="a"), make_session(user.id, provider="b")
    bad, behind_bad, good = make_outbox(first.id), make_outbox(first.id), make_outbox(second.id)
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(first)
        await tx.insert_session(second)
        for item in (bad, behind_bad, good):
            await tx.insert_outbox(item)
    # An outbox kind a newer release may add.
    await backend.execute(f"UPDATE outbox SET kind = 'recall' WHERE id = '{bad.id}'")

    with capture_logs() as logs:
        async with store.transaction() as tx:
            claimed = await tx.claim_outbox("w1", at(0), at(30), 10)

    # The session's own queue keeps its order: what is behind the item waits.
    assert [i.id for i in claimed] == [good.id]
    assert [(e["event"], e["table"], e["id"]) for e in logs] == [
        ("store.row_unreadable", "outbox", bad.id)
    ]


async def test_a_page_of_open_sessions_makes_up_for_an_unreadable_row(
    store: Store, backend: Backend
) -> None:
    """The sweeps page until a short page: a page an unreadable row made
    short ended the sweep before the open sessions after it."""
    sessions = await _open_sessions_the_second_unreadable(store, backend, 4)

    first = await store.list_open_sessions(after_id="", limit=2)
    rest = await store.list_open_sessions(after_id=first[-1].id, limit=2)

    assert [s.id for s in first] == [sessions[0].id, sessions[2].id]
    assert [s.id for s in rest] == [sessions[3].id]


async def test_an_unreadable_event_keeps_its_place_in_the_log_with_no_kind(
    store: Store, backend: Backend
) -> None:
    """An event of a kind a newer release added: raised, it stopped the hub
    at that row, and no stream got another live event."""
    async with store.transaction() as tx:
        first, bad, last = [await tx.append_event("s", "u", T0, Queued()) for _ in range(3)]
    await backend.execute(f"UPDATE events SET kind = 'recalled' WHERE seq = {bad}")

    with capture_logs() as logs:
        events = await store.read_events(after=0, limit=10)

    assert [(e.seq, e.kind) for e in events] == [(first, Queued()), (bad, None), (last, Queued())]
    assert [(e["event"], e["table"], e["id"]) for e in logs] == [
        ("store.row_unreadable", "events", bad)
    ]


async def test_an_unreadable_parked_event_costs_only_itself(store: Store, backend: Backend) -> None:
    """The start that takes its chat's parked events failed on one of a kind
    a newer release parked, and so did every retry of that start."""
    async with store.transaction() as tx:
        for key in ("d1", "d2", "d3"):
            await tx.park_event("p", InboundEvent("C1", Queued(position=1), key), T0)
    sqlite = backend.name == "sqlite"
    text = "event" if sqlite else "event::text"
    renamed = f"REPLACE({text}, 'queued', 'recalled')" + ("" if sqlite else "::json")
    await backend.execute(f"UPDATE parked_events SET event = {renamed} WHERE {text} LIKE '%d2%'")

    with capture_logs() as logs:
        async with store.transaction() as tx:
            taken = await tx.take_parked_events("p", "C1")

    assert [e.dedupe_key for e in taken] == ["d1", "d3"]
    assert [(e["event"], e["table"]) for e in logs] == [("store.row_unreadable", "parked_events")]
    async with store.transaction() as tx:
        assert await tx.take_parked_events("p", "C1") == []
