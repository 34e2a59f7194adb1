"""Every RPC through a real server and channel, on the local provider:
success paths, idempotency and the documented errors."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from hitl_service.api.validation import encode_page_token
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.support import (
    TIMEOUT,
    EventCollector,
    expect_error,
    make_user,
    rid,
    start_session,
)

if TYPE_CHECKING:
    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


class TestCreateUser:
    async def test_creates_with_every_field(self, stub: Stub) -> None:
        response = await stub.CreateUser(
            pb.CreateUserRequest(
                name="Ada Lovelace",
                email="ada@example.org",
                picture_url="https://example.org/ada.png",
                external_id="crm-1",
            ),
            timeout=TIMEOUT,
        )
        user = response.user
        assert user.id.startswith("usr_")
        assert (user.name, user.email, user.picture_url, user.external_id) == (
            "Ada Lovelace",
            "ada@example.org",
            "https://example.org/ada.png",
            "crm-1",
        )
        assert user.created_at.seconds > 0

    async def test_same_external_id_updates_the_same_user(self, stub: Stub) -> None:
        first = await make_user(stub, "Ada", external_id="crm-7")
        second = (
            await stub.CreateUser(
                pb.CreateUserRequest(name="Ada L.", email="a@b.co", external_id="crm-7"),
                timeout=TIMEOUT,
            )
        ).user
        assert second.id == first.id
        assert (second.name, second.email) == ("Ada L.", "a@b.co")

    async def test_the_request_id_is_echoed_in_trailers(self, stub: Stub) -> None:
        call = stub.CreateUser(
            pb.CreateUserRequest(name="Ada"),
            timeout=TIMEOUT,
            metadata=(("x-request-id", "trace-42"),),
        )
        await call
        trailers = dict(await call.trailing_metadata())
        assert trailers["x-request-id"] == "trace-42"

    async def test_without_external_id_each_call_is_a_new_user(self, stub: Stub) -> None:
        a = (await stub.CreateUser(pb.CreateUserRequest(name="X"), timeout=TIMEOUT)).user
        b = (await stub.CreateUser(pb.CreateUserRequest(name="X"), timeout=TIMEOUT)).user
        assert a.id != b.id

    async def test_bad_fields_are_all_reported(self, stub: Stub) -> None:
        error = await expect_error(
            stub.CreateUser(
                pb.CreateUserRequest(name="", email="not-an-email", picture_url="ftp://x"),
                timeout=TIMEOUT,
            ),
            INVALID,
        )
        assert set(error.violations) == {"name", "email", "picture_url"}
        assert error.reason == "INVALID_FIELDS"
        assert error.domain == "hitl.v1"


async def test_a_body_its_message_type_cannot_parse_is_invalid_argument(app: App) -> None:
    """Bad UTF-8 in a string field (a C++ or Node client, a proxy): a clear
    INVALID_ARGUMENT with its reason and metrics, not gRPC's bare UNKNOWN."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        create = channel.unary_unary(
            "/hitl.v1.HitlService/CreateUser",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.CreateUserResponse.FromString,
        )
        error = await expect_error(create(b"\x0a\x02\xff\xfe", timeout=TIMEOUT), INVALID)
    assert error.reason == "MALFORMED_REQUEST"
    handled = app.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": "hitl.v1.HitlService",
            "grpc_method": "CreateUser",
            "grpc_code": "INVALID_ARGUMENT",
        },
    )
    assert handled == 1


