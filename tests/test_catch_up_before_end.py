"""The read of a chat's history before an end: a provider whose catch-up
fails unexpectedly (a bug, not a ProviderError) does not keep ends from applying."""

from __future__ import annotations

from typing import Any

from hitl_service.app import App
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import Ended, EndedBy
from tests.scripted import ScriptedProvider
from tests.support import TIMEOUT, make_user, start_session


async def _open(stub: Any) -> pb.Session:
    return await start_session(stub, (await make_user(stub)).id)


def _broken_catch_up(scripted: ScriptedProvider) -> None:
    async def catch_up(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a provider bug while reading the history")

    scripted.catch_up = catch_up  # type: ignore[method-assign]


async def test_a_provider_end_applies_when_the_history_read_breaks(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider
) -> None:
    session = await _open(scripted_stub)
    _broken_catch_up(scripted)
    await scripted.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "end-1")
    got = await scripted_stub.GetSession(
        pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
    )
    assert got.session.state == pb.SESSION_STATE_ENDED


async def test_a_stop_ends_when_the_history_read_breaks(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider
) -> None:
    session = await _open(scripted_stub)
    _broken_catch_up(scripted)
    stopped = await scripted_stub.StopHitl(
        pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
    )
    assert stopped.session.state == pb.SESSION_STATE_ENDED
