"""Arbitrary field values at every RPC and arbitrary bytes at the webhook
route: only clear client errors, never INTERNAL/UNKNOWN, never a 500."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitl_service.app import App
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.conftest import start_app
from tests.scripted import create

ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ServiceThread:
    """A service on its own event loop in a thread, for synchronous clients."""

    def __init__(self, env: dict[str, str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.app: App | None = None
        self.env = env
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the service did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.app = self.loop.run_until_complete(start_app(self.env, provider_factory=create))
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        assert self.app is not None
        asyncio.run_coroutine_threadsafe(self.app.stop(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    env = {
        "HITL_PROVIDER": "scripted",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": f"sqlite:///{tmp}/hitl.db",
        "HITL_DATA_DIR": str(tmp),
        "HITL_LOG_LEVEL": "warning",
        "HITL_REQUEST_BUDGET": "2s",
    }
    running = ServiceThread(env)
    assert running.app is not None
    yield running.app
    running.stop()


@pytest.fixture(scope="module")
def stub(service: App) -> Iterator[pb_grpc.HitlServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield pb_grpc.HitlServiceStub(channel)


@pytest.fixture(scope="module")
def known(stub: pb_grpc.HitlServiceStub) -> tuple[str, str]:
    """A real user and open session, so fuzzed ids sometimes hit them."""
    user = stub.CreateUser(pb.CreateUserRequest(name="Fuzz"), timeout=10).user
    session = stub.StartHitl(
        pb.StartHitlRequest(user_id=user.id, request_id="fuzz-start"), timeout=10
    )
    return user.id, session.session.id


def call(method: object, request: object) -> None:
    try:
        method(request, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ACCEPTABLE, f"{code}: {exc.details()}"
        assert "Traceback" not in (exc.details() or "")


texts = st.text(max_size=300) | st.sampled_from(["", " ", "\x00", "a" * 5000, "ünïcødé ✓"])
enums = st.integers(min_value=-5, max_value=12)
media = st.builds(
    pb.Media,
    kind=enums,
    url=texts | st.just("https://cdn.example/x.png"),
    name=texts,
    mime_type=texts,
    size_bytes=st.integers(-(2**40), 2**40),
    caption=texts,
)
location = st.builds(
    pb.Location,
    latitude=st.floats(allow_nan=True, allow_infinity=True),
    longitude=st.floats(allow_nan=True, allow_infinity=True),
    name=texts,
    address=texts,
)
card = st.builds(
    pb.Card,
    title=texts,
    subtitle=texts,
    image_url=texts,
    buttons=st.lists(st.builds(pb.CardButton, text=texts, kind=enums, value=texts), max_size=15),
)


@st.composite
def messages(draw: st.DrawFn) -> pb.Message:
    body = draw(st.sampled_from(["text", "media", "location", "card", "none"]))
    message = pb.Message(author=draw(enums))  # type: ignore[arg-type]  # unknown values too
    if body == "text":
        message.text = draw(texts)
    elif body == "media":
        message.media.CopyFrom(draw(media))
    elif body == "location":
        message.location.CopyFrom(draw(location))
    elif body == "card":
        message.card.CopyFrom(draw(card))
    return message


def ids(known_id: str) -> st.SearchStrategy[str]:
    return texts | st.just(known_id) | st.from_regex(r"[a-z]{3}_[0-9a-f]{24}", fullmatch=True)


@FUZZ
@given(data=st.data())
def test_create_user(stub: pb_grpc.HitlServiceStub, data: st.DataObject) -> None:
    request = pb.CreateUserRequest(
        name=data.draw(texts),
        email=data.draw(texts),
        picture_url=data.draw(texts),
        external_id=data.draw(texts),
    )
    call(stub.CreateUser, request)


@FUZZ
@given(data=st.data())
def test_start_hitl(
    stub: pb_grpc.HitlServiceStub, known: tuple[str, str], data: st.DataObject
) -> None:
    request = pb.StartHitlRequest(
        user_id=data.draw(ids(known[0])),
        title=data.draw(texts),
        description=data.draw(texts),
        history=data.draw(st.lists(messages(), max_size=4)),
        group_id=data.draw(texts),
        metadata=data.draw(st.dictionaries(texts, texts, max_size=4)),
        request_id=data.draw(texts),
    )
    call(stub.StartHitl, request)


@FUZZ
@given(data=st.data())
def test_send_message(
    stub: pb_grpc.HitlServiceStub, known: tuple[str, str], data: st.DataObject
) -> None:
    request = pb.SendMessageRequest(
        session_id=data.draw(ids(known[1])), request_id=data.draw(texts)
    )
    if data.draw(st.booleans()):
        request.message.CopyFrom(data.draw(messages()))
    call(stub.SendMessage, request)


@FUZZ
@given(data=st.data())
def test_reads_and_stop(
    stub: pb_grpc.HitlServiceStub, known: tuple[str, str], data: st.DataObject
) -> None:
    call(stub.GetSession, pb.GetSessionRequest(session_id=data.draw(ids(known[1]))))
    call(
        stub.ListSessions,
        pb.ListSessionsRequest(
            user_id=data.draw(ids(known[0])),
            state=data.draw(enums),  # type: ignore[arg-type]  # unknown values too
            page_size=data.draw(st.integers(-(2**31), 2**31 - 1)),
            page_token=data.draw(texts),
        ),
    )
    call(stub.StopHitl, pb.StopHitlRequest(session_id=data.draw(texts), reason=data.draw(texts)))


@FUZZ
@given(session_id=texts, cursor=texts | st.integers(0, 2**70).map(str))
def test_stream_events(stub: pb_grpc.HitlServiceStub, session_id: str, cursor: str) -> None:
    # A valid request waits for events: the short deadline ends it.
    stream = stub.StreamEvents(
        pb.StreamEventsRequest(session_id=session_id, after_cursor=cursor), timeout=0.3
    )
    try:
        next(iter(stream))
    except grpc.RpcError as exc:
        allowed = ACCEPTABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert exc.code() in allowed, exc.details()
    except StopIteration:
        pass
    finally:
        stream.cancel()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    body=st.binary(max_size=4096) | json_values.map(lambda v: __import__("json").dumps(v).encode())
)
def test_webhook_route_never_answers_500(service: App, body: bytes) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{service.http_port}/webhooks/scripted", content=body, timeout=10
    )
    assert response.status_code in (200, 400, 401), response.text
    assert response.json()