class TestStartHitl:
    async def test_start_returns_a_requested_session_with_a_chat(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id, metadata={"order": "123"}, group_id="billing")
        assert session.id.startswith("ses_")
        assert session.user_id == user.id
        assert session.provider == "local"
        assert session.external_chat_id
        assert session.group_id == "billing"
        assert dict(session.metadata) == {"order": "123"}
        # The local provider reports a queue position right away.
        assert session.state == pb.SESSION_STATE_QUEUED

    async def test_same_request_id_returns_the_same_session(self, stub: Stub) -> None:
        user = await make_user(stub)
        request_id = rid()
        first = await start_session(stub, user.id, request_id=request_id)
        again = await start_session(stub, user.id, request_id=request_id)
        assert again.id == first.id

    async def test_request_id_reused_for_another_request(self, stub: Stub) -> None:
        user = await make_user(stub)
        request_id = rid()
        await start_session(stub, user.id, request_id=request_id, title="one")
        error = await expect_error(
            start_session(stub, user.id, request_id=request_id, title="two"), PRECONDITION
        )
        assert error.reason == "REQUEST_ID_REUSED"

    async def test_second_open_session_is_refused_naming_the_first(self, stub: Stub) -> None:
        user = await make_user(stub)
        first = await start_session(stub, user.id)
        error = await expect_error(start_session(stub, user.id), PRECONDITION)
        assert error.reason == "SESSION_ALREADY_OPEN"
        assert error.metadata["session_id"] == first.id
        assert first.id in error.message

    async def test_after_the_end_a_new_session_can_start(self, stub: Stub) -> None:
        user = await make_user(stub)
        first = await start_session(stub, user.id)
        await stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
        second = await start_session(stub, user.id)
        assert second.id != first.id

    async def test_unknown_user(self, stub: Stub) -> None:
        error = await expect_error(start_session(stub, "usr_missing"), NOT_FOUND)
        assert error.reason == "USER_NOT_FOUND"

    @pytest.mark.parametrize(
        ("fields", "bad"),
        [
            ({"user_id": "", "request_id": "r"}, "user_id"),
            ({"user_id": "u 1", "request_id": "r"}, "user_id"),
            ({"user_id": "usr_x", "request_id": ""}, "request_id"),
            ({"user_id": "usr_x", "request_id": "has space"}, "request_id"),
            ({"user_id": "usr_x", "request_id": "r", "title": "x" * 201}, "title"),
            # Blank but for line breaks or control characters: not blank.
            ({"user_id": "usr_x", "request_id": "r", "title": "\n"}, "title"),
            ({"user_id": "usr_x", "request_id": "r", "title": " \x1f "}, "title"),
            ({"user_id": "usr_x", "request_id": "r", "description": "\x0b\x1c"}, "description"),
            ({"user_id": "usr_x", "request_id": "r", "group_id": "a/b"}, "group_id"),
            (
                {"user_id": "usr_x", "request_id": "r", "history": [pb.Message()]},
                "history[0]",
            ),
            (
                {
                    "user_id": "usr_x",
                    "request_id": "r",
                    "history": [
                        pb.Message(text="t", created_at=Timestamp(seconds=-62_135_596_801))
                    ],
                },
                "history[0].created_at",
            ),
            (
                {"user_id": "usr_x", "request_id": "r", "metadata": {"bad key": "v"}},
                "metadata['bad key']",
            ),
        ],
    )
    async def test_bad_fields(self, stub: Stub, fields: dict[str, Any], bad: str) -> None:
        error = await expect_error(
            stub.StartHitl(pb.StartHitlRequest(**fields), timeout=TIMEOUT),
            INVALID,
        )
        assert bad in error.violations

    @pytest.mark.parametrize(
        "fields",
        [
            # Milliseconds where seconds belong, on every line of a transcript.
            {
                "history": [
                    pb.Message(text="hi", created_at=Timestamp(seconds=1_795_000_000_000))
                    for _ in range(200)
                ]
            },
            {"metadata": {f"bad key \N{GRINNING FACE} {i}": "v" for i in range(300)}},
        ],
    )
    async def test_very_many_bad_fields_still_get_their_violations(
        self, stub: Stub, fields: dict[str, Any]
    ) -> None:
        # Reported all at once, they made trailers beyond gRPC's metadata
        # limit (16 KiB): the caller got RESOURCE_EXHAUSTED with no details.
        user = await make_user(stub)
        error = await expect_error(
            stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id=rid(), **fields),
                timeout=TIMEOUT,
            ),
            INVALID,
        )
        assert error.reason == "INVALID_FIELDS"
        assert error.violations
        assert "more" in error.message

    async def test_a_refused_request_leaves_no_session(self, stub: Stub) -> None:
        user = await make_user(stub)
        await expect_error(
            stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id="r", title="x" * 500),
                timeout=TIMEOUT,
            ),
            INVALID,
        )
        listed = await stub.ListSessions(pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT)
        assert list(listed.sessions) == []


