"""A third-party provider, installed as an entry point the way the docs say
(no ``provider_factory``: the registry finds it), driven through the real
service: gRPC on 127.0.0.1:0, the HTTP sidecar, and the command line."""

from __future__ import annotations

import asyncio
import os
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest

import providers
from hitl_service.app import App
from hitl_service.config import Settings
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.logs import SecretRedactor
from providers import SupportsValidation, types
from providers.errors import ProviderUnavailable
from providers.types import Card, Location, Media, ProviderChat, ProviderUser
from tests.conftest import start_app
from tests.support import TIMEOUT, install_providers, make_user, rid, start_session
from tests.test_cli import run
from tests.zendesk_provider import ZendeskProvider

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "zk-live-abcdef0123456789"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution registering ``zendesk`` under ``hitl_service.providers``."""
    site = install_providers(
        tmp_path / "site", "zendesk-hitl", {"zendesk": "tests.zendesk_provider:create"}
    )
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def env(service_env: dict[str, str], site: Path) -> dict[str, str]:
    return {**service_env, "HITL_PROVIDER": "zendesk", "HITL_ZENDESK_API_KEY": API_KEY}


@asynccontextmanager
async def zendesk(
    env: dict[str, str],
) -> AsyncIterator[tuple[App, ZendeskProvider, pb_grpc.HitlServiceAsyncStub, httpx.AsyncClient]]:
    app = await start_app(env)
    provider = app.provider
    assert isinstance(provider, ZendeskProvider)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=10) as http,
        ):
            yield app, provider, pb_grpc.HitlServiceStub(channel), http
    finally:
        await app.stop(grace=1)


async def send(stub: pb_grpc.HitlServiceAsyncStub, session: pb.Session, **body: object) -> None:
    await stub.SendMessage(
        pb.SendMessageRequest(
            session_id=session.id,
            message=pb.Message(**body),  # type: ignore[arg-type]
            request_id=rid(),
        ),
        timeout=TIMEOUT,
    )


class TestContract:
    async def test_a_text_only_provider_gets_every_body_as_readable_text(
        self, env: dict[str, str]
    ) -> None:
        """``Capabilities()`` carries text only: media, locations and cards
        reach it as text, in sends and in the start's transcript."""
        async with zendesk(env) as (_app, provider, stub, _http):
            user = await make_user(stub)
            history = [pb.Message(location=pb.Location(latitude=52.52, longitude=13.405))]
            session = await start_session(stub, user.id, history=history)
            image = pb.Media(kind=pb.MEDIA_KIND_IMAGE, url="https://cdn.example/p.png")
            await send(stub, session, media=image)
            await send(stub, session, card=pb.Card(title="Plan", subtitle="Pro"))
            await send(stub, session, text="plain")
            bodies = [message.body for _state, message in provider.sends]
            assert all(isinstance(b, str) for b in bodies), bodies
            assert "https://cdn.example/p.png" in str(bodies[0])
            assert "Plan" in str(bodies[1])
            assert bodies[2] == "plain"
            (transcript,) = provider.histories
            assert isinstance(transcript[0].body, str)
            assert "52.52" in transcript[0].body

    async def test_state_a_provider_changed_before_failing_is_kept(
        self, env: dict[str, str]
    ) -> None:
        """A token refreshed in a send whose delivery then fails (the old
        refresh token is spent) must reach the retry."""
        async with zendesk(env) as (_app, provider, stub, _http):

            def refresh_then_fail(chat: ProviderChat, user: ProviderUser) -> None:
                user.state.update(token="t1", refresh="r1")
                raise ProviderUnavailable("503 after the token refresh")

            provider.send_steps.append(refresh_then_fail)
            session = await start_session(stub, (await make_user(stub)).id)
            await send(stub, session, text="hi")
            assert [state["refresh"] for state, _message in provider.sends] == ["r0", "r1"]

    async def test_validation_is_optional(self, env: dict[str, str]) -> None:
        """A provider without ``validate_start`` gets every group id the
        service's own checks let through, LiveChat's numbers or not."""
        async with zendesk(env) as (_app, provider, stub, _http):
            assert not isinstance(provider, SupportsValidation)
            session = await start_session(stub, (await make_user(stub)).id, group_id="vip")
            assert session.state == pb.SESSION_STATE_REQUESTED
            assert provider.groups == ["vip"]

    def test_every_event_kind_is_importable_from_providers(self) -> None:
        kinds = typing.get_args(types.EventKind)
        assert [k.__name__ for k in kinds if not hasattr(providers, k.__name__)] == []

    def test_body_kinds_the_fallback_knows(self) -> None:
        assert set(typing.get_args(types.Body)) == {str, Media, Location, Card}


