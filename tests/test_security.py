"""Secrets stay hidden; API tokens and TLS protect the gRPC port."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.app import App, api_exposure
from hitl_service.config import ConfigError, Settings, parse_store_url
from hitl_service.errors import StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.logs import SecretRedactor
from hitl_service.secret import Secret, matches_any
from tests.conftest import start_app
from tests.support import TIMEOUT, expect_error


class TestSecret:
    def test_never_shows_itself(self) -> None:
        secret = Secret("s3cr3t-value")
        assert "s3cr3t" not in repr(secret)
        assert "s3cr3t" not in str(secret)
        assert "s3cr3t" not in f"{secret}"
        assert "s3cr3t" not in repr({"token": secret})
        with pytest.raises(TypeError):
            pickle.dumps(secret)

    def test_compares_in_constant_time_including_non_ascii(self) -> None:
        secret = Secret("pässwört")
        assert secret.matches("pässwört")
        assert secret.matches("pässwört".encode())
        assert not secret.matches("passwort")
        assert not secret.matches("")
        assert matches_any("b", (Secret("a"), Secret("b")))
        assert not matches_any("c", (Secret("a"), Secret("b")))

    def test_settings_and_store_urls_hide_passwords(self) -> None:
        url = parse_store_url("postgresql://hitl:hunter2@db.internal:5432/hitl")
        assert "hunter2" not in repr(url)
        assert url.redacted() == "postgresql://hitl:***@db.internal:5432/hitl"
        settings = Settings.from_env(
            {
                "HITL_API_TOKENS": "tok-one-123456789,tok-two-456789012",
                "HITL_STORE_URL": "postgresql://u:hunter2@h/d",
            }
        )
        shown = repr(settings)
        assert "tok-one-123456789" not in shown
        assert "hunter2" not in shown
        for malformed in (
            "postgresql://u:hunter2@h:port/d",
            "postgresql://u:hunter2@h1:5432,h2:99999/d",
            "postgresql://u:hunter2@h1,,h2/d",
            "postgresql://u:hunter2@[::1/d",
        ):
            with pytest.raises(ConfigError) as bad:
                parse_store_url(malformed)
            assert "hunter2" not in str(bad.value)
        # A libpq key=value DSN is no URL: the text before its first colon
        # (here inside the password) was quoted as the scheme.
        with pytest.raises(ConfigError) as bad:
            parse_store_url("host=db user=u password=hunter2:x dbname=d")
        assert "hunter2" not in str(bad.value)
        # A '/', '?' or '#' left unencoded in a password ends the authority
        # early: "12" read as a port and the rest as the database name,
        # "redacted" showed the whole password.
        for cut in ("12/hunter2", "12?hunter2", "12#hunter2", "hunter2/x"):
            with pytest.raises(ConfigError, match="percent-encode") as bad:
                parse_store_url(f"postgresql://u:{cut}@h:5432/d")
            assert "hunter2" not in str(bad.value)
        encoded = parse_store_url("postgresql://u:12%2Fhunter2@h:5432/d?user=me@corp")
        assert encoded.redacted() == "postgresql://u:***@h:5432/d"
        several = parse_store_url("postgresql://u:hunter2@h1:5432,[::1]:5433/d?sslmode=require")
        assert several.redacted() == "postgresql://u:***@h1:5432,[::1]:5433/d"


class TestRedactor:
    def test_masks_known_keys_and_registered_values_anywhere(self) -> None:
        redactor = SecretRedactor([Secret("dal:supersecret-pat")])
        event = redactor(
            None,
            "info",
            {
                "event": "call failed: bad token dal:supersecret-pat",
                "authorization": "Basic abc",
                "nested": {"secret_key": "x", "note": "dal:supersecret-pat here"},
                "items": ["dal:supersecret-pat"],
                "count": 3,
            },
        )
        text = json.dumps(event)
        assert "supersecret" not in text
        assert "Basic abc" not in text
        assert event["count"] == 3

    def test_a_secret_setting_with_a_trailing_newline_is_masked_bare(self) -> None:
        # The provider strips the value and sends it bare; the redactor had
        # registered it with the newline (a Kubernetes secret read from a
        # file), so the bare value went unmasked.
        settings = Settings.from_env({"HITL_LIVECHAT_WEBHOOK_SECRET": "whsec-mounted-4e1d7a\n"})
        scrub = SecretRedactor(settings.secrets()).scrub
        assert scrub("secret_key whsec-mounted-4e1d7a is invalid") == (
            "secret_key ********** is invalid"
        )

    def test_the_password_inside_a_basic_credential_is_masked_too(self) -> None:
        # LiveChat's agent token is base64 of account_id:PAT and only that
        # form was registered: an error quoting the bare PAT went unmasked.
        token = base64.b64encode(b"acct-2f6c:pat-secret-9d81c3e5").decode()
        settings = Settings.from_env({"HITL_LIVECHAT_AGENT_TOKEN": token})
        scrub = SecretRedactor(settings.secrets()).scrub
        assert scrub(f"refused {token}") == "refused **********"
        assert "pat-secret-9d81c3e5" not in scrub("token pat-secret-9d81c3e5 is invalid")
        assert "pat-secret" not in scrub("sent acct-2f6c:pat-secret-9d81c3e5")
        # A secret that merely looks like base64 adds nothing odd.
        plain = Settings.from_env({"HITL_LIVECHAT_WEBHOOK_SECRET": "abcdefgh"}).secrets()
        assert [s.reveal() for s in plain] == ["abcdefgh"]

    def test_very_short_values_are_not_registered(self) -> None:
        # Masking every "abc" in every log line would hide ordinary words.
        redactor = SecretRedactor([Secret("abc")])
        assert redactor(None, "info", {"event": "abc"})["event"] == "abc"


async def test_full_flow_logs_no_secret(service_env: dict[str, str]) -> None:
    tokens = "api-token-aaaaaaaa,api-token-bbbbbbbb"
    service_env["HITL_API_TOKENS"] = tokens
    app = await start_app(service_env)
    try:
        with structlog.testing.capture_logs() as logs:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.HitlServiceStub(channel)
                good = (("authorization", "Bearer api-token-bbbbbbbb"),)
                user = await stub.CreateUser(
                    pb.CreateUserRequest(name="Ada"), timeout=TIMEOUT, metadata=good
                )
                bad = (("authorization", "Bearer api-token-wrong"),)
                await expect_error(
                    stub.GetSession(
                        pb.GetSessionRequest(session_id="ses_x"), timeout=TIMEOUT, metadata=bad
                    ),
                    grpc.StatusCode.UNAUTHENTICATED,
                )
                assert user.user.name == "Ada"
    finally:
        await app.stop(grace=1)
    text = json.dumps(logs, default=str)
    assert "api-token-aaaaaaaa" not in text
    assert "api-token-bbbbbbbb" not in text
    assert "api-token-wrong" not in text
    assert any(entry.get("code") == "UNAUTHENTICATED" for entry in logs)


class TestApiTokens:
    async def test_calls_need_a_token_but_health_does_not(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_API_TOKENS"] = "first-token-1234, second-token-5678"
        app = await start_app(service_env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.HitlServiceStub(channel)
                request = pb.CreateUserRequest(name="Ada")
                error = await expect_error(
                    stub.CreateUser(request, timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED
                )
                assert "HITL_API_TOKENS" in error.message
                for token in ("first-token-1234", "second-token-5678"):  # rotation: both work
                    ok = await stub.CreateUser(
                        request, timeout=TIMEOUT, metadata=(("authorization", f"Bearer {token}"),)
                    )
                    assert ok.user.id
                # The auth scheme is case-insensitive (RFC 7235, section 2.1).
                for scheme in ("bearer", "BEARER"):
                    ok = await stub.CreateUser(
                        request,
                        timeout=TIMEOUT,
                        metadata=(("authorization", f"{scheme} first-token-1234"),),
                    )
                    assert ok.user.id
                health: Any = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
                )
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                stream = stub.StreamEvents(pb.StreamEventsRequest())
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stream.read()
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await app.stop(grace=1)


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to make a test certificate"
)


def make_certificate(folder: Path, name: str, bits: int = 2048) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: (key, cert)."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", f"rsa:{bits}", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@needs_openssl
async def test_tls(service_env: dict[str, str], tmp_path: Path) -> None:
    key, cert = await asyncio.to_thread(make_certificate, tmp_path, "service")
    service_env["HITL_GRPC_TLS_CERT"] = str(cert)
    service_env["HITL_GRPC_TLS_KEY"] = str(key)
    app = await start_app(service_env)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{app.grpc_port}", credentials) as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            user = await stub.CreateUser(pb.CreateUserRequest(name="TLS"), timeout=TIMEOUT)
            assert user.user.id
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.HitlServiceStub(plain).CreateUser(
                    pb.CreateUserRequest(name="x"), timeout=2
                )
    finally:
        await app.stop(grace=1)


def test_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"HITL_GRPC_TLS_CERT": str(cert)})
    assert error.value.variable == "HITL_GRPC_TLS_KEY"
    with pytest.raises(ConfigError) as missing:
        Settings.from_env(
            {"HITL_GRPC_TLS_CERT": str(tmp_path / "nope"), "HITL_GRPC_TLS_KEY": str(cert)}
        )
    assert missing.value.variable == "HITL_GRPC_TLS_CERT"


@needs_openssl
def test_tls_files_grpc_cannot_use_are_named_at_start(tmp_path: Path) -> None:
    """gRPC itself only says it cannot bind HITL_GRPC_ADDR."""
    (key, cert), (other_key, _) = (make_certificate(tmp_path, n) for n in "ab")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    good = Settings.from_env({"HITL_GRPC_TLS_CERT": str(cert), "HITL_GRPC_TLS_KEY": str(key)})
    assert good.tls_cert == cert
    # gRPC serves keys OpenSSL's default security level calls too small.
    weak_key, weak = make_certificate(tmp_path, "weak", bits=1024)
    assert (
        Settings.from_env(
            {"HITL_GRPC_TLS_CERT": str(weak), "HITL_GRPC_TLS_KEY": str(weak_key)}
        ).tls_key
        == weak_key
    )
    for bad, variable in [
        ({"HITL_GRPC_TLS_CERT": str(junk), "HITL_GRPC_TLS_KEY": str(junk)}, "HITL_GRPC_TLS_CERT"),
        (
            {"HITL_GRPC_TLS_CERT": str(cert), "HITL_GRPC_TLS_KEY": str(other_key)},
            "HITL_GRPC_TLS_CERT",
        ),
        (
            {
                "HITL_GRPC_TLS_CERT": str(cert),
                "HITL_GRPC_TLS_KEY": str(key),
                "HITL_GRPC_TLS_CLIENT_CA": str(junk),
            },
            "HITL_GRPC_TLS_CLIENT_CA",
        ),
    ]:
        with pytest.raises(ConfigError) as error:
            Settings.from_env(bad)
        assert error.value.variable == variable
        assert "PRIVATE KEY" not in str(error.value)


def logged(
    capsys: pytest.CaptureFixture[str],
    emit: Callable[[], None],
    *,
    log_format: str = "json",
    secrets: tuple[str, ...] = (),
) -> str:
    """What ``emit`` writes to stderr with the service's logging set up."""
    import logging

    from hitl_service.logs import configure_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        redactor = SecretRedactor([Secret(s) for s in secrets])
        configure_logging(log_format=log_format, level="info", redactor=redactor, cache=False)
        emit()
        return capsys.readouterr().err
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        # Its stderr is capsys's, closed after this test: a service started
        # by a module-scoped fixture before the next test's reset would write there.
        structlog.reset_defaults()


