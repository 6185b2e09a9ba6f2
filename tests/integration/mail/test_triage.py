"""Triage runs against a real Dovecot: the mail tools act on the mailbox within their allowlists; results go by mail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.fakes.mailserver import DOMAIN, MailServer, message
from tests.fakes.model import FakeModel, ToolUse
from tests.support.helpers import wait_for
from tests.support.mail_harness import MailDaemon, running

TRIAGE = {"id": "triage", "every": 3600, "prompt": "triage now", "conversation": "api:triage"}


async def ask(daemon: MailDaemon, text: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{daemon.url}/v1/conversations/triage/messages", json={"text": text}) as response,
    ):
        body = dict(await response.json())
        assert response.status == 200, body
        return body


async def run_job(daemon: MailDaemon, job_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{daemon.url}/v1/jobs/{job_id}/run") as response:
        return dict((await response.json())["run"])


async def test_the_mail_tools_flag_draft_and_move_only_where_allowed(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    first = message("Invoice overdue", "Please pay invoice 42 by Friday.")
    second = message("Lunch?", "Pizza at noon?")
    for msg in (first, second):
        await asyncio.to_thread(mail.deliver, msg)
    await wait_for(lambda: _count(mail, 2), 20, "two messages in the agent's inbox")
    fake_model.add("triage now", tool=ToolUse("mcp__mail__mail_list", {"unread_only": True}))
    fake_model.add("read one", tool=ToolUse("mcp__mail__mail_read", {"uid": 1}))
    fake_model.add("flag one", tool=ToolUse("mcp__mail__mail_flag", {"uid": 1}))
    fake_model.add("draft one", tool=ToolUse("mcp__mail__mail_draft", {"uid": 1, "text": "Paid today."}))
    fake_model.add("hide two", tool=ToolUse("mcp__mail__mail_move", {"uid": 2, "folder": "Secret"}))
    fake_model.add("archive two", tool=ToolUse("mcp__mail__mail_move", {"uid": 2, "folder": "Archive"}))
    sections: dict[str, Any] = {"email": {"intake": False}, "schedule": [TRIAGE], "triage": {"folders": ["Archive"]}}
    async with running(tmp_path, fake_model, mail, **sections) as daemon:
        assert (await run_job(daemon, "triage"))["status"] == "ok"
        listing = fake_model.tool_results()
        assert "Invoice overdue" in listing and "Lunch?" in listing and "<untrusted-email-" in listing
        for step in ("read one", "flag one", "draft one", "hide two", "archive two"):
            await ask(daemon, step)
    results = fake_model.tool_results()
    assert "Please pay invoice 42" in results, "mail_read shows the parsed body"
    assert "Refused: moving to 'Secret' is not allowed" in results
    flags = await asyncio.to_thread(mail.flags, "agent")
    assert "\\Flagged" in flags[0] and "\\Seen" not in flags[0], "flagged, and still unread"
    (draft,) = await asyncio.to_thread(mail.mailbox, "agent", "Drafts")
    assert draft["In-Reply-To"] == first["Message-ID"] and draft["Subject"] == "Re: Invoice overdue"
    assert "Paid today." in draft.get_content()
    assert "\\Draft" in (await asyncio.to_thread(mail.flags, "agent", "Drafts"))[0]
    assert [m["Subject"] for m in await asyncio.to_thread(mail.mailbox, "agent", "Archive")] == ["Lunch?"]
    assert await asyncio.to_thread(mail.mailbox, "agent", "Secret") == []
    assert not [m for m in await asyncio.to_thread(mail.mailbox, "alice") if "Re:" in str(m["Subject"])], (
        "nothing was sent: a draft is only saved"
    )
    request = fake_model.find("triage now")[0]
    names = {tool["name"] for tool in request.body["tools"]}
    assert {"mcp__mail__mail_list", "mcp__mail__mail_draft"} <= names


async def test_a_job_result_goes_out_as_a_new_mail_thread(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    fake_model.add("write the digest", text="DIGEST: two invoices, one lunch")
    digest = {
        "id": "digest",
        "every": 1,
        "prompt": "write the digest",
        "profile": "chat",
        "deliver_to": f"email:alice@{DOMAIN}",
    }
    async with running(tmp_path, fake_model, mail, email={"intake": False}, schedule=[digest]):
        await wait_for(lambda: _has_digest(mail), 40, "the digest in alice's inbox")
    sent = next(m for m in await asyncio.to_thread(mail.mailbox, "alice") if "digest" in str(m["Subject"]))
    assert sent["Auto-Submitted"] == "auto-generated" and sent["In-Reply-To"] is None
    assert "DIGEST: two invoices" in sent.get_body(("plain",)).get_content()  # type: ignore[union-attr]


async def test_an_email_conversation_gets_no_mail_tools(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    async with running(tmp_path, fake_model, mail, schedule=[TRIAGE]):
        await asyncio.to_thread(mail.deliver, message("Hello", "Just saying hello."))
        await wait_for(lambda: _found(fake_model, "Just saying hello"), 40, "the mail's turn")
    (request,) = [r for r in fake_model.turn_requests() if "Just saying hello" in r.last_said()]
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    assert json.dumps(request.body).count("mcp__") == 0


async def _count(mail: MailServer, count: int) -> bool:
    return len(await asyncio.to_thread(mail.mailbox, "agent")) >= count


async def _has_digest(mail: MailServer) -> bool:
    return any("digest" in str(m["Subject"]) for m in await asyncio.to_thread(mail.mailbox, "alice"))


async def _found(model: FakeModel, needle: str) -> bool:
    return any(needle in r.last_said() for r in model.turn_requests())
