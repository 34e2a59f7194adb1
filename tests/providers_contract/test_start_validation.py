"""``SupportsValidation``: a provider's own rules for StartHitl's fields
refuse the request as the service's own do (INVALID_ARGUMENT, every
violation at once) before anything is stored or the provider is called; a
hook that misbehaves is a provider bug (INTERNAL), with nothing stored
either."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import InvalidField, Location, StartFields
from tests.providers_contract.contract import served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, expect_error, make_user, rid

if TYPE_CHECKING:
    from tests.providers_contract.contract import Stub

QUEUES = ("billing", "support")


def desk_rules(fields: StartFields) -> list[InvalidField]:
    found = []
    if fields.group_id and fields.group_id not in QUEUES:
        found.append(InvalidField("group_id", "the desk's queues are billing and support"))
    if fields.metadata.get("tier", "gold") != "gold":
        found.append(InvalidField("metadata['tier']", "the desk knows only gold"))
    return found


async def sessions_of(stub: Stub, user_id: str) -> list[pb.Session]:
    listed = await stub.ListSessions(pb.ListSessionsRequest(user_id=user_id), timeout=TIMEOUT)
    return list(listed.sessions)


async def test_the_providers_violations_join_the_services_before_anything_is_stored(
    env: dict[str, str], desk: Desk
) -> None:
    desk.validate = desk_rules
    async with served(env) as (_app, stub):
        user = await make_user(stub)
        request = pb.StartHitlRequest(
            user_id=user.id,
            request_id=rid(),
            title="x" * 201,
            group_id="sales",
            metadata={"tier": "bronze"},
        )
        for _attempt in range(2):  # a retry with the same request id is refused the same way
            error = await expect_error(
                stub.StartHitl(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert error.reason == "INVALID_FIELDS"
            assert error.violations == {
                "title": "must be at most 200 characters",
                "group_id": "the desk's queues are billing and support",
                "metadata['tier']": "the desk knows only gold",
            }
        assert await sessions_of(stub, user.id) == []
        assert "upsert_user" not in desk.calls
        assert "start" not in desk.calls
        assert desk.tickets == {}
        # Nothing recorded the request id: the corrected request may reuse it.
        request.title = "Refund"
        request.group_id = "billing"
        request.metadata["tier"] = "gold"
        session = (await stub.StartHitl(request, timeout=TIMEOUT)).session
        assert session.state == pb.SESSION_STATE_REQUESTED
        assert desk.tickets[session.external_chat_id].group == "billing"


async def test_the_hook_sees_the_fields_as_sent_and_the_ones_refused_empty(
    env: dict[str, str], desk: Desk
) -> None:
    seen: list[StartFields] = []

    def validate(fields: StartFields) -> list[InvalidField]:
        seen.append(fields)
        with pytest.raises(TypeError):
            fields.metadata["added"] = "by the hook"  # type: ignore[index]
        found = desk_rules(fields)
        if not fields.history:  # here the service's own refusal: this adds nothing
            found.append(InvalidField("history", "the desk needs a transcript"))
        return found

    desk.validate = validate
    async with served(env) as (_app, stub):
        user = await make_user(stub)
        error = await expect_error(
            start(
                stub,
                user.id,
                description="bad\x01",
                history=[pb.Message()],
                group_id="sales",
                metadata={"plan": "pro"},
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(error.violations) == {"description", "history[0]", "group_id"}
        assert "needs a body" in error.violations["history[0]"]
        assert seen[-1] == StartFields(title="Refund", group_id="sales", metadata={"plan": "pro"})
        # A valid transcript reaches the hook as sent, not as the text the
        # text-only desk's start gets.
        location = pb.Message(location=pb.Location(latitude=52.52, longitude=13.405))
        await start(stub, user.id, history=[location], group_id="support")
        assert isinstance(seen[-1].history[0].body, Location)
        assert seen[-1].metadata == {}


def _raise(fields: StartFields) -> Any:
    raise KeyError("queue")


@pytest.mark.parametrize(
    "validate",
    [
        _raise,
        lambda fields: None,
        lambda fields: "group_id",
        lambda fields: [("group_id", "not a number")],
        lambda fields: [InvalidField("user_id", "unknown to the desk")],
        lambda fields: [InvalidField("group_id", "  ")],
        lambda fields: [InvalidField(7, "not a path")],  # type: ignore[arg-type]
    ],
    ids=["raises", "none", "a-string", "a-tuple", "a-field-not-given", "blank", "no-path"],
)
async def test_a_hook_that_misbehaves_is_internal_with_nothing_stored(
    env: dict[str, str], desk: Desk, validate: Callable[[StartFields], Any]
) -> None:
    desk.validate = validate
    async with served(env) as (_app, stub):
        user = await make_user(stub)
        request_id = rid()
        error = await expect_error(
            start(stub, user.id, request_id=request_id, group_id="sales"),
            grpc.StatusCode.INTERNAL,
        )
        assert error.reason == "INTERNAL_ERROR"
        assert await sessions_of(stub, user.id) == []
        assert "upsert_user" not in desk.calls
        desk.validate = None
        session = await start(stub, user.id, request_id=request_id, group_id="sales")
        assert session.state == pb.SESSION_STATE_REQUESTED


async def test_a_long_description_is_cut_to_fit_the_trailers(
    env: dict[str, str], desk: Desk
) -> None:
    desk.validate = lambda fields: [InvalidField("group_id", "é" * 20_000)]
    async with served(env) as (_app, stub):
        user = await make_user(stub)
        error = await expect_error(
            start(stub, user.id, group_id="sales"), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert error.violations["group_id"] == "é" * 299 + "…"
