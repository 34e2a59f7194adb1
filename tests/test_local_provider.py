"""The local provider on its own and across restarts: dedupe keys that survive
a crash, a state-file writer that survives failed writes, pruning, processes
that share the state file, and agent identities."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from hitl_service.clock import SystemClock
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.base import ProviderDeps
from providers.errors import ProviderConfigError, ProviderUnavailable
from providers.local import provider as local_provider
from providers.local.provider import _MAX_MESSAGES, LocalProvider, agent_from_name, create
from providers.types import (
    Author,
    Message,
    ProviderChat,
    ProviderUser,
    StartRequest,
    UserProfile,
    WebhookBatch,
)
from tests.conftest import start_app
from tests.support import EventCollector, make_user, rid, start_session, wait_for

if TYPE_CHECKING:
    from hitl_service.app import App

USER = ProviderUser("local:usr_1")


class Sink:
    """Records the dedupe keys of what the provider delivers."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def deliver(self, batch: WebhookBatch) -> int:
        self.keys += [e.dedupe_key for e in batch.events]
        return len(batch.events)


def provider(state_file: Path | None, sink: Sink | None = None) -> LocalProvider:
    return LocalProvider(
        sink=sink or Sink(), clock=SystemClock(), state_file=state_file, default_group="general"
    )


def request(session_id: str, user_id: str = "usr_1") -> StartRequest:
    return StartRequest(
        session_id=session_id,
        user=UserProfile(id=user_id, name="Ada"),
        title="Refund",
        request_id=rid(),
    )


def saved(path: Path) -> list[dict[str, Any]]:
    """Conversations in the state file (none while it does not exist)."""
    if not path.is_file():
        return []
    conversations: list[dict[str, Any]] = json.loads(path.read_text())["conversations"]
    return conversations


@asynccontextmanager
async def handed_off(service_env: dict[str, str]) -> AsyncIterator[tuple[App, pb.Session]]:
    """A started service on the local provider, and a session handed off to it."""
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            yield app, await start_session(stub, (await make_user(stub)).id)
    finally:
        await app.stop(grace=1)


