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