class TestLifecycle:
    @pytest.mark.parametrize(("fault", "said"), [("hang", "did not answer"), ("bug", "KeyError")])
    async def test_readyz_answers_whatever_the_probe_does(
        self, env: dict[str, str], fault: str, said: str
    ) -> None:
        async with zendesk(env) as (_app, provider, _stub, http):

            async def probe(timeout: float) -> list[str]:
                if fault == "bug":
                    raise KeyError("region")
                await asyncio.Event().wait()
                return []

            provider.probe_hook = probe
            response = await http.get("/readyz")
            assert response.status_code == 503
            assert said in response.json()["problems"]["provider"]

    @pytest.mark.parametrize("mode", ["raise", "hang"])
    async def test_stop_closes_the_store_whatever_close_does(
        self, env: dict[str, str], mode: str
    ) -> None:
        app = await start_app({**env, "HITL_ZENDESK_MODES": f"close={mode}"})
        await app.stop(grace=0)  # neither raises nor hangs
        assert not app._started
        with pytest.raises(Exception, match="closed"):
            await app.store.ping()

    async def test_a_bug_in_open_is_one_line(
        self, env: dict[str, str], site: Path, tmp_path: Path
    ) -> None:
        env = {
            **env,
            "HITL_ZENDESK_MODES": "open=bug",
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        }
        code, _out, err = await run(["serve"], env, tmp_path)
        assert (code, "Traceback" in err) == (1, False), err[-600:]
        assert "the 'zendesk' provider failed to open: KeyError" in err
        code, out, err = await run(["check"], env, tmp_path)
        assert "Traceback" not in out + err, err[-600:]
        assert "provider zendesk: PROBLEM: cannot open the provider" in out


async def test_check_closes_a_provider_whose_open_failed(
    env: dict[str, str], site: Path, tmp_path: Path
) -> None:
    # What the open set up before failing is let go: the close runs (here
    # it fails too, which check reports).
    env = {
        **env,
        "HITL_ZENDESK_MODES": "open=raise,close=raise",
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
    }
    code, out, err = await run(["check"], env, tmp_path)
    assert code == 1, (out, err)
    assert "cannot open the provider" in out
    assert "close: connection refused" in out, out


class TestProviderCommands:
    """``hitl-service <provider> ...`` answers in one line whatever the
    provider does: an open that hangs is bounded like ``check``'s, and a bug
    in the command is no traceback."""

    @pytest.mark.parametrize(
        ("mode", "code", "said"),
        [
            ("", 0, "synced"),
            ("open=hang", 1, "cannot open the provider: it did not finish within 1 s"),
            ("command=bug", 1, "the command failed: KeyError: 'tenant'"),
            ("command=leak", 1, "the command failed: PermissionError: 401 Unauthorized"),
        ],
    )
    async def test_one_line_whatever_the_provider_does(
        self, env: dict[str, str], site: Path, tmp_path: Path, mode: str, code: int, said: str
    ) -> None:
        env = {
            **env,
            "HITL_ZENDESK_MODES": mode,
            "HITL_PROVIDER_TIMEOUT": "1s",
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        }
        got, out, err = await run(["zendesk", "sync"], env, tmp_path)
        assert got == code, (out, err)
        plain = [line for line in (out + err).splitlines() if not line.startswith("{")]
        assert any(said in line for line in plain), (out, err)
        assert "Traceback (most recent call last)" not in "\n".join(plain)
        assert API_KEY not in out + err


class TestSecretsInProblems:
    """A provider's errors may carry its own secrets (a library error naming
    the URL it called): /readyz (on the listener that faces webhook senders),
    ``check`` and ``serve`` show them masked, as the logs do."""

    async def test_readyz(self, env: dict[str, str]) -> None:
        async with zendesk(env) as (_app, provider, _stub, http):

            async def probe(timeout: float) -> list[str]:
                raise PermissionError(f"401 Unauthorized for https://zendesk.test/?key={API_KEY}")

            provider.probe_hook = probe
            response = await http.get("/readyz")
        assert response.status_code == 503
        problem = response.json()["problems"]["provider"]
        assert "401 Unauthorized for https://zendesk.test/?key=" in problem
        assert API_KEY not in problem

    async def test_check_and_serve(self, env: dict[str, str], site: Path, tmp_path: Path) -> None:
        env = {
            **env,
            "HITL_ZENDESK_MODES": "open=leak",
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        }
        code, out, err = await run(["check"], env, tmp_path)
        assert "provider zendesk: PROBLEM: cannot open the provider" in out
        assert "401 Unauthorized" in out
        assert API_KEY not in out + err
        code, out, err = await run(["serve"], env, tmp_path)
        assert code == 1
        assert "cannot start" in err  # the service.start_failed line (JSON)
        assert "401 Unauthorized" in err
        assert API_KEY not in out + err

    async def test_a_factory_error_in_every_command(
        self, env: dict[str, str], site: Path, tmp_path: Path
    ) -> None:
        """The factory's error is one configuration line, in ``serve``,
        ``check`` and the provider's own commands alike."""
        env = {
            **env,
            "HITL_ZENDESK_MODES": "init=leak",
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        }
        for args in (["serve"], ["check"], ["zendesk", "sync"]):
            code, out, err = await run(args, env, tmp_path)
            assert code == 2, (args, out, err)
            assert "malformed API key" in out + err, (args, out, err)
            assert API_KEY not in out + err, args


def test_a_providers_api_key_setting_is_masked_in_logs(env: dict[str, str]) -> None:
    """Secret settings are recognized by their names (ProviderDeps.env says
    which words); ``_API_KEY`` is one."""
    redact = SecretRedactor(Settings.from_env(env).secrets())
    line = redact(None, "error", {"event": "zendesk.failed", "error": f"401 for {API_KEY}"})
    assert API_KEY not in str(line)
