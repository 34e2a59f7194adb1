"""The ``hitl-service`` command as people run it: clear one-line errors for
bad settings, ``check``, provider subcommands, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.config import ConfigError, Settings, load_environment
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.server import grpc_options
from tests.support import TIMEOUT, install_providers, make_user, start_session, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from hitl_service.app import App

HITL = [sys.executable, "-m", "hitl_service"]


async def drain(stream: object) -> None:
    """Reads a stream until it ends (with an error, for a shutdown)."""
    while True:
        await stream.read()  # type: ignore[attr-defined]


async def spawn(
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    *,
    stdout: int = asyncio.subprocess.PIPE,
    preexec_fn: Callable[[], None] | None = None,
) -> asyncio.subprocess.Process:
    """``hitl-service <args>`` with ``env`` over this process's; stderr piped;
    ``preexec_fn`` runs in the child before it starts (its limits, say)."""
    return await asyncio.create_subprocess_exec(
        *HITL,
        *args,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=cwd,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kills ``proc`` if it still runs (a test that failed or timed out) and
    waits for it: no command outlives its test."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _lines_until_ready(proc: asyncio.subprocess.Process) -> list[str]:
    """The JSON lines ``serve`` writes up to and with ``service.ready``."""
    assert proc.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not any('"service.ready"' in line for line in lines):
            line = (await proc.stderr.readline()).decode()
            assert line, "the service exited before serving"
            lines.append(line)
    return lines


async def run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await spawn(args, env, cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await reap(proc)  # a failed test leaves no service running
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HITL_PROVIDER", "nosuch"),
        ("HITL_STORE_URL", "mysql://db/hitl"),
        ("HITL_STORE_URL", "sqlite://relative.db"),
        ("HITL_GRPC_ADDR", "no-port"),
        ("HITL_PROVIDER_TIMEOUT", "soon"),
        ("HITL_LOG_FORMAT", "xml"),
        ("HITL_SQLITE_SYNCHRONOUS", "off"),
        ("HITL_RETENTION", "47h"),  # under the 48 h a retried request may come back
    ],
)
async def test_bad_settings_exit_with_one_line_naming_the_variable(
    service_env: dict[str, str], tmp_path: Path, variable: str, value: str
) -> None:
    code, _, err = await run(["serve"], {**service_env, variable: value}, tmp_path)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert variable in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("value", "seconds"), [("", 0.0), ("0", 0.0), ("2d", 172800.0), ("720h", 2592000.0)]
)
def test_retention_is_off_or_at_least_two_days(value: str, seconds: float) -> None:
    assert Settings.from_env({"HITL_RETENTION": value}).retention == seconds


def test_retention_is_at_most_a_hundred_years() -> None:
    """A larger one was accepted, then every maintenance sweep failed with an
    OverflowError traceback (now - retention is before year 1), and the
    hourly prune never ran: request records and dedupe keys were kept forever."""
    assert Settings.from_env({"HITL_RETENTION": "36500d"}).retention == 36500 * 86400.0
    for bad in ("36501d", "1000000d", "99999999999999999999d"):
        with pytest.raises(ConfigError, match="HITL_RETENTION"):
            Settings.from_env({"HITL_RETENTION": bad})


@pytest.mark.parametrize(
    "variable",
    [
        "HITL_RECONCILE_INTERVAL",  # 4000000d: every catch-up turn overflowed (now + interval)
        "HITL_QUEUE_TIMEOUT",
        "HITL_IDLE_TIMEOUT",
        "HITL_PROVIDER_TIMEOUT",
        "HITL_STREAM_MAX_SECONDS",
    ],
)
def test_durations_are_at_most_a_hundred_years(variable: str) -> None:
    Settings.from_env({variable: "36500d"})
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: "4000000d"})


@pytest.mark.parametrize(
    ("value", "seconds"), [("", 600.0), ("0", 0.0), ("30s", 30.0), ("12h", 43200.0)]
)
def test_abandon_after_is_off_or_at_most_twelve_hours(value: str, seconds: float) -> None:
    assert Settings.from_env({"HITL_ABANDON_AFTER": value}).abandon_after == seconds
    with pytest.raises(ConfigError, match="HITL_ABANDON_AFTER"):
        Settings.from_env({"HITL_ABANDON_AFTER": "13h"})  # a close is retried up to 24 h


def test_http_max_in_flight_is_a_whole_number_from_one() -> None:
    assert Settings.from_env({}).http_max_in_flight == 256
    assert Settings.from_env({"HITL_HTTP_MAX_IN_FLIGHT": ""}).http_max_in_flight == 256
    assert Settings.from_env({"HITL_HTTP_MAX_IN_FLIGHT": " 1 "}).http_max_in_flight == 1
    for bad in ("0", "-5", "many", "2.5"):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"HITL_HTTP_MAX_IN_FLIGHT": bad})
        assert "HITL_HTTP_MAX_IN_FLIGHT" in str(refused.value)


def test_http_max_connections_is_a_whole_number_from_one() -> None:
    assert Settings.from_env({}).http_max_connections == 512
    assert Settings.from_env({"HITL_HTTP_MAX_CONNECTIONS": " 3 "}).http_max_connections == 3
    for bad in ("0", "-5", "many"):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"HITL_HTTP_MAX_CONNECTIONS": bad})
        assert "HITL_HTTP_MAX_CONNECTIONS" in str(refused.value)


async def test_grpc_max_connections_stays_within_what_grpc_takes() -> None:
    """gRPC's core takes the connection cap as a C int below INT_MAX: 2**31 - 1
    was accepted, and building the server aborted the process (SIGABRT, a
    failed check in connection_quota.cc, exit 134); a larger value ended the
    start with an OverflowError traceback. Refused as a setting instead."""
    for bad in ("2147483647", "3000000000", "99999999999999999999"):
        with pytest.raises(ConfigError, match="HITL_GRPC_MAX_CONNECTIONS"):
            Settings.from_env({"HITL_GRPC_MAX_CONNECTIONS": bad})
    largest = Settings.from_env({"HITL_GRPC_MAX_CONNECTIONS": str(2**31 - 2)})
    # The largest one accepted builds a server, which serves.
    server = grpc.aio.server(options=grpc_options(largest))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT)
    finally:
        await server.stop(None)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("100ms", 0.1), ("5m", 300.0)])
def test_grpc_idle_timeout_is_off_or_long_enough_for_a_first_call(
    value: str, seconds: float
) -> None:
    """1ms was accepted, and then every new gRPC connection was told GOAWAY
    (connection idle) before its first call reached the server: every call
    ran into its deadline. Under 0.5ms it rounded to 0 ms: never, silently."""
    assert Settings.from_env({"HITL_GRPC_IDLE_TIMEOUT": value}).grpc_idle_timeout == seconds
    for bad in ("1ms", "0.0004", "99ms"):
        with pytest.raises(ConfigError, match="HITL_GRPC_IDLE_TIMEOUT"):
            Settings.from_env({"HITL_GRPC_IDLE_TIMEOUT": bad})


async def test_a_password_in_a_bad_store_url_is_not_repeated(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    code, _, err = await run(
        ["serve"],
        {**service_env, "HITL_STORE_URL": "postgresql://u:hunter2@db:notaport/x"},
        tmp_path,
    )
    assert code == 2
    assert "hunter2" not in err


async def test_check_reports_plain_words(service_env: dict[str, str], tmp_path: Path) -> None:
    code, out, _ = await run(["check"], service_env, tmp_path)
    assert code == 0, out
    assert "store: ok" in out
    assert "provider local: ok" in out
    assert "all checks passed" in out


async def test_check_names_an_unreachable_store(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {**service_env, "HITL_STORE_URL": f"sqlite:///{blocker}/sub/hitl.db"}
    code, out, _ = await run(["check"], env, tmp_path)
    assert code == 1
    assert "store: PROBLEM (HITL_STORE_URL)" in out


async def test_a_postgresql_url_without_the_postgres_extra_is_one_line(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """asyncpg comes with the ``postgres`` extra only: a wheel installed
    without it, pointed at PostgreSQL, stopped ``serve`` and ``check`` with a
    ModuleNotFoundError traceback."""
    site = tmp_path / "no-asyncpg"
    site.mkdir()
    (site / "asyncpg.py").write_text(  # as if not installed
        "raise ModuleNotFoundError(\"No module named 'asyncpg'\", name='asyncpg')\n"
    )
    env = {
        **service_env,
        "HITL_STORE_URL": "postgresql://hitl:hunter2@127.0.0.1:1/hitl",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    code, _, err = await run(["serve"], {**env, "HITL_LOG_FORMAT": "console"}, tmp_path)
    assert code == 2, err
    line = one_line(err, "hitl-service: configuration error: HITL_STORE_URL")
    assert "hitl-service[postgres]" in line
    code, out, err = await run(["check"], env, tmp_path)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert "store: PROBLEM: HITL_STORE_URL" in out
    assert "hunter2" not in out + err


async def test_check_refuses_the_event_loop_serve_refuses(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**service_env, "HITL_EVENT_LOOP": "uvlopp"}
    for command in ("serve", "check"):
        code, out, err = await run([command], env, tmp_path)
        assert code == 2, out + err
        assert "HITL_EVENT_LOOP" in err
        assert "all checks passed" not in out


async def test_check_creates_no_database(service_env: dict[str, str], tmp_path: Path) -> None:
    """A mistyped path must not become a fresh, empty database that check
    calls fine and serve then starts on."""
    typo = tmp_path / "vra" / "hitl.db"
    env = {**service_env, "HITL_STORE_URL": f"sqlite:///{typo}"}
    code, out, _ = await run(["check"], env, tmp_path)
    assert code == 0, out  # a first install: nothing to find yet
    assert "does not exist yet" in out
    assert not typo.parent.exists()


async def test_provider_subcommands(service_env: dict[str, str], tmp_path: Path) -> None:
    code, _, _ = await run(["local", "list"], service_env, tmp_path)
    assert code == 0
    # Listing writes nothing: no state file appears (nor overwrites the server's).
    assert not (Path(service_env["HITL_DATA_DIR"]) / "local-console.json").exists()
    code, _, err = await run(["frobnicate"], service_env, tmp_path)
    assert code == 2
    assert "unknown command" in err


async def test_help_says_where_the_provider_commands_are(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """The docs send operators to ``hitl-service livechat register-webhooks``,
    which is no subcommand of the parser: ``--help`` listed only serve,
    check and demo, so nothing led from it to the provider's commands."""
    code, out, _ = await run(["--help"], service_env, tmp_path)
    assert code == 0
    note = " ".join(out.split())
    assert "'hitl-service PROVIDER COMMAND' (providers: livechat, local)" in note, out
    assert "'hitl-service PROVIDER --help' lists them" in note, out
    # ... and a provider's --help is an answer, not a usage error.
    code, out, _ = await run(["local", "--help"], service_env, tmp_path)
    assert code == 0
    assert out.startswith("usage: hitl-service local list"), out


