"""The fake LiveChat itself: auth rules, limits, knobs, control and process mode."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_livechat import FakeLiveChat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def http(fake: FakeLiveChat) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        yield client


def basic(fake: FakeLiveChat) -> dict[str, str]:
    return {"Authorization": "Basic " + fake.agent_token}


async def customer(
    http: httpx.AsyncClient, fake: FakeLiveChat, cookies: str = ""
) -> tuple[dict[str, Any], httpx.Response]:
    seed = fake.state.seed
    response = await http.post(
        "/v2/customer/token",
        json={
            "grant_type": "cookie",
            "client_id": seed.client_id,
            "response_type": "token",
            "organization_id": seed.organization_id,
            "redirect_uri": seed.redirect_uris[0],
        },
        headers={"Cookie": cookies} if cookies else {},
    )
    return response.json(), response


async def agent(
    http: httpx.AsyncClient, fake: FakeLiveChat, method: str, body: dict[str, Any], **kw: Any
) -> httpx.Response:
    return await http.post(
        f"/v3.6/agent/action/{method}", json=body, headers=kw.pop("headers", basic(fake)), **kw
    )


async def cust(
    http: httpx.AsyncClient,
    fake: FakeLiveChat,
    token: str,
    method: str,
    body: dict[str, Any],
    org: str | None = None,
) -> httpx.Response:
    params = {"organization_id": org if org is not None else fake.state.seed.organization_id}
    return await http.post(
        f"/v3.6/customer/action/{method}",
        json=body,
        params=params,
        headers={"Authorization": f"Bearer {token}"},
    )


async def started_chat(http, fake) -> tuple[str, str, str]:
    grant, _ = await customer(http, fake)
    response = await agent(
        http,
        fake,
        "start_chat",
        {
            "chat": {
                "users": [{"id": grant["entity_id"], "type": "customer"}],
                "access": {"group_ids": [0]},
            },
            "continuous": True,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["chat_id"], grant["access_token"], grant["entity_id"]


class TestAccounts:
    async def test_cookie_grant_is_stable_with_cookies(self, http, fake) -> None:
        first, response = await customer(http, fake)
        assert first["expires_in"] == 28800
        assert first["token_type"] == "Bearer"
        cookies = "; ".join(f"{c.name}={c.value}" for c in response.cookies.jar)
        assert "__lc_cid=" in cookies
        assert "__lc_cst=" in cookies
        again, _ = await customer(http, fake, cookies)
        assert again["entity_id"] == first["entity_id"]
        assert again["access_token"] != first["access_token"]
        # A client that keeps cookies (httpx's default jar does) stays that
        # customer: exactly the leak the provider's cookie-less client avoids.
        assert "__lc_cid" in http.cookies
        http.cookies.clear()
        other, _ = await customer(http, fake)
        assert other["entity_id"] != first["entity_id"]

    async def test_errors_use_the_oauth_format(self, http, fake) -> None:
        response = await http.post(
            "/v2/customer/token", json={"grant_type": "cookie", "client_id": "nope"}
        )
        assert response.status_code == 401
        assert response.json()["oauth_exception"] == "invalid_client"

    async def test_response_type_knob(self, http, fake) -> None:
        seed = fake.state.seed
        body = {
            "grant_type": "cookie",
            "client_id": seed.client_id,
            "organization_id": seed.organization_id,
            "redirect_uri": seed.redirect_uris[0],
        }
        assert (await http.post("/v2/customer/token", json=body)).status_code == 401
        fake.set_config(require_response_type=False)
        assert (await http.post("/v2/customer/token", json=body)).status_code == 200

    async def test_scripted_errors_use_the_oauth_format(self, http, fake) -> None:
        fake.add_fault("customer_token", error_type="invalid_grant", message="Cookies expired")
        _, response = await customer(http, fake)
        assert response.status_code == 401
        assert response.json() == {
            "oauth_exception": "invalid_grant",
            "exception_description": "Cookies expired",
        }

    async def test_agent_token_grant_refuses_a_pat(self, http, fake) -> None:
        seed = fake.state.seed
        body = {"grant_type": "agent_token", "client_id": seed.client_id, "response_type": "token"}
        refused = await http.post(
            "/v2/customer/token", json=body, headers={"Authorization": f"Bearer {seed.bridge_pat}"}
        )
        assert refused.status_code == 401
        oauth = fake.state.issue_agent_token(seed.bridge_email)
        first, _ = await customer(http, fake)
        ok = await http.post(
            "/v2/customer/token",
            json={**body, "entity_id": first["entity_id"]},
            headers={"Authorization": f"Bearer {oauth}"},
        )
        assert ok.json()["entity_id"] == first["entity_id"]
        assert ok.json()["client_id"] == seed.client_id


class TestAuth:
    async def test_pat_as_bearer_fails(self, http, fake) -> None:
        response = await agent(
            http,
            fake,
            "list_chats",
            {},
            headers={"Authorization": f"Bearer {fake.state.seed.bridge_pat}"},
        )
        assert response.status_code == 401
        assert response.json() == {
            "error": {"type": "authentication", "message": "Invalid access token"}
        }

    async def test_tokens_on_the_wrong_api_fail(self, http, fake) -> None:
        grant, _ = await customer(http, fake)
        wrong = await agent(
            http,
            fake,
            "list_chats",
            {},
            headers={"Authorization": f"Bearer {grant['access_token']}"},
        )
        assert wrong.json()["error"]["type"] == "authentication"
        pat_on_customer = await http.post(
            "/v3.6/customer/action/list_chats",
            json={},
            params={"organization_id": fake.state.seed.organization_id},
            headers=basic(fake),
        )
        assert pat_on_customer.json()["error"]["type"] == "authentication"

    async def test_organization_id_is_required_on_the_customer_api(self, http, fake) -> None:
        grant, _ = await customer(http, fake)
        response = await cust(http, fake, grant["access_token"], "list_chats", {}, org="")
        assert response.json()["error"]["type"] == "validation"
        fake.set_config(org_error_type="authorization")
        response = await cust(http, fake, grant["access_token"], "list_chats", {}, org="")
        assert response.json()["error"]["type"] == "authorization"

    async def test_customer_tokens_expire_with_the_clock(self, http, fake) -> None:
        grant, _ = await customer(http, fake)
        assert (await cust(http, fake, grant["access_token"], "list_chats", {})).status_code == 200
        fake.advance_clock(28801)
        assert (await cust(http, fake, grant["access_token"], "list_chats", {})).json()["error"][
            "type"
        ] == "authentication"

    async def test_a_pat_containing_colons_works_with_basic(self, http, fake) -> None:
        assert ":" in fake.state.seed.bridge_pat
        assert (await agent(http, fake, "list_chats", {})).status_code == 200


class TestChatRules:
    async def test_event_ids_timestamps_and_threads(self, http, fake) -> None:
        chat_id, token, _ = await started_chat(http, fake)
        sent = await cust(
            http,
            fake,
            token,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "message", "text": "hi"}},
        )
        event_id = sent.json()["event_id"]
        thread = fake.chat(chat_id).thread
        assert re.fullmatch(rf"{thread.id}_\d+", event_id)
        assert re.fullmatch(r"[A-Z0-9]{10}", chat_id)
        created = thread.events[-1]["created_at"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", created)
        await agent(http, fake, "deactivate_chat", {"id": chat_id})
        resumed = await agent(http, fake, "resume_chat", {"chat": {"id": chat_id}})
        assert resumed.status_code == 200
        chat = fake.chat(chat_id)
        assert [t.active for t in chat.threads] == [False, True]
        again = await agent(http, fake, "resume_chat", {"chat": {"id": chat_id}})
        assert again.json()["error"]["type"] == "validation"

    async def test_agent_send_event_requires_membership(self, http, fake) -> None:
        chat_id, _, _ = await started_chat(http, fake)
        oauth = fake.state.issue_agent_token("joe@acme.example")
        response = await agent(
            http,
            fake,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "message", "text": "hi"}},
            headers={"Authorization": f"Bearer {oauth}"},
        )
        assert response.json()["error"]["type"] == "validation"

    async def test_inactive_chat_and_text_limit(self, http, fake) -> None:
        chat_id, token, _ = await started_chat(http, fake)
        too_long = await cust(
            http,
            fake,
            token,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "message", "text": "x" * 16385}},
        )
        assert too_long.json()["error"]["type"] == "validation"
        await agent(http, fake, "deactivate_chat", {"id": chat_id})
        inactive = await cust(
            http,
            fake,
            token,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "message", "text": "x"}},
        )
        assert inactive.json()["error"]["type"] == "chat_inactive"
        assert inactive.status_code == 400
        attached = await cust(
            http,
            fake,
            token,
            "send_event",
            {
                "chat_id": chat_id,
                "event": {"type": "message", "text": "x"},
                "attach_to_last_thread": True,
            },
        )
        assert attached.status_code == 200

    async def test_deactivate_requires_presence_unless_ignored(self, http, fake) -> None:
        chat_id, _, _ = await started_chat(http, fake)
        fake.chat(chat_id).users[fake.state.seed.bridge_email].present = False
        refused = await agent(http, fake, "deactivate_chat", {"id": chat_id})
        assert refused.json()["error"]["type"] == "validation"
        ok = await agent(
            http, fake, "deactivate_chat", {"id": chat_id, "ignore_requester_presence": True}
        )
        assert ok.status_code == 200
        assert (
            fake.chat(chat_id).thread.events[-1]["system_message_type"] == "manual_archived_agent"
        )

    async def test_transfer_availability(self, http, fake) -> None:
        chat_id, _, _ = await started_chat(http, fake)
        body = {"id": chat_id, "target": {"type": "group", "ids": [0]}}
        refused = await agent(http, fake, "transfer_chat", body)
        assert refused.json()["error"]["message"] == "Cannot assign any agent from requested groups"
        queued = await agent(
            http, fake, "transfer_chat", {**body, "ignore_agents_availability": True}
        )
        assert queued.status_code == 200
        assert fake.chat(chat_id).thread.queue["position"] == 1
        fake.state.agents["jane@acme.example"].accepting = True
        assert (await agent(http, fake, "transfer_chat", body)).status_code == 200
        assert "jane@acme.example" in fake.chat(chat_id).users
        assert fake.chat(chat_id).thread.queue is None

    async def test_uploads(self, http, fake) -> None:
        grant, _ = await customer(http, fake)
        params = {"organization_id": fake.state.seed.organization_id}
        headers = {"Authorization": f"Bearer {grant['access_token']}"}
        ok = await http.post(
            "/v3.6/customer/action/upload_file",
            params=params,
            headers=headers,
            files={"file": ("a.txt", b"hello\r\n--x", "text/plain")},
        )
        url = ok.json()["url"]
        assert (await http.get(url)).content == b"hello\r\n--x"
        fake.set_config(max_upload_bytes=10)
        big = await http.post(
            "/v3.6/customer/action/upload_file",
            params=params,
            headers=headers,
            files={"file": ("a.bin", b"x" * 11, "application/octet-stream")},
        )
        assert big.status_code == 413
        assert big.json()["error"]["type"] == "entity_too_large"

    async def test_unknown_methods_and_status_map(self, http, fake) -> None:
        response = await agent(http, fake, "close_chat", {"chat_id": "X"})
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found"
        groups = await http.post(
            "/v3.6/configuration/action/get_groups", json={}, headers=basic(fake)
        )
        assert groups.status_code == 404
        fake.set_config(unknown_method_error="validation", status_map={"validation": 422})
        assert (await agent(http, fake, "close_chat", {})).status_code == 422

    async def test_a_refused_resume_leaves_the_chat_as_it_was(self, http, fake) -> None:
        chat_id, _, _ = await started_chat(http, fake)
        await agent(http, fake, "deactivate_chat", {"id": chat_id})
        threads = [t.id for t in fake.chat(chat_id).threads]
        refused = await agent(
            http,
            fake,
            "resume_chat",
            {
                "chat": {
                    "id": chat_id,
                    "thread": {"events": [{"type": "message", "text": "x" * 16385}]},
                }
            },
        )
        assert refused.json()["error"]["type"] == "validation"
        chat = fake.chat(chat_id)
        assert [t.id for t in chat.threads] == threads  # no half-opened thread
        assert not chat.active
        assert chat.thread.next_thread_id is None

    async def test_an_uploaded_url_expires_after_a_day_unless_sent(self, http, fake) -> None:
        chat_id, token, _ = await started_chat(http, fake)
        params = {"organization_id": fake.state.seed.organization_id}
        headers = {"Authorization": f"Bearer {token}"}

        async def upload(name: str) -> str:
            answer = await http.post(
                "/v3.6/customer/action/upload_file",
                params=params,
                headers=headers,
                files={"file": (name, b"bytes", "text/plain")},
            )
            return str(answer.json()["url"])

        sent, unsent = await upload("sent.txt"), await upload("unsent.txt")
        ok = await cust(
            http,
            fake,
            token,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "file", "url": sent}},
        )
        assert ok.status_code == 200
        fake.advance_clock(24 * 3600 + 1)
        token = (await customer(http, fake))[0]["access_token"]  # the old one expired too
        assert (await http.get(sent)).status_code == 200  # used in an event: kept
        assert (await http.get(unsent)).status_code == 404
        late = await cust(
            http,
            fake,
            token,
            "send_event",
            {"chat_id": chat_id, "event": {"type": "file", "url": unsent}},
        )
        assert late.json()["error"]["type"] in ("validation", "not_found")

    @pytest.mark.parametrize(
        "button",
        [
            {"type": "postback", "text": "A", "value": "a"},
            {"type": "message", "value": "a"},
            "A",
        ],
    )
    async def test_rich_message_buttons_are_checked(self, http, fake, button: Any) -> None:
        chat_id, token, _ = await started_chat(http, fake)
        event = {
            "type": "rich_message",
            "template_id": "cards",
            "elements": [{"buttons": [button]}],
        }
        refused = await cust(http, fake, token, "send_event", {"chat_id": chat_id, "event": event})
        assert refused.json()["error"]["type"] == "validation"

    async def test_v3_5_answers_carry_legacy(self, http, fake) -> None:
        response = await http.post("/v3.5/agent/action/list_chats", json={}, headers=basic(fake))
        assert response.headers["legacy"] == "2026-12-31"
        assert response.headers["x-debug-id"]

    async def test_malformed_json_is_invalid_message(self, http, fake) -> None:
        response = await http.post(
            "/v3.6/agent/action/list_chats", content=b"{", headers=basic(fake)
        )
        assert response.json()["error"] == {"type": "validation", "message": "Invalid message"}


class TestWebhooks:
    async def test_limit_of_three_per_action(self, http, fake) -> None:
        body = {
            "action": "chat_deactivated",
            "secret_key": "s",
            "url": "https://x.example",
            "owner_client_id": fake.state.seed.client_id,
            "type": "license",
        }
        for _ in range(3):
            assert (
                await http.post(
                    "/v3.6/configuration/action/register_webhook", json=body, headers=basic(fake)
                )
            ).status_code == 200
        fourth = await http.post(
            "/v3.6/configuration/action/register_webhook", json=body, headers=basic(fake)
        )
        assert fourth.json()["error"]["type"] == "limit_reached"

    async def test_envelope_filters_retries_and_drops(self, fake) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        from tests.fake_livechat import ServedApp

        got: list[dict[str, Any]] = []
        answers = [500, 200]

        async def hook(request: Request) -> Response:
            got.append(await request.json())
            return Response(status_code=answers.pop(0) if answers else 200)

        served = ServedApp(Starlette(routes=[Route("/h", hook, methods=["POST"])]))
        await served.start()
        try:
            for action, filters in (
                ("incoming_event", {"author_type": "agent"}),
                ("chat_deactivated", {}),
            ):
                fake.state.register_webhook(
                    {
                        "action": action,
                        "secret_key": "s3cret",
                        "url": served.url + "/h",
                        "owner_client_id": fake.state.seed.client_id,
                        "type": "license",
                        "filters": filters,
                    }
                )
            async with httpx.AsyncClient(base_url=fake.url) as http:
                chat_id, token, _ = await started_chat(http, fake)
                await cust(
                    http,
                    fake,
                    token,
                    "send_event",
                    {"chat_id": chat_id, "event": {"type": "message", "text": "by customer"}},
                )
                fake.agent_join(chat_id)
                fake.agent_message(chat_id, text="by agent")
                fake.delivery.drop_next = 1
                fake.agent_message(chat_id, text="dropped")
                fake.agent_close(chat_id)
            await fake.delivery.idle()
        finally:
            await fake.delivery.stop()
            await served.stop()
        actions = [(g["action"], g["payload"].get("event", {}).get("text")) for g in got]
        assert actions == [
            ("incoming_event", "by agent"),  # 500, retried
            ("incoming_event", "by agent"),
            ("chat_deactivated", None),
        ]
        envelope = got[0]
        assert set(envelope) == {
            "webhook_id",
            "secret_key",
            "action",
            "organization_id",
            "payload",
            "additional_data",
        }
        assert envelope["additional_data"] == {}
        assert envelope["secret_key"] == "s3cret"
        assert [d.outcome for d in fake.delivery.deliveries] == [
            "delivered",
            "dropped",
            "delivered",
        ]
        assert fake.delivery.deliveries[0].attempts == ["500", "200"]

    async def test_chaos_drops_doubles_and_reorders_deliveries(self, fake) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        from tests.fake_livechat import ServedApp

        got: list[str] = []

        async def hook(request: Request) -> Response:
            got.append((await request.json())["payload"]["event"]["text"])
            return Response(status_code=200)

        served = ServedApp(Starlette(routes=[Route("/h", hook, methods=["POST"])]))
        await served.start()
        try:
            fake.state.register_webhook(
                {
                    "action": "incoming_event",
                    "secret_key": "s3cret",
                    "url": served.url + "/h",
                    "owner_client_id": fake.state.seed.client_id,
                    "type": "license",
                    "filters": {"author_type": "agent"},
                }
            )
            async with httpx.AsyncClient(base_url=fake.url) as http:
                chat_id, _, _ = await started_chat(http, fake)
            fake.agent_join(chat_id)
            texts = [f"m{n}" for n in range(40)]
            fake.webhook_chaos(drop=0.2, duplicate=0.3, max_delay=0.2, seed=5)
            for text in texts:
                fake.agent_message(chat_id, text=text)
            await fake.delivery.idle()
            fake.webhook_chaos()  # off: in order again
            fake.agent_message(chat_id, text="after")
            await fake.delivery.idle()
        finally:
            await fake.delivery.stop()
            await served.stop()
        chaotic = [d for d in fake.delivery.deliveries if d.action == "incoming_event"][:-1]
        sent = [d.envelope["payload"]["event"]["text"] for d in chaotic if d.outcome == "delivered"]
        assert sorted(got[:-1]) == sorted(sent)
        assert any(d.outcome == "dropped" for d in chaotic)
        assert any(d.copy == 1 for d in chaotic)
        assert len(set(sent)) < len(sent)  # some twice
        assert got[:-1] != sorted(got[:-1], key=texts.index)  # some overtaken
        assert got[-1] == "after"


class TestControl:
    async def test_http_control_endpoints(self, http, fake) -> None:
        chat_id, _, _ = await started_chat(http, fake)
        assert (
            await http.post("/_control/agent_join", json={"chat_id": chat_id})
        ).status_code == 200
        reply = await http.post("/_control/agent_message", json={"chat_id": chat_id, "text": "hi"})
        assert reply.json()["result"]["text"] == "hi"
        await http.post(
            "/_control/add_fault", json={"method": "list_chats", "error_type": "internal"}
        )
        assert (await agent(http, fake, "list_chats", {})).status_code == 500
        await http.post("/_control/router_close", json={"chat_id": chat_id})
        snapshot = (await http.get(f"/_control/chats/{chat_id}")).json()
        assert snapshot["thread"]["active"] is False
        calls = (await http.get("/_control/calls", params={"method": "list_chats"})).json()
        assert calls[0]["error_type"] == "internal"
        assert (await http.post("/_control/nope", json={})).status_code == 404
        assert (
            await http.post("/_control/agent_close", json={"chat_id": chat_id})
        ).status_code == 400


async def test_standalone_process(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fake_livechat",
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            line = await process.stdout.readline()
        info = json.loads(line)
        assert info["env"]["HITL_LIVECHAT_API_URL"] == info["url"]
        token = info["env"]["HITL_LIVECHAT_AGENT_TOKEN"]
        assert ":" in base64.b64decode(token).decode()
        async with httpx.AsyncClient(base_url=info["url"]) as http:
            response = await http.post(
                "/v3.6/agent/action/list_chats",
                json={},
                headers={"Authorization": "Basic " + token},
            )
            assert response.status_code == 200
    finally:
        process.terminate()
        async with asyncio.timeout(20):
            await process.wait()
    assert process.returncode == 0
