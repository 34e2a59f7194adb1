"""The LiveChat alert of docs/operations.md against the real flow:
HitlWebhooksMissing must stay quiet for a healthy registration, including a
handoff nobody answers, and fire once the webhooks are gone."""

from __future__ import annotations

import contextlib

import grpc
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.alert_rules import Scrape, alert_rules, increase, increased, scrape, selectors, total
from tests.integration.conftest import JANE, MakeService, Out
from tests.support import TIMEOUT, wait_for


async def test_webhooks_missing_fires_on_unanswered_starts_not_on_quiet_handoffs(
    make_service: MakeService,
) -> None:
    """The rule is ``done > 0 unless on() webhooks > 0`` over one window:
    LiveChat answers a chat we start or close with a webhook, so only a
    broken registration leaves them unanswered. Sends are no such signal
    (the end user's messages are not echoed), nor is an open handoff."""
    expr = alert_rules()["HitlWebhooksMissing"]
    assert " unless on() " in expr, expr
    done, webhooks = selectors(expr)
    lc = await make_service()

    async def metrics() -> Scrape:
        return scrape((await lc.http.get("/metrics")).text)

    async def increases(before: Scrape) -> tuple[float, float]:
        """(done, webhooks) over the window since ``before``."""
        await lc.delivered()  # the webhooks LiveChat fired are answered
        after = await metrics()
        return (
            total(after, done) - total(before, done),
            total(after, webhooks) - total(before, webhooks),
        )

    async def fires(before: Scrape) -> bool:
        """Whether the rule holds over the window since ``before``."""
        more_done, more_webhooks = await increases(before)
        return more_done > 0 and not more_webhooks > 0

    window = await metrics()
    session = await lc.start()
    assert not await fires(window), "a start LiveChat answered"

    # A handoff nobody answers: the end user writes, no agent replies.
    window = await metrics()
    for text in ("hello?", "anyone there?"):
        await lc.send(session.id, text)
    # Counted once settled, which the answer does not wait for.
    await wait_for(
        lambda: (
            lc.app.metrics.registry.get_sample_value(
                "hitl_outbox_attempts_total", {"kind": "send", "outcome": "done"}
            )
            == 2
        ),
        what="both sends counted",
    )
    # No webhook at all, with a handoff open: what the earlier rule
    # ("open handoffs, no webhook for 30 minutes") paged on.
    assert (await increases(window))[1] == 0
    assert not await fires(window), "a quiet handoff"

    window = await metrics()
    await lc.stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
    assert not await fires(window), "a stop LiveChat answered"

    # The registration is gone: the next start gets no webhook.
    out = Out()
    assert await lc.provider.run_command(["unregister-webhooks"], out) == 0, out.getvalue()
    await wait_for(lambda: not lc.fake.state.webhooks, what="no webhook registered")
    window = await metrics()
    await lc.start()
    assert await fires(window), "a start with no webhook registered"


async def test_the_first_lost_webhook_and_the_first_failed_delivery_of_a_process_fire(
    make_service: MakeService,
) -> None:
    """HitlWebhooksLost and HitlOutboxDeliveriesFailed take the
    ``increase()`` of counters. Prometheus cannot count the value a series
    appears with, so a counter exported only at its first count hides the
    first incident of each process: here a webhook secret rotated on
    LiveChat's side only (every webhook refused, one agent message caught up)
    and a message LiveChat refuses, each the first since the start."""
    rules = alert_rules()
    (lost,) = increased(rules["HitlWebhooksLost"])
    (failed,) = increased(rules["HitlOutboxDeliveriesFailed"])
    lc = await make_service(HITL_RECONCILE_INTERVAL="1s")
    session = await lc.start()
    chat_id = session.external_chat_id
    lc.fake.agent_join(chat_id, JANE[0])
    await lc.delivered()

    async def metrics() -> Scrape:
        return scrape((await lc.http.get("/metrics")).text)

    window = await metrics()
    # LiveChat's stored secret no longer matches ours: every webhook is 401.
    for hook in lc.fake.state.webhooks.values():
        hook.secret_key = "whsec-rotated-on-livechat-only"
    lc.fake.agent_message(chat_id, JANE[0], text="sent while webhooks are refused")
    await lc.delivered()

    def recovered() -> bool:
        value = lc.app.metrics.registry.get_sample_value(
            "hitl_catch_up_events_total", {"provider": "livechat"}
        )
        return value is not None and value >= 1

    await wait_for(recovered, what="the agent's message caught up")
    lc.fake.add_fault("send_event", api="customer", error_type="validation")
    with contextlib.suppress(grpc.aio.AioRpcError):
        await lc.send(session.id, "refused by LiveChat")

    def delivery_failed() -> bool:
        value = lc.app.metrics.registry.get_sample_value(
            "hitl_outbox_attempts_total", {"kind": "send", "outcome": "failed"}
        )
        return value is not None and value >= 1

    await wait_for(delivery_failed, what="the refused send failed for good")
    after = await metrics()
    assert increase(window, after, lost) >= 1, "HitlWebhooksLost would not fire"
    assert increase(window, after, failed) >= 1, "HitlOutboxDeliveriesFailed would not fire"


async def test_a_rejected_webhook_is_logged_with_why(make_service: MakeService) -> None:
    """HitlWebhooksRejected says "wrong secret (rotation?) or a payload
    change", and LiveChat's troubleshooting starts from "webhooks answered
    401": the webhook.done line of each refused delivery says which, as only
    LiveChat sees the answer."""
    lc = await make_service()
    session = await lc.start()
    for hook in lc.fake.state.webhooks.values():
        hook.secret_key = "whsec-rotated-on-livechat-only"
    with capture_logs(processors=[merge_contextvars]) as logs:
        lc.fake.agent_join(session.external_chat_id, JANE[0])
        await lc.delivered()
        answer = await lc.http.post("/webhooks/livechat", content=b"[]")
    assert answer.status_code == 400
    rejected = [
        (line.get("status"), line.get("rejected"))
        for line in logs
        if line["event"] == "webhook.done" and line["outcome"] == "rejected"
    ]
    assert rejected[0] == (401, "secret_key is missing or wrong"), rejected
    assert rejected[-1] == (400, "the body is not a JSON object"), rejected
    assert lc.fake.state.webhooks  # LiveChat still has them: the secret differs
    assert all("whsec" not in str(line) for line in logs)