async def test_serve_then_sigterm_drains_and_exits_cleanly(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    # In console format (a terminal, as with `make run`), with its banner.
    env = {**service_env, "HITL_LOG_FORMAT": "console"}
    proc = await spawn(["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    banner = ""
    try:
        async with asyncio.timeout(30):
            while "console" not in banner:
                line = await proc.stderr.readline()
                assert line, "the service exited before serving"
                banner += line.decode()
        grpc_port = int(re.search(r"gRPC\s+127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        assert re.search(r"console\s+http://127\.0\.0\.1:\d+/console", banner)
        assert "/webhooks/" not in banner  # the local provider takes none
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(
                health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"), timeout=TIMEOUT
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            stream = stub.StreamEvents(pb.StreamEventsRequest(after_cursor="0"))
            first = await stream.read()
            assert isinstance(first, pb.Event)
            assert first.session_id == session.id
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await drain(stream)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert "service.stopped" in rest
        assert "Traceback" not in rest
    finally:
        await reap(proc)


async def test_the_banner_s_demo_command_reaches_the_service(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """The banner's "try it" line, run as printed in the same environment,
    talks to this service. It said ``.venv/bin/hitl-service demo`` whatever
    the install (no such file outside a checkout's ``make run``) and whatever
    the gRPC address (port 0 here; a ``--grpc-addr`` flag the demo never
    sees): the demo called an address nothing served."""
    env = {**service_env, "HITL_LOG_FORMAT": "console"}
    proc = await spawn(["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "the service exited before serving"
                if "try it:" in line:
                    break
        command = line.split("try it:", 1)[1].split("(in another terminal)", 1)[0]
        demo = await asyncio.create_subprocess_exec(
            *shlex.split(command),
            "--message",
            "hello from the banner",
            "--exit-after-send",
            env={**os.environ, **service_env, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(demo.communicate(), 60)
        assert demo.returncode == 0, out.decode()
        assert "you: hello from the banner" in out.decode()
    finally:
        await reap(proc)


async def test_in_json_every_line_serve_writes_is_a_json_object(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    # A log shipper reads stderr line by line: no banner, no plain "stopping".
    proc = await spawn(["serve"], {**service_env, "HITL_LOG_FORMAT": "json"}, tmp_path)
    assert proc.stderr is not None
    try:
        lines = await _lines_until_ready(proc)
        proc.send_signal(signal.SIGTERM)
        out, rest = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    assert proc.returncode == 0
    assert out == b""
    logged = [json.loads(line) for line in [*lines, *rest.decode().splitlines()] if line.strip()]
    events = [entry["event"] for entry in logged]
    assert events.index("service.ready") < events.index("service.stopping")
    assert events[-1] == "service.stopped"
    ready = next(entry for entry in logged if entry["event"] == "service.ready")
    assert ready["grpc_port"] > 0
    assert ready["http_port"] > 0


async def test_a_webhook_still_arriving_when_the_drain_ends_is_answered_503_without_a_traceback(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """The sidecar gives requests in progress 5 s at shutdown. One still
    running then (here a webhook whose body is slow to come, as on a bad
    network) was cancelled by uvicorn, which logged "Exception in ASGI
    application" with the CancelledError's traceback, and its "Cancel 1
    running task(s)" line, both at error level, and answered a plain-text
    500. It is answered 503 with Retry-After now (the sender retries it on
    another replica or after the restart), with one warning."""
    proc = await spawn(["serve"], {**service_env, "HITL_LOG_FORMAT": "json"}, tmp_path)
    assert proc.stderr is not None
    writer: asyncio.StreamWriter | None = None
    try:
        lines = await _lines_until_ready(proc)
        port = json.loads(lines[-1])["http_port"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /webhooks/local HTTP/1.1\r\nHost: hitl\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        rest = asyncio.create_task(proc.stderr.read())
        # "100 Continue" comes once the webhook reads its body: in progress.
        go_on = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert go_on.startswith(b"HTTP/1.1 100 ")
        writer.write(b"{")
        await writer.drain()
        proc.send_signal(signal.SIGTERM)
        answer = await asyncio.wait_for(reader.read(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        logged = [json.loads(line) for line in (await rest).decode().splitlines() if line]
    finally:
        if writer is not None:
            writer.close()
        await reap(proc)
    head = answer.decode().split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("http/1.1 503 "), answer
    assert "retry-after: 1" in head
    assert not [entry for entry in logged if "exception" in entry or entry["level"] == "error"]
    (cut,) = [entry for entry in logged if entry["event"] == "http.requests_cut"]
    assert cut["level"] == "warning"
    assert cut["requests"] == 1
    assert logged[-1]["event"] == "service.stopped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_serve_raises_its_open_files_limit_and_says_when_it_is_short(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """HITL_GRPC_MAX_CONNECTIONS keeps a gRPC connection flood from taking
    every file descriptor only below the process's limit, and the soft one
    is often 1024 (systemd's default) under a far higher hard one: serve
    raises it to the hard limit, logs it, and warns when the cap leaves too
    few descriptors for the rest of the process."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"needs a finite hard limit above 512, not {hard}")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    env = {**service_env, "HITL_LOG_FORMAT": "json", "HITL_GRPC_MAX_CONNECTIONS": str(hard)}
    proc = await spawn(
        ["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL, preexec_fn=low_soft_limit
    )
    assert proc.stderr is not None
    try:
        lines = await _lines_until_ready(proc)
        limits = await asyncio.to_thread(Path(f"/proc/{proc.pid}/limits").read_text)
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    (open_files,) = [line.split()[3:5] for line in limits.splitlines() if "open files" in line]
    assert open_files == [str(hard), str(hard)], limits
    logged = {
        entry["event"]: entry
        for entry in map(json.loads, [*lines, *rest.decode().splitlines()])
        if entry["event"] in ("service.ready", "service.open_files_low")
    }
    assert logged["service.ready"]["open_files_limit"] == hard
    low = logged["service.open_files_low"]
    assert (low["open_files_limit"], low["grpc_max_connections"]) == (hard, hard)
    assert low["http_max_connections"] == 512
    assert "HITL_GRPC_MAX_CONNECTIONS" in low["problem"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets the process's limits")
async def test_a_burst_of_webhook_connections_stays_within_the_open_files_limit(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """HITL_HTTP_MAX_CONNECTIONS closes the connections beyond it, but only
    once they are accepted, and asyncio accepts as many at once as the
    listen backlog lets wait: with uvicorn's 2048, 1,200 connections that
    came while the loop was busy took every descriptor of a 1,000 limit at
    once ("socket.accept() out of system resource"), so gRPC, the store and
    provider calls could open none for a moment in spite of the cap. The
    sidecar listens with a backlog of 128; clients beyond it retry."""
    import resource
    import socket

    limit = 1000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * limit:
        pytest.skip(f"needs a hard limit of {2 * limit} open files, not {hard}")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * limit:
        pytest.skip(f"the test process itself needs {2 * limit} open files")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # serve cannot raise it

    env = {
        **service_env,
        "HITL_LOG_FORMAT": "json",
        "HITL_EVENT_LOOP": "asyncio",  # uvloop's accept leaves no line to look for
        "HITL_GRPC_MAX_CONNECTIONS": "100",
        "HITL_HTTP_MAX_CONNECTIONS": "100",
    }
    proc = await spawn(
        ["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL, preexec_fn=low_limit
    )
    stderr = proc.stderr
    assert stderr is not None
    burst: list[socket.socket] = []
    lines: list[str] = []

    async def read_log() -> None:  # never left to fill the pipe and block the service
        while line := (await stderr.readline()).decode():
            lines.append(line)

    reading: asyncio.Task[None] | None = None
    try:
        lines = await _lines_until_ready(proc)
        ready = json.loads(lines[-1])
        reading = asyncio.create_task(read_log())
        async with asyncio.timeout(60):
            # Stopped, the service accepts nothing: the burst waits in the
            # kernel, as it does behind a loop busy with other work.
            proc.send_signal(signal.SIGSTOP)
            try:
                for _ in range(1200):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    burst.append(sock)
                    sock.setblocking(False)
                    sock.connect_ex(("127.0.0.1", ready["http_port"]))
            finally:
                proc.send_signal(signal.SIGCONT)
            # Answered by the loop that took the burst in first.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await reading
    finally:
        for sock in burst:
            sock.close()
        if reading is not None:
            reading.cancel()
        await reap(proc)
    logged = "".join(lines)
    assert "out of system resource" not in logged
    assert "Too many open files" not in logged
    assert "descriptor limit reached" not in logged.lower()


def test_the_startup_heap_is_frozen_out_of_full_collections() -> None:
    import gc

    from hitl_service.cli import freeze_startup_heap

    survivor = [object()]  # alive at start-up, like the service's modules and servers
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(obj is survivor for obj in gc.get_objects())  # no longer scanned
    finally:
        gc.unfreeze()
    assert any(obj is survivor for obj in gc.get_objects())


def one_line(err: str, start: str) -> str:
    """The one fatal line of ``err``, which starts with ``start``: a plain
    line, or (a ``serve`` that read its settings, in JSON) the
    ``service.start_failed`` object, rendered as the plain line would be."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    for line in err.splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("event") == "service.start_failed":
            lines.append(f"hitl-service: {entry['reason']}: {entry['error']}")
    assert len(lines) == 1, err
    assert lines[0].startswith(start), lines[0]
    return lines[0]


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_a_serve_that_cannot_start_says_so_in_its_log_format(
    service_env: dict[str, str], tmp_path: Path, log_format: str
) -> None:
    # The database's folder is a file: the store cannot be opened.
    (tmp_path / "taken").write_text("")
    env = {
        **service_env,
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/taken/hitl.db",
        "HITL_LOG_FORMAT": log_format,
    }
    code, out, err = await run(["serve"], env, tmp_path)
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if log_format == "console":
        assert [line for line in lines if line.startswith("hitl-service: cannot start: ")]
        return
    # A log shipper reads JSON lines only: the last words are one too.
    logged = [json.loads(line) for line in lines]
    failed = [entry for entry in logged if entry["event"] == "service.start_failed"]
    assert len(failed) == 1
    assert failed[0]["reason"] == "cannot start"
    assert failed[0]["exit_code"] == 1
    assert failed[0]["level"] == "error"
    assert failed[0]["error"]


@pytest.fixture
def broken_providers(tmp_path: Path) -> dict[str, str]:
    """Two installed third-party providers: one fails to import, one's factory raises."""
    site = install_providers(
        tmp_path / "site",
        "broken-hitl",
        {"unimportable": "broken_hitl_missing:create", "exploding": "broken_hitl_exploding:create"},
    )
    (site / "broken_hitl_exploding.py").write_text(
        "def create(deps):\n    raise RuntimeError('no ACME_URL in the environment')\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("name", ["unimportable", "exploding"])
async def test_a_broken_third_party_provider_is_one_line(
    service_env: dict[str, str], tmp_path: Path, broken_providers: dict[str, str], name: str
) -> None:
    env = {**service_env, **broken_providers, "HITL_PROVIDER": name}
    code, _, err = await run(["serve"], env, tmp_path)
    assert code == 2
    line = one_line(err, "hitl-service: configuration error: HITL_PROVIDER")
    assert repr(name) in line
    code, out, err = await run(["check"], env, tmp_path)
    assert code == 2
    assert "Traceback" not in out + err
    assert f"provider {name}: PROBLEM: HITL_PROVIDER" in out
    code, _, err = await run([name, "list"], service_env | broken_providers, tmp_path)
    assert code == 2
    assert repr(name) in one_line(err, "hitl-service: configuration error: HITL_PROVIDER")


@pytest.mark.parametrize("kind", ["not an object", "a directory", "in a file", "data dir"])
async def test_an_unusable_state_file_is_one_line(
    service_env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    # "in a file": its folder cannot be made. The service used to serve and
    # fail every handoff (the file could never be written) instead. "data
    # dir": the same, the file being HITL_DATA_DIR's default one, whose
    # error named HITL_LOCAL_STATE_FILE, a setting the user never set.
    state = tmp_path / "state"
    setting = "HITL_LOCAL_STATE_FILE"
    if kind == "a directory":
        state.mkdir()
    elif kind in ("in a file", "data dir"):
        (tmp_path / "taken").write_text("[]")
        state = tmp_path / "taken" / "state.json"
    else:
        state.write_text("[]")
    env = {**service_env, "HITL_LOCAL_STATE_FILE": str(state)}
    if kind == "data dir":
        del env["HITL_LOCAL_STATE_FILE"]
        env["HITL_DATA_DIR"] = str(state.parent)
        setting = "HITL_DATA_DIR"
    code, out, err = await run(["check"], env, tmp_path)
    assert code == 2
    assert "Traceback" not in out + err
    assert f"provider local: PROBLEM: {setting}" in out
    code, _, err = await run(["local", "list"], env, tmp_path)
    assert code == 2
    one_line(err, f"hitl-service: configuration error: {setting}")
    code, _, err = await run(["serve"], env, tmp_path)
    assert code == 2
    one_line(err, f"hitl-service: configuration error: {setting}")
    # Left for a person to look at.
    taken = kind in ("in a file", "data dir")
    assert state.is_dir() or (state.parent if taken else state).read_text() == "[]"


async def demo_started(app: App, tmp_path: Path) -> asyncio.subprocess.Process:
    """``hitl-service demo`` against ``app``, once it printed that its
    handoff started (stdin, stdout and stderr piped)."""
    proc = await asyncio.create_subprocess_exec(
        *HITL,
        "demo",
        "--target",
        f"127.0.0.1:{app.grpc_port}",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if b"started" not in first:
        proc.kill()
        await proc.wait()
        raise AssertionError(first)
    return proc


async def test_demo_ctrl_d_after_the_server_went_away(app: App, tmp_path: Path) -> None:
    proc = await demo_started(app, tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        await app.stop(grace=0)
        proc.stdin.close()  # Ctrl-D
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    assert "Traceback" not in err.decode(), err.decode()
    assert "could not end the handoff: UNAVAILABLE" in out.decode()
    assert proc.returncode == 1


async def test_demo_ctrl_c_exits_at_once_leaving_the_handoff_open(
    app: App, stub: pb_grpc.HitlServiceAsyncStub, tmp_path: Path
) -> None:
    """Ctrl-C while the demo waits for a line: it hung until Enter or Ctrl-D
    (asyncio's shutdown waited for the thread blocked reading the
    terminal), a second Ctrl-C printed two tracebacks, and only a third let
    it exit."""
    proc = await demo_started(app, tmp_path)
    assert proc.stdin is not None  # left open: the terminal, nothing typed
    try:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    assert proc.returncode == 130
    assert "Traceback" not in err.decode(), err.decode()
    assert "stays open" in err.decode()
    listed = await stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT)
    assert [s.state for s in listed.sessions] == [pb.SESSION_STATE_QUEUED]


async def test_the_demo_prints_what_the_agent_writes_without_its_control_characters(
    app: App, tmp_path: Path
) -> None:
    """Whoever reaches the console acts as an agent: escape sequences in a
    reply (set the window title, write the clipboard, rewrite earlier
    lines) must reach the demo's terminal as text, not drive it."""
    proc = await demo_started(app, tmp_path)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            (conv,) = (await http.get("/console/api/state")).json()["conversations"]
            path = f"/console/api/conversations/{conv['id']}"
            assert (await http.post(f"{path}/take", json={"agent": "Al"})).status_code == 200
            text = "\x1b]52;c;b3duZWQ=\x07hi\r\x9b2J\nsecond line"
            reply = await http.post(f"{path}/reply", json={"agent": "Al", "text": text})
            assert reply.status_code == 200
        printed = b""
        while b"second line" not in printed:
            printed += await asyncio.wait_for(proc.stdout.readline(), 30)
        proc.stdin.close()  # Ctrl-D: ends the handoff
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    shown = printed.decode()
    assert "Al: \\x1b]52;c;b3duZWQ=\\x07hi\\x0d\\x9b2J\nsecond line" in shown, shown
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", shown), shown


async def test_the_demo_exits_when_the_agent_ends_the_handoff(app: App, tmp_path: Path) -> None:
    """The agent closing the chat ends the demo, nothing typed: it printed
    "handoff ended" and then hung until Enter (the same wait on the thread
    reading the terminal)."""
    proc = await demo_started(app, tmp_path)
    assert proc.stdin is not None  # left open: the terminal, nothing typed
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            (conv,) = (await http.get("/console/api/state")).json()["conversations"]
            path = f"/console/api/conversations/{conv['id']}"
            for action in ("take", "end"):
                answer = await http.post(f"{path}/{action}", json={"agent": "Al"})
                assert answer.status_code == 200
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    assert proc.returncode == 0, err.decode()
    assert "handoff ended" in out.decode()


async def test_a_second_process_on_one_sqlite_file_stops_at_start(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """SQLite means one process. A second `serve` on the same file used to
    start and serve beside the first: each kept its own log head, so a
    client resuming on one with a cursor the other had sent was refused
    (INVALID_ARGUMENT, ahead of the log)."""
    first = await spawn(["serve"], service_env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
    assert first.stderr is not None
    second: asyncio.subprocess.Process | None = None
    try:
        async with asyncio.timeout(30):
            while b"service.ready" not in await first.stderr.readline():
                assert first.returncode is None, "the first service exited"
        env = {**service_env, "HITL_DATA_DIR": str(tmp_path / "other")}
        second = await spawn(["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
        try:
            _, err = await asyncio.wait_for(second.communicate(), 20)
        except TimeoutError:
            pytest.fail("a second process serves on the same SQLite file")
        assert second.returncode == 1
        assert "in use by another process" in one_line(err.decode(), "hitl-service: cannot start:")
        # `check` still reads the file a service is running on.
        code, out, _ = await run(["check"], service_env, tmp_path)
        assert code == 0, out
    finally:
        for proc in (second, first):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.postgres
async def test_sigterm_stops_a_start_that_waits_for_a_migration(
    service_env: dict[str, str], tmp_path: Path, postgres_dsn: str
) -> None:
    """A start waits for the migration lock as long as another replica
    holds it; SIGTERM (or Ctrl-C) meanwhile used to be ignored until the lock
    came free, and then the process even reported service.ready before
    stopping."""
    import asyncpg

    from hitl_service.store.postgres import _MIGRATION_LOCK

    holder = await asyncpg.connect(postgres_dsn)
    proc: asyncio.subprocess.Process | None = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        env = {**service_env, "HITL_STORE_URL": postgres_dsn}
        proc = await spawn(["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
        await wait_for(
            lambda: holder.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)"
            ),
            what="the start to wait for the migration lock",
        )
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:
            pytest.fail("SIGTERM did not stop a start waiting for the migration lock")
        text = err.decode()
        assert proc.returncode == 0, text
        assert "service.ready" not in text
        assert "Traceback" not in text
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await holder.close()


async def test_an_unreadable_dotenv_exits_with_one_line(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """A .env that cannot be read (not UTF-8 here; a file mode the service
    user may not read fails the same way) stopped every command with a
    traceback."""
    (tmp_path / ".env").write_bytes(b"HITL_LOG_LEVEL=info\nHITL_PROVIDER=\xfflocal\n")
    for command in ("serve", "check"):
        code, out, err = await run([command], service_env, tmp_path)
        assert code == 2, out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert ".env: cannot be read" in lines[0]
        assert "Traceback" not in err
    with pytest.raises(ConfigError, match="cannot be read"):
        load_environment(tmp_path / ".env")


async def test_in_json_a_start_stopped_by_sigterm_writes_only_json_lines(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """A database that accepts the connection and never answers holds the
    start; SIGTERM meanwhile stops it, and in JSON log format the line that
    says so is a JSON object like every other (a log shipper reads them)."""
    accepted = asyncio.Event()
    peers: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {
        **service_env,
        "HITL_STORE_URL": f"postgresql://hitl:secret@127.0.0.1:{port}/hitl",
        "HITL_LOG_FORMAT": "json",
    }
    proc = await spawn(["serve"], env, tmp_path, stdout=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(accepted.wait(), 30)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        await reap(proc)
        for peer in peers:
            peer.close()
        server.close()
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in err.decode().splitlines() if line.strip()]
    assert "service.stopped_before_serving" in events
    assert "service.ready" not in events


async def test_version_prints_the_installed_distribution_s(tmp_path: Path) -> None:
    from importlib import metadata

    code, out, err = await run(["--version"], {}, tmp_path)
    assert (code, err) == (0, "")
    assert out.strip() == f"hitl-service {metadata.version('hitl-service')}"


def test_ctrl_c_in_check_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Ctrl-C while ``check`` (or a provider command) waits on a slow store or
    provider: one line and the shell's status for SIGINT, not a traceback."""
    from hitl_service import cli

    async def interrupted(*_: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_check", interrupted)
    monkeypatch.setenv("HITL_STORE_URL", f"sqlite:///{tmp_path}/hitl.db")
    monkeypatch.setenv("HITL_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["check"]) == 130
    assert capsys.readouterr().err == "hitl-service: interrupted\n"


async def test_the_demo_says_why_a_field_was_refused(app: App, tmp_path: Path) -> None:
    """The status message names the refused fields only; the reasons are in
    its BadRequest detail, which the demo did not print."""
    target = ["--target", f"127.0.0.1:{app.grpc_port}", "--exit-after-send"]
    code, out, err = await run(
        ["demo", *target, "--group", "bad group"], dict(os.environ), tmp_path
    )
    assert code == 1, err
    assert "Traceback" not in err, err
    assert "group_id: must be 1-64 characters" in out, out


async def test_the_demo_whose_reader_left_exits_without_a_traceback(
    app: App, tmp_path: Path
) -> None:
    """``hitl-service demo | head -1``: the next line written met a closed
    pipe and the demo ended with a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        *HITL,
        "demo",
        "--target",
        f"127.0.0.1:{app.grpc_port}",
        "--message",
        "hello",
        "--exit-after-send",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            first = await asyncio.to_thread(reader.readline)  # like head -1
        assert b"started" in first, first
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    assert "Traceback" not in err.decode(), err.decode()
    assert proc.returncode == 1