class TestSendMessage:
    async def test_every_message_kind_is_accepted(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        bodies = [
            pb.Message(text="hello"),
            pb.Message(
                media=pb.Media(
                    kind=pb.MEDIA_KIND_IMAGE, url="https://cdn.example/a.png", name="a.png"
                )
            ),
            pb.Message(location=pb.Location(latitude=52.5, longitude=13.4, name="Berlin")),
            pb.Message(
                card=pb.Card(
                    title="Order #123",
                    buttons=[
                        pb.CardButton(
                            text="Track", kind=pb.BUTTON_KIND_URL, value="https://t.example"
                        )
                    ],
                )
            ),
        ]
        ids = set()
        for body in bodies:
            response = await stub.SendMessage(
                pb.SendMessageRequest(session_id=session.id, message=body, request_id=rid()),
                timeout=TIMEOUT,
            )
            assert response.message_id.startswith("msg_")
            assert response.external_message_id
            ids.add(response.message_id)
        assert len(ids) == len(bodies)

    async def test_retry_with_same_request_id_is_delivered_once(
        self, stub: Stub, app: object
    ) -> None:
        from hitl_service.app import App
        from providers.local import LocalProvider

        assert isinstance(app, App)
        provider = app.provider
        assert isinstance(provider, LocalProvider)
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        request = pb.SendMessageRequest(
            session_id=session.id, message=pb.Message(text="once"), request_id=rid()
        )
        first = await stub.SendMessage(request, timeout=TIMEOUT)
        second = await stub.SendMessage(request, timeout=TIMEOUT)
        assert first.message_id == second.message_id
        _, conversations = provider.snapshot()
        (conversation,) = [c for c in conversations if c["session_id"] == session.id]
        assert [m["text"] for m in conversation["messages"]] == ["once"]

    async def test_a_retry_restamped_by_its_client_is_the_same_request(self, stub: Stub) -> None:
        """``created_at`` and the author are the service's own (the message is
        stored as the user's, at its arrival): a client that rebuilds its
        request on retry must not be told the id was reused for another one
        (and then send the message twice under a new id)."""
        session = await start_session(stub, (await make_user(stub)).id)
        request_id = rid()

        def send(**message: Any) -> pb.SendMessageRequest:
            return pb.SendMessageRequest(
                session_id=session.id,
                request_id=request_id,
                message=pb.Message(text="hi", **message),
            )

        first = await stub.SendMessage(send(created_at=Timestamp(seconds=1_800_000_000)), timeout=5)
        for retry in (
            send(created_at=Timestamp(seconds=1_800_000_001)),
            send(),
            send(author=pb.AUTHOR_BOT),
        ):
            again = await stub.SendMessage(retry, timeout=TIMEOUT)
            assert again.message_id == first.message_id

    async def test_request_id_reused_with_other_text(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        request_id = rid()
        await stub.SendMessage(
            pb.SendMessageRequest(
                session_id=session.id, message=pb.Message(text="a"), request_id=request_id
            ),
            timeout=TIMEOUT,
        )
        error = await expect_error(
            stub.SendMessage(
                pb.SendMessageRequest(
                    session_id=session.id, message=pb.Message(text="b"), request_id=request_id
                ),
                timeout=TIMEOUT,
            ),
            PRECONDITION,
        )
        assert error.reason == "REQUEST_ID_REUSED"

    async def test_to_an_ended_session_fails_with_precondition(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
        error = await expect_error(
            stub.SendMessage(
                pb.SendMessageRequest(
                    session_id=session.id, message=pb.Message(text="late"), request_id=rid()
                ),
                timeout=TIMEOUT,
            ),
            PRECONDITION,
        )
        assert error.reason == "SESSION_ENDED"

    async def test_unknown_session(self, stub: Stub) -> None:
        error = await expect_error(
            stub.SendMessage(
                pb.SendMessageRequest(
                    session_id="ses_nope", message=pb.Message(text="x"), request_id=rid()
                ),
                timeout=TIMEOUT,
            ),
            NOT_FOUND,
        )
        assert error.reason == "SESSION_NOT_FOUND"

    @pytest.mark.parametrize(
        ("message", "field"),
        [
            (None, "message"),
            (pb.Message(), "message"),
            (pb.Message(text="   "), "message.text"),
            (pb.Message(text="x" * (64 * 1024 + 1)), "message.text"),
            (pb.Message(media=pb.Media(url="")), "message.media.url"),
            (pb.Message(media=pb.Media(url="javascript:alert(1)")), "message.media.url"),
            (  # its text fallback would not fit in one LiveChat message
                pb.Message(media=pb.Media(url="https://x/a", mime_type="a/" + "b" * 254)),
                "message.media.mime_type",
            ),
            (
                pb.Message(location=pb.Location(latitude=91, longitude=0)),
                "message.location.latitude",
            ),
            (pb.Message(card=pb.Card()), "message.card.title"),
            (  # past 9999-12-31: a Timestamp no datetime holds
                pb.Message(text="t", created_at=Timestamp(seconds=253_402_300_800)),
                "message.created_at",
            ),
            (pb.Message(text="t", created_at=Timestamp(nanos=-1)), "message.created_at"),
            (
                pb.Message(card=pb.Card(title="t", buttons=[pb.CardButton(text="b")] * 14)),
                "message.card.buttons",
            ),
        ],
    )
    async def test_bad_messages(self, stub: Stub, message: pb.Message | None, field: str) -> None:
        request = pb.SendMessageRequest(session_id="ses_x", request_id=rid())
        if message is not None:
            request.message.CopyFrom(message)
        error = await expect_error(stub.SendMessage(request, timeout=TIMEOUT), INVALID)
        assert field in error.violations


class TestStopHitl:
    async def test_stop_ends_the_session_and_logs_one_ended_event(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        async with EventCollector(stub, session_id=session.id) as events:
            stopped = (
                await stub.StopHitl(
                    pb.StopHitlRequest(session_id=session.id, reason="bot resumed"),
                    timeout=TIMEOUT,
                )
            ).session
            assert stopped.state == pb.SESSION_STATE_ENDED
            assert stopped.end_reason == "bot resumed"
            assert stopped.ended_by == pb.ENDED_BY_CALLER
            assert stopped.ended_at.seconds > 0
            ended = await events.wait_for_kind("ended")
        assert ended.ended.by == pb.ENDED_BY_CALLER
        again = (
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
        ).session
        assert again.state == pb.SESSION_STATE_ENDED
        assert again.end_reason == "bot resumed"
        assert events.kinds().count("ended") == 1

    async def test_unknown_and_malformed(self, stub: Stub) -> None:
        await expect_error(
            stub.StopHitl(pb.StopHitlRequest(session_id="ses_x"), timeout=TIMEOUT), NOT_FOUND
        )
        error = await expect_error(stub.StopHitl(pb.StopHitlRequest(), timeout=TIMEOUT), INVALID)
        assert "session_id" in error.violations


class TestGetAndList:
    async def test_get_session(self, stub: Stub) -> None:
        user = await make_user(stub)
        session = await start_session(stub, user.id)
        got = (
            await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
        ).session
        assert got.id == session.id
        assert got.state == session.state
        await expect_error(
            stub.GetSession(pb.GetSessionRequest(session_id="ses_zz"), timeout=TIMEOUT), NOT_FOUND
        )
        await expect_error(
            stub.GetSession(pb.GetSessionRequest(session_id="a b"), timeout=TIMEOUT), INVALID
        )

    async def test_pages_newest_first_with_filters(self, stub: Stub) -> None:
        user = await make_user(stub)
        other = await make_user(stub)
        made = []
        for _ in range(5):
            s = await start_session(stub, user.id)
            await stub.StopHitl(pb.StopHitlRequest(session_id=s.id), timeout=TIMEOUT)
            made.append(s.id)
        await start_session(stub, other.id)
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await stub.ListSessions(
                pb.ListSessionsRequest(user_id=user.id, page_size=2, page_token=token),
                timeout=TIMEOUT,
            )
            pages += 1
            seen.extend(s.id for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(made))
        assert pages == 3
        ended = await stub.ListSessions(
            pb.ListSessionsRequest(state=pb.SESSION_STATE_ENDED), timeout=TIMEOUT
        )
        assert {s.id for s in ended.sessions} == set(made)
        queued = await stub.ListSessions(
            pb.ListSessionsRequest(state=pb.SESSION_STATE_QUEUED), timeout=TIMEOUT
        )
        assert [s.user_id for s in queued.sessions] == [other.id]

    async def test_pages_of_large_sessions_fit_in_one_grpc_message(self, stub: Stub) -> None:
        """32 metadata entries at their limits make a session ~19 KB: 100 of
        them are over gRPC's 1 MiB. The page is cut short, and its token goes on."""
        metadata = {f"k{i:02d}".ljust(64, "x"): "v" * 512 for i in range(32)}
        started = []
        for _ in range(80):
            user = await make_user(stub)
            started.append((await start_session(stub, user.id, metadata=metadata)).id)
        seen: list[str] = []
        sizes: list[int] = []
        token = ""
        while True:
            page = await stub.ListSessions(
                pb.ListSessionsRequest(page_size=100, page_token=token), timeout=TIMEOUT
            )
            sizes.append(len(page.sessions))
            seen += [s.id for s in page.sessions]
            token = page.next_page_token
            if not token:
                break
        assert seen == started[::-1]
        assert len(sizes) == 2
        assert 0 < sizes[0] < 80

    async def test_sessions_of_an_unknown_user_are_user_not_found(self, stub: Stub) -> None:
        """Not an empty page: a mistyped id must not look like a user without sessions."""
        error = await expect_error(
            stub.ListSessions(pb.ListSessionsRequest(user_id="usr_nobody"), timeout=TIMEOUT),
            NOT_FOUND,
        )
        assert (error.reason, error.metadata) == ("USER_NOT_FOUND", {"user_id": "usr_nobody"})

    async def test_page_token_only_works_with_its_filters(self, stub: Stub) -> None:
        user = await make_user(stub)
        for _ in range(3):
            s = await start_session(stub, user.id)
            await stub.StopHitl(pb.StopHitlRequest(session_id=s.id), timeout=TIMEOUT)
        page = await stub.ListSessions(
            pb.ListSessionsRequest(user_id=user.id, page_size=1), timeout=TIMEOUT
        )
        assert page.next_page_token
        error = await expect_error(
            stub.ListSessions(
                pb.ListSessionsRequest(page_size=1, page_token=page.next_page_token),
                timeout=TIMEOUT,
            ),
            INVALID,
        )
        assert "page_token" in error.violations
        for token in ("garbage", "eyJ2IjoyfQ", "!!!"):
            await expect_error(
                stub.ListSessions(pb.ListSessionsRequest(page_token=token), timeout=TIMEOUT),
                INVALID,
            )

    async def test_forged_page_tokens_are_invalid_not_internal(self, stub: Stub) -> None:
        """Tokens for the right filters, with what the service never issues."""
        request = pb.ListSessionsRequest(page_size=1)
        hour = timezone(timedelta(hours=1))
        forged = [
            encode_page_token(request, (datetime(1, 1, 1, tzinfo=hour), "ses_x")),
            encode_page_token(request, (datetime(9999, 12, 31, 23, tzinfo=hour), "ses_x")),
            encode_page_token(request, (datetime.now(UTC), "a\x00b")),  # NUL: PostgreSQL
            base64.urlsafe_b64encode(b"[" * 100_000).decode(),  # too deep for json
        ]
        for token in forged:
            request.page_token = token
            error = await expect_error(stub.ListSessions(request, timeout=TIMEOUT), INVALID)
            assert "page_token" in error.violations

    async def test_bad_list_fields(self, stub: Stub) -> None:
        error = await expect_error(
            stub.ListSessions(
                pb.ListSessionsRequest(page_size=-1, state=99, user_id="x y"),  # type: ignore[arg-type]
                timeout=TIMEOUT,
            ),
            INVALID,
        )
        assert set(error.violations) == {"page_size", "state", "user_id"}
