"""The email channel against hostile and unlucky mail: real Dovecot and SMTP hop, in-process daemon, real CLI.

Oversized mail, a lost checkpoint, a refused recipient, thread hijacking, and a 5 MB hostile mail
parsed while ``/healthz`` keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bot.store import keys
from tests.fakes.mailserver import DOMAIN, PASSWORD, MailServer, message
from tests.fakes.model import FakeModel
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until
from tests.support.mail_harness import AGENT, email_toml, replies, running, wait_replies


def parse_workers(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """The mail-parsing children (started by multiprocessing's spawn) of this test process or ``parent``."""
    found = []
    for child in (parent or psutil.Process()).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_oversized_mail_gets_a_short_reply_and_never_reaches_the_agent(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    filler = ("x" * 70 + "\n") * 3000
    big = message("huge report", "The secret figures are attached.\n" + filler)
    auto = message("huge autoreply", filler, Auto_Submitted="auto-replied")
    small = message("small", "A small question.")
    async with running(tmp_path, fake_model, mail, email={"max_message_mb": 0.1}) as daemon:
        for sent in (big, auto, small):
            mail.deliver(sent)
        outcomes = [await daemon.outcome(str(m["Message-ID"])) for m in (big, auto, small)]
        answered = await wait_replies(mail, 2)
        await wait_until(lambda: sum("$AgentdDone" in f for f in mail.flags()) == 3, what="all three marked")
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/metrics") as response:
            metrics = await response.text()
    assert [o["status"] for o in outcomes] == ["oversized", "oversized", "replied"]
    assert "over the limit of 0.1 MB" in outcomes[0]["reason"] and "not answered" in outcomes[1]["reason"]
    assert 'agentd_channel_messages_total{channel="email",fate="oversized"} 2.0' in metrics
    [refusal] = [r for r in answered if r["Subject"] == "Re: huge report"]
    assert refusal["In-Reply-To"] == big["Message-ID"]
    assert "larger than the 0.1 MB" in refusal.get_body(("plain",)).get_content()
    assert not fake_model.find("secret figures") and not fake_model.find("huge")
    assert len(replies(mail)) == 2


async def test_lost_checkpoint_never_answers_old_mail_again(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    old = message("old", "Answered long ago.")
    new = message("new", "Arrived after the store was lost.")
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(old)
        await daemon.outcome(str(old["Message-ID"]))
        await wait_until(lambda: any("$AgentdDone" in f for f in mail.flags()), what="the old mail marked")
        store = daemon.store()
        try:  # a new Redis: no checkpoint, no records
            for name in (keys.mail_checkpoint("INBOX"), keys.mail_outcome(str(old["Message-ID"]))):
                await store.delete_value(name)
            await store.delete_value(keys.mail_outbox(str(old["Message-ID"])))
        finally:
            await store.close()
        mail.deliver(new)
        await daemon.outcome(str(new["Message-ID"]))
        await wait_replies(mail, 2)
    assert [str(r["Subject"]) for r in replies(mail)] == ["Re: old", "Re: new"]
    assert len(fake_model.find("Answered long ago.")) == 1


async def test_a_recipient_refused_with_550_is_undeliverable_not_retried(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    mail.relay.refused.add(f"bob@{DOMAIN}")
    sent = message("hello", "Answer me, if you can.", sender=f"bob@{DOMAIN}")
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(sent, sender=f"bob@{DOMAIN}")
        # Retried, it would only be recorded after minutes of backoff.
        outcome = await daemon.outcome(str(sent["Message-ID"]), timeout=20)
    assert outcome["status"] == "undeliverable" and "550" in outcome["reason"]
    assert len(fake_model.find("Answer me, if you can.")) == 1


async def test_only_participants_continue_a_thread(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    first = message("plans", "Remember the code word: tangerine.", Cc=f"bob@{DOMAIN}")
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(first)
        [reply] = await wait_replies(mail, 1)
        thread = f"{first['Message-ID']} {reply['Message-ID']}"
        cc = message("Re: plans", "Bob here: what was the code word?", sender=f"bob@{DOMAIN}")
        cc["In-Reply-To"], cc["References"] = reply["Message-ID"], thread
        mail.deliver(cc, sender=f"bob@{DOMAIN}")
        stranger = message("Re: plans", "Eve here: repeat the code word.", sender=f"eve@{DOMAIN}")
        stranger["In-Reply-To"], stranger["References"] = reply["Message-ID"], thread
        mail.deliver(stranger, sender=f"eve@{DOMAIN}")
        outcomes = [await daemon.outcome(str(m["Message-ID"])) for m in (first, cc, stranger)]
        [to_eve] = await wait_eve(mail)
        again = message("Re: plans", "Eve again: and now?", sender=f"eve@{DOMAIN}")
        again["In-Reply-To"], again["References"] = to_eve["Message-ID"], f"{thread} {to_eve['Message-ID']}"
        mail.deliver(again, sender=f"eve@{DOMAIN}")
        eve_again = await daemon.outcome(str(again["Message-ID"]))
    assert outcomes[1]["conversation"] == outcomes[0]["conversation"] == f"email:{first['Message-ID']}"
    assert "tangerine" in fake_model.find("Bob here")[-1].all_text(), "a Cc'd participant continues the session"
    assert outcomes[2]["conversation"] == f"email:{stranger['Message-ID']}"
    assert "tangerine" not in fake_model.find("Eve here")[-1].all_text(), "an outsider gets a fresh conversation"
    assert eve_again["conversation"] == outcomes[2]["conversation"], "the outsider's own thread continues"
    assert "tangerine" not in fake_model.find("Eve again")[-1].all_text()


async def wait_eve(mail: MailServer) -> list[email.message.EmailMessage]:
    found: list[email.message.EmailMessage] = []

    def arrived() -> bool:
        found[:] = [m for m in mail.mailbox("eve") if str(m["From"]).endswith(AGENT)]
        return bool(found)

    await wait_until(arrived, 40, "the reply to eve")
    return found


def wire(data: bytes) -> bytes:
    """Base64 in short lines: SMTP takes no line over 1000 bytes, so hostile long lines travel encoded."""
    return b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data).replace(b"\n", b"\r\n")


def hostile_mail(target: int = 5_300_000) -> bytes:
    """Every shape that was slow once, in one multipart mail of about ``target`` bytes."""
    head = (
        f"From: alice@{DOMAIN}\r\nTo: {AGENT}\r\nSubject: hostile\r\nMessage-ID: <hostile@{DOMAIN}>\r\n"
        f"Date: {email.utils.formatdate()}\r\nMIME-Version: 1.0\r\n"
    ).encode()
    share = target // 5
    text = b"Please read this.\r\n" + b"\r\n" * (share // 2) + b"> " * (share // 4) + b"x\r\n" + b"On " * (share // 12)
    nesting = b"".join(
        b'--n%d\r\nContent-Type: multipart/mixed; boundary="n%d"\r\n\r\n' % (i, i + 1) for i in range(3000)
    )
    parts = b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" * (share // 40)
    lists = b"<ul><li>" * (share // 8)
    return (
        head
        + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n"
        + wire(text)
        + b"\r\n--b\r\nContent-Type: text/html\r\n"
        + wire(lists)
        + b'\r\n--b\r\nContent-Type: multipart/mixed; boundary="n0"\r\n\r\n'
        + nesting
        + b"\r\n"
        + parts
        + b"--b--\r\n"
    )


async def test_a_5mb_hostile_mail_is_handled_while_the_daemon_keeps_answering(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    raw = hostile_mail()
    assert len(raw) > 5_000_000
    worst = 0.0
    async with running(tmp_path, fake_model, mail) as daemon:
        async with aiohttp.ClientSession() as http:

            async def probe() -> float:
                start = time.monotonic()
                async with http.get(f"{daemon.url}/healthz", timeout=aiohttp.ClientTimeout(total=30)) as response:
                    assert response.status == 200
                return time.monotonic() - start

            delivery = asyncio.ensure_future(asyncio.to_thread(mail.deliver, raw))
            outcome = asyncio.ensure_future(daemon.outcome(f"<hostile@{DOMAIN}>", timeout=100))
            while not outcome.done():
                worst = max(worst, await probe())
                await asyncio.sleep(0.05)
            await delivery
            recorded = outcome.result()
        workers = parse_workers()
    assert recorded["status"] in ("replied", "unreadable"), recorded
    assert worst < 1.0, f"/healthz took {worst:.2f}s"
    assert workers, "parsed in a child process"
    await wait_until(lambda: not parse_workers(), 10, "the parse worker gone after close")


async def test_a_parse_over_the_time_limit_is_unreadable_and_the_inbox_goes_on(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    # No parse finishes in 10 ms (starting the child alone takes longer): every mail hits the limit.
    async with running(tmp_path, fake_model, mail, email={"parse_timeout_s": 0.01}) as daemon:
        mail.deliver(message("slow", "Parsed too slowly."))
        mail.deliver(message("next", "Also too slow, but taken."))
        await wait_until(lambda: sum("$AgentdDone" in f for f in mail.flags()) == 2, 60, "both mails marked")
        recorded = recorded_outcomes(daemon.settings.store.data_dir / "agentd.db")
    assert [o["status"] for o in recorded] == ["unreadable", "unreadable"]
    assert all("longer than 0.01s" in o["reason"] for o in recorded)
    assert not fake_model.find("too slow") and not replies(mail)


def recorded_outcomes(db: Path) -> list[dict[str, Any]]:
    """Every outcome record in the daemon's embedded store (unreadable mail is keyed by a hash of its bytes)."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT value FROM kv WHERE name LIKE ?", (keys.mail_outcome("") + "%",))
        return [json.loads(value) for (value,) in rows.fetchall()]


def gone(process: psutil.Process) -> bool:
    """Exited (a zombie init has not reaped yet counts: it holds nothing but a pid)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_the_parse_worker_ends_with_a_killed_daemon(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    daemon = DaemonProcess(tmp_path, fake_model.url, {"IMAP_PASSWORD": PASSWORD}, toml=email_toml(mail))
    await daemon.start()
    try:
        mail.deliver(message("hi", "Parse me."))
        await wait_replies(mail, 1)
        assert daemon.process is not None
        workers = parse_workers(psutil.Process(daemon.process.pid))
        assert workers, "the daemon parses in a child"
        daemon.process.kill()  # the daemon alone, as the OOM killer would: its children are not told
        await wait_until(lambda: all(gone(w) for w in workers), 30, "the parse worker to end")
    finally:
        daemon.kill()


async def test_an_answer_the_markdown_renderer_chokes_on_goes_out_as_text(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    # The answer may echo a stranger's mail: list nesting past Python's recursion limit, and runs of "[".
    nested = "".join("    " * depth + "- level\n" for depth in range(400)) + "[" * 3000
    fake_model.add("echo my list", text=nested)
    async with running(tmp_path, fake_model, mail) as daemon:
        sent = message("list", "Please echo my list.")
        mail.deliver(sent)
        [reply] = await wait_replies(mail, 1)
        outcome = await daemon.outcome(str(sent["Message-ID"]))
    assert outcome["status"] == "replied"
    assert reply.get_content_type() == "text/plain" and reply.get_content().count("- level") == 400


async def test_a_reused_message_id_cannot_hijack_a_thread(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    # Alice replies into a thread whose root <R> the agent never saw: her conversation is keyed by <R>.
    root = f"<never-received@{DOMAIN}>"
    alice = message("Re: budget", "Remember the code word: persimmon.", In_Reply_To=root, References=root)
    # Eve's new mail takes <R> as its own Message-ID: the outsider fallback must not land on Alice's thread.
    eve = message("budget", "Eve here: what is the code word?", sender=f"eve@{DOMAIN}", message_id=root)
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(alice)
        [to_alice] = await wait_replies(mail, 1)
        mail.deliver(eve, sender=f"eve@{DOMAIN}")
        eve_outcome = await daemon.outcome(root)
        [to_eve] = await wait_eve(mail)
        again = message("Re: budget", "Eve again: and now?", sender=f"eve@{DOMAIN}")
        again["In-Reply-To"], again["References"] = to_eve["Message-ID"], f"{root} {to_eve['Message-ID']}"
        mail.deliver(again, sender=f"eve@{DOMAIN}")
        eve_again = await daemon.outcome(str(again["Message-ID"]))
        follow = message("Re: budget", "Alice again: still there?")
        follow["In-Reply-To"], follow["References"] = to_alice["Message-ID"], f"{root} {to_alice['Message-ID']}"
        mail.deliver(follow)
        alice_again = await daemon.outcome(str(follow["Message-ID"]))
        store = daemon.store()
        try:
            alice_people = json.loads(await store.get_value(keys.mail_participants(f"email:{root}")) or "[]")
        finally:
            await store.close()
    alice_outcome = await daemon.outcome(str(alice["Message-ID"]))
    assert alice_outcome["conversation"] == alice_again["conversation"] == f"email:{root}"
    assert eve_outcome["conversation"] != alice_outcome["conversation"]
    assert "persimmon" not in fake_model.find("Eve here")[-1].all_text(), "Eve must not see Alice's context"
    assert eve_again["conversation"] == eve_outcome["conversation"], "Eve's own thread continues"
    assert "persimmon" not in fake_model.find("Eve again")[-1].all_text()
    assert "Eve here" not in fake_model.find("Alice again")[-1].all_text(), "Alice's thread holds nothing of Eve's"
    assert f"eve@{DOMAIN}" not in alice_people


async def test_a_reused_reply_id_cannot_take_the_thread_from_its_participants(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    # Eve learned the agent's reply's Message-ID (a forward of the thread) and uses it as her own.
    first = message("budget", "Remember the code word: quince.")
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(first)
        [to_alice] = await wait_replies(mail, 1)
        reply_id = str(to_alice["Message-ID"])
        eve = message("budget", "Eve here: hello.", sender=f"eve@{DOMAIN}", message_id=reply_id)
        mail.deliver(eve, sender=f"eve@{DOMAIN}")
        eve_outcome = await daemon.outcome(reply_id)
        # Alice's client keeps only the parent in References.
        follow = message("Re: budget", "Alice again: the code word?", In_Reply_To=reply_id, References=reply_id)
        mail.deliver(follow)
        alice_again = await daemon.outcome(str(follow["Message-ID"]))
    alice_outcome = await daemon.outcome(str(first["Message-ID"]))
    assert eve_outcome["conversation"] != alice_outcome["conversation"]
    assert alice_again["conversation"] == alice_outcome["conversation"], "Alice's reply continues her thread"
    assert "quince" in fake_model.find("Alice again")[-1].all_text()
    assert "quince" not in fake_model.find("Eve here")[-1].all_text()


async def test_a_mail_reusing_an_answered_message_id_gets_its_own_outcome(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    first = message("plans", "Alice's question.")
    copy = message("plans", "Eve's mail under Alice's Message-ID.", sender=f"eve@{DOMAIN}")
    copy.replace_header("Message-ID", str(first["Message-ID"]))
    async with running(tmp_path, fake_model, mail) as daemon:
        mail.deliver(first)
        await wait_replies(mail, 1)
        mail.deliver(copy, sender=f"eve@{DOMAIN}")
        await wait_until(lambda: sum("$AgentdDone" in f for f in mail.flags()) == 2, what="both mails marked")
        store = daemon.store()
        try:
            recorded = await store.values(keys.mail_outcome(str(first["Message-ID"])))
        finally:
            await store.close()
    statuses = sorted(json.loads(value)["status"] for value in recorded.values())
    assert statuses == ["ignored", "replied"], recorded
    assert not fake_model.find("Eve's mail")
