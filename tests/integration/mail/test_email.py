"""The email channel end to end: real Dovecot (IMAP IDLE, LMTP) and SMTP hop -> daemon -> real CLI -> reply."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.mailserver import DOMAIN, PASSWORD, MailServer, message
from tests.fakes.model import FakeModel
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until
from tests.support.mail_harness import AGENT, MailDaemon, email_toml, read_outcome, replies, running, wait_replies


async def test_mail_gets_a_threaded_reply(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    fake_model.add("printer", text="Try **turning it off** and on again.")
    async with running(tmp_path, fake_model, mail) as daemon:
        sent = message("Re: RE: printer broken", "The printer on floor 3 is broken.")
        mail.deliver(sent)
        [reply] = await wait_replies(mail, 1)
        outcome = await daemon.outcome(str(sent["Message-ID"]))
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/metrics") as response:
            metrics = await response.text()
    assert 'agentd_channel_connected{channel="email"} 1.0' in metrics
    assert 'agentd_channel_messages_total{channel="email",fate="replied"}' in metrics
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
    assert re.search(r"\n<untrusted-email-[0-9a-f]{16}>\nFrom: alice@example.test\n", said)
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


def dsn() -> bytes:
    return (
        b"From: MAILER-DAEMON@example.test\r\nTo: agent@example.test\r\nSubject: Undelivered Mail\r\n"
        b"Message-ID: <dsn-1@example.test>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        b"--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; example.test\r\n\r\n"
        b"Final-Recipient: rfc822; nobody@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b1--\r\n"
    )


async def test_machine_mail_is_recorded_and_marked_but_never_answered(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    auto = message("Out of office", "I am away.", Auto_Submitted="auto-replied")
    own = message("echo", "From myself.", sender=AGENT)
    listed = message("[list] news", "Weekly digest.", List_Id="<news.example.test>")
    bulk = message("offer", "Buy now.", Precedence="bulk")
    looped = message("Re: x", "Our own reply came back.", X_Agentd_Loop=AGENT)
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(dsn(), sender="")  # a bounce: MAIL FROM:<> becomes Return-Path: <>
        for sent in (auto, own, listed, bulk, looped):
            mail.deliver(sent)
        statuses = [(await daemon.outcome(str(m["Message-ID"])))["status"] for m in (auto, own, listed, bulk, looped)]
        bounce = await daemon.outcome("<dsn-1@example.test>")
        person = message("hello", "A person writes.")
        mail.deliver(person)
        await wait_replies(mail, 1)
    assert statuses == ["ignored"] * 5 and bounce["status"] == "ignored"
    assert len(replies(mail)) == 1 and not fake_model.find("I am away")
    assert sum("$AgentdDone" in f for f in mail.flags()) == 7


async def test_spoofed_sender_is_refused_and_kept(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    policy = {"require_dmarc": True, "trusted_authserv_id": "mx.example.test"}
    trusted = "mx.example.test; dmarc=pass header.from=example.test"
    genuine = message("real", "Signed and sealed.", Authentication_Results=trusted)
    spoofed = message("urgent", "Wire money now.", Authentication_Results="mx.example.test; dmarc=fail")
    forged = message("sneaky", "Trust me.", Authentication_Results="evil.test; dmarc=pass")
    forged["Authentication-Results"] = trusted  # below the topmost header: added upstream, proves nothing
    async with running(tmp_path, fake_model, mail, email=policy) as daemon:
        for sent in (spoofed, forged, genuine):
            mail.deliver(sent)
        await wait_replies(mail, 1)
        outcomes = [await daemon.outcome(str(m["Message-ID"])) for m in (spoofed, forged)]
        await wait_until(lambda: len(mail.mailbox("agent", "agentd-refused")) == 2, what="refused mail moved")
    assert [o["status"] for o in outcomes] == ["refused", "refused"]
    assert "DMARC" in outcomes[0]["reason"]
    kept = {str(m["Subject"]) for m in mail.mailbox("agent", "agentd-refused")}
    assert kept == {"urgent", "sneaky"} and not fake_model.find("Wire money")


async def test_sender_rate_limit_and_allowlist(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    limits = {"sender_rate_per_hour": 2, "allowed_senders": ["example.test"]}
    burst = [message(f"q{i}", f"Question number {i}.") for i in range(3)]
    stranger = message("hi", "Let me in.", sender="eve@evilexample.test")
    async with running(tmp_path, fake_model, mail, email=limits) as daemon:
        mail.deliver(stranger)
        for sent in burst:
            mail.deliver(sent)
        statuses = [(await daemon.outcome(str(m["Message-ID"])))["status"] for m in burst]
        refused = await daemon.outcome(str(stranger["Message-ID"]))
    assert sorted(statuses) == ["rate_limited", "replied", "replied"]
    assert refused["status"] == "refused" and "allowlist" in refused["reason"]
    assert len(replies(mail)) == 2


async def test_sender_domain_rate_limit(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    """Varying the From address within one domain does not get round the rate limit."""
    burst = [message(f"d{i}", f"Domain question {i}.", sender=f"user{i}@example.test") for i in range(3)]
    async with running(tmp_path, fake_model, mail, email={"domain_rate_per_hour": 2}) as daemon:
        for sent in burst:
            mail.deliver(sent)
        outcomes = [await daemon.outcome(str(m["Message-ID"])) for m in burst]
    # Two are answered (the made-up addresses bounce at SMTP: undeliverable), the third is held back.
    limited = [o for o in outcomes if o["status"] == "rate_limited"]
    assert len(limited) == 1 and "example.test in an hour" in limited[0]["reason"]
    assert all(o["status"] in ("replied", "undeliverable") for o in outcomes if o not in limited)


def malformed_corpus() -> dict[str, bytes]:
    head = b"From: alice@example.test\r\nTo: agent@example.test\r\nMIME-Version: 1.0\r\n"
    big = base64.encodebytes(os.urandom(25 * 1024 * 1024)).replace(b"\n", b"\r\n")
    return {
        "bad-boundary": head + b"Subject: bad boundary\r\nMessage-ID: <m1@x>\r\n"
        b'Content-Type: multipart/mixed; boundary="nope"\r\n\r\n--other\r\nContent-Type: text/plain\r\n\r\nlost?\r\n',
        "no-boundary": head
        + b"Subject: no boundary\r\nMessage-ID: <m2@x>\r\nContent-Type: multipart/mixed\r\n\r\nhi\r\n",
        "no-charset": head
        + b"Subject: no charset\r\nMessage-ID: <m3@x>\r\nContent-Type: text/plain\r\n\r\n"
        + "Grüße aus Köln".encode(),
        "unknown-charset": head + b"Subject: odd charset\r\nMessage-ID: <m4@x>\r\n"
        b"Content-Type: text/plain; charset=x-klingon-42\r\n\r\nQapla'\r\n",
        "8bit-headers": head
        + "Subject: Café über alles\r\nMessage-ID: <m5@x>\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody\r\n",
        "empty-body": head + b"Subject: empty\r\nMessage-ID: <m6@x>\r\n\r\n",
        "huge-attachment": head + b"Subject: huge\r\nMessage-ID: <m7@x>\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n'
        b'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + big + b"--b--\r\n",
        "no-message-id": head + b"Subject: anonymous\r\n\r\nno id here\r\n",
    }


async def test_malformed_mail_is_survived_and_each_gets_an_outcome(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    corpus = malformed_corpus()
    limits = {"max_attachment_mb": 5, "max_message_mb": 40}  # the huge attachment is read, then skipped
    async with running(tmp_path, fake_model, mail, email=limits) as daemon:
        for raw in corpus.values():
            mail.deliver(raw)
        statuses = {i: (await daemon.outcome(f"<m{i}@x>", timeout=60))["status"] for i in range(1, 8)}
        await wait_replies(mail, len(corpus), timeout=90)  # the one without a Message-ID too
    assert set(statuses.values()) == {"replied"}, statuses
    said = "\n".join(r.last_said() for r in fake_model.turn_requests())
    assert "Grüße aus Köln" in said and "Café über alles" in said and "Qapla'" in said
    assert "big.bin (" in said and "over the size limit" in said


async def test_attachment_names_cannot_escape_the_workdir(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    sent = message("files", "Two attachments.")
    sent.add_attachment(b"one", maintype="text", subtype="plain", filename="../../../../etc/cron.d/evil")
    sent.add_attachment(b"two", maintype="text", subtype="plain", filename="..\\\\..\\\\boot.ini")
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(sent)
        outcome = await daemon.outcome(str(sent["Message-ID"]))
    workdir = tmp_path / "data" / "work"
    saved = sorted(p.relative_to(workdir).as_posix().split("/", 1)[1] for p in workdir.rglob("*") if p.is_file())
    assert outcome["status"] == "replied"
    assert [s for s in saved if s.startswith("inbox/")] == ["inbox/boot.ini", "inbox/evil"]
    assert not list(tmp_path.rglob("cron.d"))
    assert "inbox/evil" in fake_model.find("Two attachments.")[0].last_said()


async def test_new_uidvalidity_rescans_without_duplicate_replies(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    first = message("before", "Answered before the mailbox was recreated.")
    daemon = MailDaemon(tmp_path, fake_model, mail)
    await daemon.start()
    try:
        mail.deliver(first)
        await wait_replies(mail, 1)
    finally:
        await daemon.stop()
    mail.wipe_mailbox("agent")  # recreated on the next delivery, with a new UIDVALIDITY
    mail.deliver(first)
    second = message("after", "New mail in the new mailbox.")
    mail.deliver(second)
    await daemon.start()
    try:
        assert (await daemon.outcome(str(second["Message-ID"])))["status"] == "replied"
        await wait_until(lambda: sum("$AgentdDone" in f for f in mail.flags()) == 2, what="both marked")
    finally:
        await daemon.stop()
    assert len(replies(mail)) == 2
    assert len(fake_model.find("Answered before the mailbox was recreated.")) == 1


async def test_dovecot_restart_during_idle_loses_nothing(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    async with running(tmp_path, fake_model, mail):
        mail.deliver(message("one", "Before the restart."))
        await wait_replies(mail, 1)
        await asyncio.to_thread(mail.restart_dovecot)
        mail.deliver(message("two", "Sent while agentd reconnects."))
        await wait_replies(mail, 2)
    assert fake_model.find("Sent while agentd reconnects.")


def mail_daemon(tmp_path: Path, fake_model: FakeModel, mail: MailServer, **email: Any) -> DaemonProcess:
    return DaemonProcess(tmp_path, fake_model.url, {"IMAP_PASSWORD": PASSWORD}, toml=email_toml(mail, **email))


async def exited(daemon: DaemonProcess) -> None:
    assert daemon.process is not None
    process = daemon.process
    await wait_until(lambda: process.poll() is not None, 60, "the daemon to die")


async def test_kill_after_the_reply_was_sent_sends_no_second_reply(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    first = message("once", "Answer me exactly once.")
    crashing = mail_daemon(tmp_path, fake_model, mail, debug_crash_at="after_send")
    await crashing.start()
    mail.deliver(first)
    await exited(crashing)
    assert len(replies(mail)) == 1 and not any("$AgentdDone" in f for f in mail.flags()), "sent, not marked"
    daemon = mail_daemon(tmp_path, fake_model, mail)
    await daemon.start()
    try:
        outcome = await read_outcome(tmp_path / "data" / "agentd.db", str(first["Message-ID"]))
        await wait_until(lambda: any("$AgentdDone" in f for f in mail.flags()), what="the message marked")
        sentinel = message("next", "A later message.")
        mail.deliver(sentinel)
        await wait_replies(mail, 2)
    finally:
        await daemon.stop()
    assert outcome["status"] == "replied"
    assert [str(r["Subject"]) for r in replies(mail)] == ["Re: once", "Re: next"]
    assert len(fake_model.find("Answer me exactly once.")) == 1


async def test_kill_before_the_reply_gives_exactly_one_reply_after_restart(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    fake_model.add("slow question", text="never sent", delay_s=60, once=True)
    first = message("slow", "A slow question.")
    daemon = mail_daemon(tmp_path, fake_model, mail)
    await daemon.start()
    mail.deliver(first)
    await wait_until(lambda: bool(fake_model.find("slow question")), 60, "the turn to start")
    daemon.kill()
    restarted = mail_daemon(tmp_path, fake_model, mail)
    await restarted.start()
    try:
        outcome = await read_outcome(tmp_path / "data" / "agentd.db", str(first["Message-ID"]))
        mail.deliver(message("next", "A later message."))
        await wait_replies(mail, 2)
    finally:
        await restarted.stop()
    assert outcome["status"] == "replied"
    assert [str(r["Subject"]) for r in replies(mail)] == ["Re: slow", "Re: next"]


async def test_thread_reply_cap(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    async with running(tmp_path, fake_model, mail, email={"thread_reply_cap": 1}) as daemon:
        first = message("cap", "First in the thread.")
        mail.deliver(first)
        [reply] = await wait_replies(mail, 1)
        again = message("Re: cap", "Second in the thread.", In_Reply_To=str(reply["Message-ID"]))
        mail.deliver(again)
        outcome = await daemon.outcome(str(again["Message-ID"]))
    assert outcome["status"] == "reply_cap" and len(replies(mail)) == 1


@pytest.mark.parametrize("imap", ["tls", "starttls"])
async def test_tls_and_starttls(tmp_path: Path, fake_model: FakeModel, imap: str) -> None:
    server = MailServer(tls=True)
    server.start()
    try:
        port = server.imaps_port if imap == "tls" else server.imap_port
        security = {"imap_security": imap, "imap_port": port, "smtp_security": "starttls", "tls_ca_file": server.cert}
        async with running(tmp_path, fake_model, server, email=security):
            server.deliver(message("secure", "Over an encrypted connection."))
            [reply] = await wait_replies(server, 1)
    finally:
        server.stop()
    assert reply["Subject"] == "Re: secure"


async def test_a_bug_while_answering_still_records_one_outcome(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.mail.channel import EmailChannel

    async def broken(self: EmailChannel, conversation: str, job: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(EmailChannel, "_answer", broken)
    async with running(tmp_path, fake_model, mail) as daemon:
        sent = message("poison", "This one hits the bug.")
        mail.deliver(sent)
        outcome = await daemon.outcome(str(sent["Message-ID"]))
        assert outcome["status"] == "failed" and outcome["reason"] == "internal error"
        await wait_until(lambda: any("$AgentdDone" in f for f in mail.flags()), what="the message marked")