async def console(app: App, chat: str, action: str, **body: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        response = await http.post(f"/console/api/conversations/{chat}/{action}", json=body)
    assert response.status_code == 200, response.text


async def test_agent_replies_after_a_crash_reach_the_user(service_env: dict[str, str]) -> None:
    """The state file lags the store; after a crash the provider must not
    reuse dedupe keys of events the store already has."""
    state_file = Path(service_env["HITL_DATA_DIR"]) / "local-console.json"
    at_crash = state_file.with_name("at-crash.json")
    async with handed_off(service_env) as (app, session):
        chat = session.external_chat_id
        await wait_for(lambda: saved(state_file), what="the handoff on disk")
        shutil.copy(state_file, at_crash)  # what kill -9 leaves if the writer lags
        await console(app, chat, "take", agent="Al")
        await console(app, chat, "reply", agent="Al", text="one")
    shutil.copy(at_crash, state_file)
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            async with EventCollector(stub, session_id=session.id) as events:
                await console(app, chat, "take", agent="Al")
                for text in ("two", "three"):
                    await console(app, chat, "reply", agent="Al", text=text)

                def texts() -> list[str]:
                    return [
                        e.agent_message.message.text
                        for e in events.events
                        if e.WhichOneof("kind") == "agent_message"
                    ]

                await wait_for(lambda: len(texts()) == 3, what="three agent messages")
    finally:
        await app.stop(grace=1)
    assert texts() == ["one", "two", "three"]


async def test_console_actions_reach_the_state_file_once_the_disk_has_room(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Console actions are answered before the file holds them. A write that
    failed (a full disk) is tried again without waiting for another change:
    else the file stayed behind the log, and a restart brought back the
    conversation the agent had ended, open, taking replies nobody got."""
    monkeypatch.setattr(local_provider, "_RETRY_FIRST", 0.05, raising=False)
    state_file = Path(service_env["HITL_DATA_DIR"]) / "local-console.json"
    async with handed_off(service_env) as (app, session):
        chat = session.external_chat_id
        await console(app, chat, "take", agent="Al")
        real_fsync = os.fsync
        with monkeypatch.context() as full:

            def no_space(fd: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            full.setattr(os, "fsync", no_space)
            await console(app, chat, "reply", agent="Al", text="while full")
            await console(app, chat, "end", agent="Al")
            assert saved(state_file)[0]["status"] == "active"
        assert os.fsync is real_fsync  # the disk has room again; nothing else changes
        await wait_for(lambda: saved(state_file)[0]["status"] == "ended", what="the file caught up")
        assert [m["text"] for m in saved(state_file)[0]["messages"]] == ["while full"]


async def test_dedupe_keys_never_repeat_across_restarts(tmp_path: Path) -> None:
    state_file = tmp_path / "s.json"
    first = provider(state_file)
    await first.open()
    chat = (await first.start(request("ses_1"), USER, timeout=1)).chat.external_chat_id
    await first.close()
    at_crash = state_file.read_text()
    sink = Sink()
    for _ in range(2):  # two restarts from the same lagging file
        state_file.write_text(at_crash)
        again = provider(state_file, sink)
        await again.open()
        await again.take(chat, agent_from_name("Al"))
        await again.close()
    assert len(set(sink.keys)) == len(sink.keys) == 2


def block(folder: Path) -> None:
    """Puts a file where the state file's folder was (``open`` checked it)."""
    folder.rmdir()
    folder.write_text("a file where the directory should be")


class TestStateWriter:
    async def test_a_failed_write_is_logged_and_retried_on_the_next_change(
        self, tmp_path: Path
    ) -> None:
        blocker = tmp_path / "d"
        state_file = blocker / "s.json"
        local = provider(state_file)
        await local.open()
        block(blocker)
        first = request("ses_1")
        # Not acknowledged: the service retries the start.
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(ProviderUnavailable, match="HITL_LOCAL_STATE_FILE"),
        ):
            await local.start(first, USER, timeout=1)
        failed = [e for e in logs if e["event"] == "local.state_write_failed"]
        assert failed[0]["log_level"] == "error"
        assert failed[0]["setting"] == "HITL_LOCAL_STATE_FILE"
        blocker.unlink()
        blocker.mkdir()  # the problem goes away
        retried = await local.start(first, USER, timeout=1)  # the same conversation
        assert [c["id"] for c in saved(state_file)] == [retried.chat.external_chat_id]
        await local.start(request("ses_2"), USER, timeout=1)
        assert len(saved(state_file)) == 2  # on disk when acknowledged
        await local.close()

    async def test_failing_writes_log_one_line_not_one_each(self, tmp_path: Path) -> None:
        # A full disk fails every write; each change and each waiting call
        # tries again, and a line each was some 30 error lines a second.
        local = provider(tmp_path / "d" / "s.json")
        await local.open()
        block(tmp_path / "d")
        with structlog.testing.capture_logs() as logs:
            for n in range(5):
                with pytest.raises(ProviderUnavailable):
                    await local.start(request(f"ses_{n}"), USER, timeout=1)
            failed = [e for e in logs if e["event"] == "local.state_write_failed"]
            assert len(failed) == 1
            assert failed[0]["failed_writes"] == 1
            await local.close()  # the last try is logged in any case, with the count
        failed = [e for e in logs if e["event"] == "local.state_write_failed"]
        assert len(failed) == 2
        assert failed[1]["failed_writes"] >= 6

    async def test_close_does_not_raise_after_failed_writes(self, tmp_path: Path) -> None:
        blocker = tmp_path / "d"
        local = provider(blocker / "s.json")
        await local.open()
        block(blocker)
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(ProviderUnavailable):
                await local.start(request("ses_1"), USER, timeout=1)
            await local.close()  # tries once more, logs, and returns
        assert [e["event"] for e in logs].count("local.state_write_failed") == 2

    async def test_what_a_call_acknowledges_is_on_disk_when_it_returns(
        self, tmp_path: Path
    ) -> None:
        # What the service acknowledged must survive a kill -9: read the file
        # (all a killed process leaves) right after each answer. The second
        # send falls into the writer's pause between bursts of changes.
        state_file = tmp_path / "s.json"
        local = provider(state_file)
        await local.open()
        started = await local.start(request("ses_1"), USER, timeout=1)
        chat = started.chat
        assert [c["id"] for c in saved(state_file)] == [chat.external_chat_id]
        for text in ("one", "two"):
            await local.send(
                chat, USER, Message(body=text), request_id=rid(), uncertain=False, timeout=1
            )
            assert [m["text"] for m in saved(state_file)[0]["messages"]][-1] == text
        await local.stop(chat, USER, "done", timeout=1)
        assert saved(state_file)[0]["status"] == "ended"
        await local.close()

    async def test_concurrent_calls_share_writes(self, tmp_path: Path) -> None:
        state_file = tmp_path / "s.json"
        local = provider(state_file)
        await local.open()
        chat = (await local.start(request("ses_1"), USER, timeout=1)).chat
        writes = 0
        write = local._write_state

        async def counted(version: int) -> None:
            nonlocal writes
            writes += 1
            await write(version)

        local._write_state = counted  # type: ignore[method-assign]
        texts = [f"m{n}" for n in range(20)]
        await asyncio.gather(
            *(
                local.send(
                    chat, USER, Message(body=t), request_id=rid(), uncertain=False, timeout=5
                )
                for t in texts
            )
        )
        assert sorted(m["text"] for m in saved(state_file)[0]["messages"]) == sorted(texts)
        assert writes < len(texts)
        await local.close()

    async def test_no_temporary_files_are_left(self, tmp_path: Path) -> None:
        local = provider(tmp_path / "s.json")
        await local.open()
        await local.start(request("ses_1"), USER, timeout=1)
        await local.close()
        assert os.listdir(tmp_path) == ["s.json"]


async def test_memory_only_mode_prunes_ended_conversations() -> None:
    local = provider(None)
    await local.open()
    waiting = await local.start(request("ses_waiting", "usr_waiting"), USER, timeout=1)
    chats: list[ProviderChat] = []
    for i in range(205):
        # One user each: the service keeps one open session per user.
        chat = (await local.start(request(f"ses_{i}", f"usr_{i}"), USER, timeout=1)).chat
        await local.send(
            chat,
            USER,
            Message(body="hello", author=Author.USER),
            request_id=f"r{i}",
            uncertain=False,
            timeout=1,
        )
        await local.stop(chat, USER, "done", timeout=1)
        chats.append(chat)
    _, conversations = local.snapshot()
    ids = {c["id"] for c in conversations}
    assert len(ids) == 201
    assert waiting.chat.external_chat_id in ids
    assert {c.external_chat_id for c in chats[:5]}.isdisjoint(ids)  # the oldest went
    assert len(local._sent) == 200
    await local.close()


class TestSharedStateFile:
    """``hitl-service local list`` and ``check`` open the server's file too."""

    async def test_a_process_that_changed_nothing_does_not_write(self, tmp_path: Path) -> None:
        state_file = tmp_path / "s.json"
        server = provider(state_file)
        await server.open()
        reader = provider(state_file)
        await reader.open()  # `local list` starts
        await server.start(request("ses_1"), USER, timeout=1)
        await wait_for(lambda: saved(state_file), what="the server's write")
        await reader.close()  # `local list` ends
        assert len(saved(state_file)) == 1
        await server.close()

    async def test_no_file_is_created_by_reading(self, tmp_path: Path) -> None:
        reader = provider(tmp_path / "s.json")
        await reader.open()
        await reader.close()
        assert os.listdir(tmp_path) == []

    async def test_the_temporary_file_name_is_not_shared(self, tmp_path: Path) -> None:
        (tmp_path / "s.tmp").mkdir()  # a fixed temporary name, taken
        local = provider(tmp_path / "s.json")
        await local.open()
        await local.start(request("ses_1"), USER, timeout=1)
        await local.close()
        assert len(saved(tmp_path / "s.json")) == 1


class TestUnusableStateFile:
    @pytest.mark.parametrize(
        "content",
        [
            "[]",
            '"text"',
            "{not json",
            '{"conversations": {}}',
            '{"conversations": [1]}',
            '{"database": {"host": "db", "password": "keep-me"}}',  # another program's file
            "{}",
            "[" * 5000,
        ],
    )
    async def test_a_file_that_is_no_state_file_names_the_setting(
        self, tmp_path: Path, content: str
    ) -> None:
        state_file = tmp_path / "s.json"
        state_file.write_text(content)
        local = provider(state_file)
        with pytest.raises(ProviderConfigError) as refused:
            await local.open()
        assert refused.value.setting == "HITL_LOCAL_STATE_FILE"
        assert str(state_file) in str(refused.value)
        await local.close()
        assert state_file.read_text() == content  # kept for a person to look at

    async def test_a_directory_names_the_setting(self, tmp_path: Path) -> None:
        local = provider(tmp_path)
        with pytest.raises(ProviderConfigError) as refused:
            await local.open()
        assert refused.value.setting == "HITL_LOCAL_STATE_FILE"
        assert "not a regular file" in str(refused.value)
        await local.close()

    async def test_unknown_fields_of_a_newer_version_are_ignored(self, tmp_path: Path) -> None:
        state_file = tmp_path / "s.json"
        first = provider(state_file)
        await first.open()
        await first.start(request("ses_1"), USER, timeout=1)
        await first.close()
        data = json.loads(state_file.read_text())
        data["conversations"][0]["added_later"] = True
        state_file.write_text(json.dumps(data))
        again = provider(state_file)
        await again.open()
        assert len(again.snapshot()[1]) == 1
        await again.close()


class TestAgentIds:
    def test_names_in_any_script_get_distinct_ids(self) -> None:
        names = ["李雷", "王芳", "Иван", "Мария", "محمد", "🙂", "😀", "Al", "Bea"]
        ids = {agent_from_name(name).id for name in names}
        assert len(ids) == len(names)

    def test_ids_are_stable_and_ignore_case_and_spacing(self) -> None:
        assert agent_from_name("Alex Agent").id == "console:alex-agent"
        assert agent_from_name("  alex   AGENT ").id == "console:alex-agent"
        assert agent_from_name("Иван").id == agent_from_name("ИВАН").id == "console:иван"
        assert agent_from_name("🙂").id == agent_from_name("🙂").id


def built(env: dict[str, str], data_dir: Path) -> LocalProvider:
    """The local provider as ``serve`` builds it from these settings."""
    deps = ProviderDeps(
        env=env, sink=Sink(), clock=SystemClock(), registry=CollectorRegistry(), data_dir=data_dir
    )
    return create(deps)


def test_the_console_learns_the_sidecar_host(tmp_path: Path) -> None:
    assert built({"HITL_HTTP_ADDR": "console.internal:8080"}, tmp_path).http_host == (
        "console.internal"
    )
    assert built({"HITL_HTTP_ADDR": "[::]:8080"}, tmp_path).http_host == "::"
    assert built({}, tmp_path).http_host == ""


@pytest.mark.parametrize("group", ["sales team", "x" * 65, "ventes/été"])
def test_a_default_group_starthitl_would_refuse_names_the_setting(
    tmp_path: Path, group: str
) -> None:
    # Sessions report their group to callers, who may pass it to StartHitl.
    with pytest.raises(ProviderConfigError) as refused:
        built({"HITL_LOCAL_GROUP_ID": group}, tmp_path)
    assert refused.value.setting == "HITL_LOCAL_GROUP_ID"


@pytest.mark.parametrize(("group", "used"), [(" sales ", "sales"), ("", "general")])
async def test_the_default_group_is_where_a_handoff_without_one_goes(
    tmp_path: Path, group: str, used: str
) -> None:
    local = built({"HITL_LOCAL_GROUP_ID": group, "HITL_LOCAL_STATE_FILE": ""}, tmp_path)
    await local.open()
    try:
        assert (await local.start(request("ses_1"), USER, timeout=1)).group_id == used
    finally:
        await local.close()


async def test_an_uncertain_retry_of_a_delivered_send_finds_it_after_the_agent_ended() -> None:
    """The outbox asks, uncertain, about a send whose settle a crash cut off,
    even once the session ended: the answer is the message it has."""
    local = provider(None)
    await local.open()
    chat = (await local.start(request("ses_1"), USER, timeout=1)).chat
    message = Message(body="hi", author=Author.USER)
    sent = await local.send(chat, USER, message, request_id="r1", uncertain=False, timeout=1)
    await local.end(chat.external_chat_id, agent_from_name("Alex"), "done")
    again = await local.send(chat, USER, message, request_id="r1", uncertain=True, timeout=1)
    assert again.external_message_id == sent.external_message_id
    await local.close()


async def test_a_long_conversation_keeps_its_latest_messages() -> None:
    """Every change re-sends every conversation to every console tab: a
    conversation keeps the latest messages, and says how many it dropped."""
    local = provider(None)
    await local.open()
    chat = (await local.start(request("ses_1"), USER, timeout=1)).chat
    agent = agent_from_name("Alex")
    await local.take(chat.external_chat_id, agent)
    for i in range(_MAX_MESSAGES + 3):
        await local.send(
            chat, USER, Message(body=f"u{i}"), request_id=f"r{i}", uncertain=False, timeout=1
        )
    await local.reply(chat.external_chat_id, agent, "last word")
    _, (conv,) = local.snapshot()
    assert len(conv["messages"]) == _MAX_MESSAGES
    assert conv["trimmed"] == 4
    assert conv["messages"][0]["text"] == "u4"
    assert conv["messages"][-1]["text"] == "last word"
    ids = [m["id"] for m in conv["messages"]]
    assert len(set(ids)) == len(ids)
    assert ids[-1] == f"{chat.external_chat_id}_{_MAX_MESSAGES + 4}"  # numbering goes on
    assert len(local._sent) == _MAX_MESSAGES - 1  # the dropped sends' request ids went too
    await local.close()


async def test_abandon_closes_the_given_up_starts_conversation_unless_a_retry_took_it() -> None:
    local = provider(None)
    await local.open()
    given_up = await local.start(request("ses_1", "usr_1"), USER, timeout=1)
    first = request("ses_2", "usr_2")
    await local.start(first, USER, timeout=1)
    # The retry of ses_2's start, as the new session ses_3, takes its conversation.
    retry = StartRequest(
        session_id="ses_3", user=first.user, title="Refund", request_id=first.request_id
    )
    retried = await local.start(retry, USER, timeout=1)

    assert await local.abandon(USER, session_id="ses_1", request_id="r", timeout=1)
    assert not await local.abandon(USER, session_id="ses_1", request_id="r", timeout=1)
    assert not await local.abandon(USER, session_id="ses_2", request_id="r", timeout=1)
    _, conversations = local.snapshot()
    status = {c["id"]: (c["status"], c["end_reason"]) for c in conversations}
    assert status[given_up.chat.external_chat_id][0] == "ended"
    assert "failed to start" in status[given_up.chat.external_chat_id][1]
    assert status[retried.chat.external_chat_id] == ("waiting", "")
    await local.close()


async def test_open_refuses_a_state_file_whose_folder_takes_no_file(tmp_path: Path) -> None:
    # Found at start, naming the setting: the service used to serve and then
    # fail every handoff, none of which the file could ever hold.
    (tmp_path / "taken").write_text("[]")
    local = provider(tmp_path / "taken" / "s.json")
    with pytest.raises(ProviderConfigError, match=r"HITL_LOCAL_STATE_FILE.*not a directory"):
        await local.open()
    assert (tmp_path / "taken").read_text() == "[]"


async def test_open_makes_the_folder_and_leaves_no_file_behind(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "deeper"
    local = provider(folder / "s.json")
    await local.open()
    await local.close()
    assert list(folder.iterdir()) == []  # nothing changed, nothing written


def test_state_json_falls_back_for_what_orjson_refuses() -> None:
    """A lone surrogate (a hand-edited state file can hold one) is written
    as the standard library writes it, and reads back the same."""
    from providers.local.provider import dumps

    value = {"conversations": [{"title": "\ud800 and é", "seq": 1}]}
    assert json.loads(dumps(value)) == value
    assert json.loads(dumps({"title": "é"})) == {"title": "é"}
