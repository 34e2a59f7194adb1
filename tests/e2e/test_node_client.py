"""The Node.js example (examples/node) against the real service.

Needs ``node`` and ``npm ci`` run in examples/node; skips loudly without
them, fails instead when HITL_REQUIRE_E2E=1 (CI).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    EXAMPLE_METHODS,
    ROOT,
    need,
    run_handoff_scenario,
    run_through_refusals,
)

NODE_DIR = ROOT / "examples" / "node"

pytestmark = pytest.mark.e2e


def _node() -> str:
    """The ``node`` binary, with the example's dependencies installed."""
    node = shutil.which("node")
    need(node is not None, "node is not installed (apt-get install nodejs npm)")
    assert node is not None
    need(
        (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        "the Node example's dependencies are missing (run: cd examples/node && npm ci)",
    )
    return node


async def test_node_client_follows_a_handoff_across_reconnects(tmp_path: Path) -> None:
    node = _node()
    # The first call of each method is answered CANCELLED, as a replica's
    # gRPC core does under load or when it begins to stop: the client
    # retries the unary calls and reconnects the stream.
    output = await run_handoff_scenario(
        tmp_path,
        [node, str(NODE_DIR / "client.js")],
        cwd=NODE_DIR,
        prints_reconnects=True,
        cancel_first=EXAMPLE_METHODS,
    )
    events = output.events()
    assert [cursor for cursor, _, _ in events] == [1, 2, 3, 4, 5, 6]  # no gap, no repeat
    assert [kind for _, kind, _ in events] == [
        "started",
        "queued",
        "agent_assigned",
        "agent_message",
        "agent_message",
        "ended",
    ]
    assert events[3][2] == "Jane Agent: Hi, Jane here. Let me check."
    assert events[4][2] == "Jane Agent: Found it: it arrives tomorrow."
    assert events[5][2] == "by AGENT (resolved)"
    reconnects = [line for line in output.lines if line.startswith("reconnecting after cursor")]
    assert any("the server ended the stream" in line for line in reconnects)
    assert any("UNAVAILABLE" in line for line in reconnects)
    assert reconnects[0].startswith("reconnecting after cursor 0 (CANCELLED"), reconnects
    assert output.lines[-1] == "handoff over (ended)"


async def test_node_client_rides_out_a_restart_of_several_seconds(tmp_path: Path) -> None:
    """Seven refusals in a row (six UNAVAILABLE, then CANCELLED): the example
    gave up after five attempts, short of a one-process restart."""
    node = _node()
    proxy = await run_through_refusals(
        tmp_path, [node, str(NODE_DIR / "client.js")], cwd=NODE_DIR, refusals=6
    )
    assert len(proxy.unavailable) == 6
    assert proxy.cancelled == ["/hitl.v1.HitlService/CreateUser"]
