"""StartHitl fields LiveChat cannot take are refused like the service's own
bad fields: INVALID_ARGUMENT with a field violation, before anything is
stored or sent to LiveChat (``SupportsValidation``)."""

from __future__ import annotations

import grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import LiveChatService
from tests.support import TIMEOUT, expect_error, rid


async def test_a_group_id_that_is_no_number_is_refused_before_anything_happens(
    lc: LiveChatService,
) -> None:
    user = await lc.user()
    calls = len(lc.fake.calls())
    request = pb.StartHitlRequest(
        user_id=user.id, request_id=rid(), title="Refund", group_id="support"
    )
    for _attempt in range(2):  # a retry with the same request id is refused the same way
        error = await expect_error(
            lc.stub.StartHitl(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert error.reason == "INVALID_FIELDS"
        assert list(error.violations) == ["group_id"]
        assert "decimal number" in error.violations["group_id"]
    listed = await lc.stub.ListSessions(pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT)
    assert list(listed.sessions) == []
    assert await lc.app.store.get_provider_user(user.id, "livechat") is None
    assert lc.fake.calls()[calls:] == []  # no customer created, no chat looked up
    # Nothing recorded the request id: the corrected request may reuse it.
    request.group_id = "19"
    session = (await lc.stub.StartHitl(request, timeout=TIMEOUT)).session
    assert session.state == pb.SESSION_STATE_QUEUED
    assert lc.fake.chat(session.external_chat_id).group_ids == [19]


async def test_livechats_violations_join_the_services_own(lc: LiveChatService) -> None:
    user = await lc.user()
    request = pb.StartHitlRequest(
        user_id=user.id, request_id=rid(), title="x" * 201, group_id="sales"
    )
    error = await expect_error(
        lc.stub.StartHitl(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert sorted(error.violations) == ["group_id", "title"]
    assert "decimal number" in error.violations["group_id"]
    # A group id the service itself refuses gets its violation only, once.
    request = pb.StartHitlRequest(user_id=user.id, request_id=rid(), group_id="sales team")
    error = await expect_error(
        lc.stub.StartHitl(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(error.violations) == ["group_id"]
    assert "letters, digits" in error.violations["group_id"]
