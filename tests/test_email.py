"""The email channel end to end: real Dovecot (IMAP IDLE, LMTP) and SMTP hop -> daemon -> real CLI -> reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.mailserver import DOMAIN, MailServer, message
from tests.fakes.model import FakeModel
from tests.mail_harness import AGENT, running, wait_replies


@pytest.fixture
def mail() -> Iterator[MailServer]:
    server = MailServer()
    server.start()
    yield server
    server.stop()


async def test_mail_gets_a_threaded_reply(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    fake_model.add("printer", text="Try **turning it off** and on again.")
    async with running(tmp_path, fake_model, mail) as daemon:
        sent = message("Re: RE: printer broken", "The printer on floor 3 is broken.")
        mail.deliver(sent)
        [reply] = await wait_replies(mail, 1)
        outcome = await daemon.outcome(str(sent["Message-ID"]))
    assert outcome["status"] == "replied"
    assert reply["In-Reply-To"] == sent["Message-ID"]
    assert reply["References"] == sent["Message-ID"]
    assert reply["Subject"] == "Re: printer broken"
    assert str(reply["Message-ID"]).endswith(f"@{DOMAIN}>")
    assert reply["Auto-Submitted"] == "auto-replied" and reply["X-Auto-Response-Suppress"] == "All"
    assert reply["X-Agentd-Loop"] == AGENT
    text = reply.get_body(("plain",)).get_content()
    html = reply.get_body(("html",)).get_content()
    assert "Try **turning it off** and on again." in text and "<strong>turning it off</strong>" in html
    said = fake_model.find("printer on floor 3")[0].last_said()
    assert "<untrusted-email>" in said and "From: alice@example.test" in said
    assert any("$AgentdDone" in f for f in mail.flags()), "the inbound message is marked"


async def test_reply_to_the_reply_continues_the_session(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    async with running(tmp_path, fake_model, mail) as daemon:
        first = message("budget", "Remember the number 4711.")
        mail.deliver(first)
        [reply] = await wait_replies(mail, 1)
        answer = message("Re: budget", "Which number was it?", In_Reply_To=str(reply["Message-ID"]))
        answer["References"] = f"{first['Message-ID']} {reply['Message-ID']}"
        mail.deliver(answer)
        await wait_replies(mail, 2)
        outcomes = [await daemon.outcome(str(m["Message-ID"])) for m in (first, answer)]
    assert outcomes[0]["conversation"] == outcomes[1]["conversation"]
    request = fake_model.find("Which number was it?")[-1]
    assert "Remember the number 4711." in request.all_text(), "the thread's history reaches the model"


async def test_reply_without_references_still_finds_its_thread(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    async with running(tmp_path, fake_model, mail) as daemon:
        first = message("lunch", "Remember: pizza.")
        mail.deliver(first)
        [reply] = await wait_replies(mail, 1)
        answer = message("Re: lunch", "What food?", In_Reply_To=str(reply["Message-ID"]))
        mail.deliver(answer)
        await wait_replies(mail, 2)
        assert (await daemon.outcome(str(answer["Message-ID"])))["conversation"] == f"email:{first['Message-ID']}"
    assert "Remember: pizza." in fake_model.find("What food?")[-1].all_text()


async def test_forwarded_mail_shows_the_original_in_both_forms(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    original = message("Invoice 99", "Please pay 300 EUR by Friday.", sender="bob@vendor.test")
    attached = message("Fwd: Invoice 99", "Can you check this one?")
    attached.add_attachment(original)
    inline_body = (
        "Is this legit?\n\n---------- Forwarded message ---------\n"
        "From: Carol <carol@bank.test>\nDate: Mon, 2 Nov 2026 09:00:00 +0000\nSubject: Verify your account\n"
        "To: alice@example.test\n\nClick here to verify your account."
    )
    inline = message("Fwd: Verify your account", inline_body)
    async with running(tmp_path, fake_model, mail):
        mail.deliver(attached)
        mail.deliver(inline)
        await wait_replies(mail, 2)
    first = fake_model.find("Can you check this one?")[0].last_said()
    assert "Original sender: bob@vendor.test" in first and "Original subject: Invoice 99" in first
    assert "Please pay 300 EUR by Friday." in first
    assert first.index("Can you check this one?") < first.index("Forwarded message 1")
    second = fake_model.find("Is this legit?")[0].last_said()
    assert "Original sender: Carol <carol@bank.test>" in second and "Original subject: Verify your account" in second
    assert "Original date: Mon, 2 Nov 2026 09:00:00 +0000" in second
    note, forwarded = second.split("---- Forwarded message 1")
    assert "Click here" in forwarded and "Click here" not in note


async def test_mailbox_mode_is_one_conversation(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    async with running(tmp_path, fake_model, mail, email={"conversation": "mailbox"}) as daemon:
        first, second = message("one", "Remember: blue."), message("two", "Which colour?", sender="bob@example.test")
        mail.deliver(first)
        await daemon.outcome(str(first["Message-ID"]))
        mail.deliver(second)
        outcome = await daemon.outcome(str(second["Message-ID"]))
    assert outcome["conversation"] == "email:mailbox:INBOX"
    assert "Remember: blue." in fake_model.find("Which colour?")[-1].all_text()