SECRET = "tok-supersecret-0123"


def _fail_with_the_secret() -> None:
    import logging

    try:
        raise RuntimeError(f"the upstream refused {SECRET}")
    except RuntimeError:
        structlog.get_logger("t").exception("outbox.error")
        logging.getLogger("a.library").warning("library trouble", exc_info=True)
        logging.getLogger("asyncpg.pool").warning("pool trouble; retrying", exc_info=True)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_secret_in_an_exception_message_is_masked(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = logged(capsys, _fail_with_the_secret, log_format=log_format, secrets=(SECRET,))
    assert "outbox.error" in err
    assert "the upstream refused" in err
    assert SECRET not in err


def test_standard_library_tracebacks_are_structured(capsys: pytest.CaptureFixture[str]) -> None:
    err = logged(capsys, _fail_with_the_secret, secrets=(SECRET,))
    lines = [json.loads(line) for line in err.splitlines()]
    foreign = next(line for line in lines if line.get("logger") == "a.library")
    assert "exc_info" not in foreign  # not a list of reprs with "<traceback object at ...>"
    assert foreign["exception"][0]["exc_type"] == "RuntimeError"
    assert foreign["exception"][0]["frames"]


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_asyncpg_pool_retries_are_one_line_without_a_traceback(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncpg's pool warned with a whole traceback of its internals each
    time it could not reconnect (5 in a 30 s database outage): read as a
    crash. The error's text stays, masked like everything else."""
    err = logged(capsys, _fail_with_the_secret, log_format=log_format, secrets=(SECRET,))
    (line,) = [line for line in err.splitlines() if "pool trouble" in line]
    assert "pool trouble; retrying: RuntimeError: the upstream refused" in line
    assert SECRET not in err
    assert "exception" not in line, line  # JSON: no traceback structure
    rest = err.split(line, 1)[1]
    assert "Traceback" not in rest, rest  # console: none printed after it


def test_logged_tracebacks_carry_no_frame_locals(capsys: pytest.CaptureFixture[str]) -> None:
    def fail(user_text: str) -> None:
        raise ValueError("boom")

    def emit() -> None:
        try:
            fail("the user said: my card is 4111-1111")
        except ValueError:
            structlog.get_logger("test").exception("failed")

    err = logged(capsys, emit)
    line = json.loads(err.strip().splitlines()[-1])
    assert line["event"] == "failed"
    assert "boom" in json.dumps(line["exception"])
    assert "4111" not in err


def test_provider_deps_repr_leaves_out_the_environment(tmp_path: Path) -> None:
    """The environment holds provider tokens, webhook secrets, the store URL."""
    from prometheus_client import CollectorRegistry

    from hitl_service.clock import SystemClock
    from providers.base import ProviderDeps

    deps = ProviderDeps(
        env={"HITL_LIVECHAT_AGENT_TOKEN": "pat-s3cret-value"},
        sink=None,  # type: ignore[arg-type]  # not used by repr
        clock=SystemClock(),
        registry=CollectorRegistry(),
        data_dir=tmp_path,
    )
    assert "pat-s3cret-value" not in repr(deps)


async def test_a_store_outage_does_not_name_the_database_to_callers(
    app: App, stub: pb_grpc.HitlServiceAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's error names the database host and user: operators get it
    in the log; API callers get a plain UNAVAILABLE they can retry on."""
    detail = "PostgreSQL at db.internal:5432/hitl (user hitl_app) cannot connect"

    async def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable(detail)

    monkeypatch.setattr(app.store, "get_session", down)
    with structlog.testing.capture_logs() as logs:
        error = await expect_error(
            stub.GetSession(pb.GetSessionRequest(session_id="ses_x"), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert error.reason == "STORE_UNAVAILABLE"
    assert "db.internal" not in error.message
    assert "hitl_app" not in error.message
    assert "retry" in error.message
    assert any(
        entry["event"] == "rpc.store_unavailable" and entry["error"] == detail for entry in logs
    )


@pytest.mark.parametrize(
    ("address", "extra", "exposed"),
    [
        ("127.0.0.1:0", {}, False),
        ("localhost:0", {}, False),
        ("[::1]:0", {}, False),
        ("0.0.0.0:0", {}, True),
        ("[::]:0", {}, True),
        ("10.1.2.3:50051", {}, True),
        ("hitl.internal:50051", {}, True),
        ("0.0.0.0:0", {"HITL_API_TOKENS": "a-long-enough-token"}, False),
    ],
)
def test_an_api_open_to_the_network_without_credentials_is_named(
    service_env: dict[str, str], address: str, extra: dict[str, str], exposed: bool
) -> None:
    settings = Settings.from_env({**service_env, "HITL_GRPC_ADDR": address, **extra})
    problem = api_exposure(settings)
    assert bool(problem) is exposed
    if exposed:
        assert "HITL_API_TOKENS" in problem


async def test_a_service_open_to_the_network_warns_at_start(service_env: dict[str, str]) -> None:
    # The defaults listen on loopback; an operator who opens the port and
    # forgets the tokens is told once, at start-up, in the log.
    env = {**service_env, "HITL_GRPC_ADDR": "0.0.0.0:0"}
    with structlog.testing.capture_logs() as logs:
        app = await start_app(env)
        await app.stop(grace=0)
    warned = [e for e in logs if e["event"] == "service.api_exposed"]
    assert len(warned) == 1
    assert warned[0]["log_level"] == "warning"
    assert warned[0]["grpc_addr"] == "0.0.0.0:0"
    with structlog.testing.capture_logs() as logs:
        app = await start_app(service_env)  # 127.0.0.1
        await app.stop(grace=0)
    assert "service.ready" in [e["event"] for e in logs]
    assert "service.api_exposed" not in [e["event"] for e in logs]


@pytest.mark.parametrize("tokens", ["short", "a-long-enough-token,qq", ",,abc,"])
def test_a_guessable_api_token_stops_the_start_without_showing_it(
    service_env: dict[str, str], tokens: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**service_env, "HITL_API_TOKENS": tokens})
    assert caught.value.variable == "HITL_API_TOKENS"
    assert "16 characters" in str(caught.value)
    for token in tokens.split(","):
        if token:
            assert token not in str(caught.value)


def test_long_enough_api_tokens_are_taken(service_env: dict[str, str]) -> None:
    settings = Settings.from_env(
        {**service_env, "HITL_API_TOKENS": " 0123456789abcdef ,fedcba9876543210"}
    )
    assert [t.reveal() for t in settings.api_tokens] == ["0123456789abcdef", "fedcba9876543210"]


def test_a_secret_is_masked_as_a_url_quotes_it_too() -> None:
    # A library error may name the URL it called, the key percent-encoded.
    secret = "p@ss/w0rd+key=="
    redact = SecretRedactor([Secret(secret)])
    for shown in (
        f"GET https://api.example/?key={quote(secret, safe='')} failed",
        f"POST https://api.example/ body=key={quote_plus(secret)}",
        f"token {secret} refused",
    ):
        line = redact(None, "error", {"event": "x.failed", "error": shown})
        assert "w0rd" not in line["error"], line
    assert "w0rd" not in redact.scrub(f"?key={quote(secret, safe='')}")


def test_a_secret_inside_another_is_masked_whole() -> None:
    # Masking the shorter first left the rest of the longer in view.
    short, long = "abcdef12", "abcdef12-and-more-secret"
    redact = SecretRedactor([Secret(short), Secret(long)])
    assert redact.scrub(f"token={long}") == "token=**********"
