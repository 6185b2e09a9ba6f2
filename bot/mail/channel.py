"""The email channel: IMAP intake, one lane per email thread, threaded replies over SMTP, exactly once.

The intake flow lives here: parse, look up the recorded outcome, screen, queue
in the thread's lane, answer, send, record.  Which thread a mail joins is
``threads``'s job; how an outcome and a reply survive a crash is ``outbox``'s.
"""

from __future__ import annotations

import asyncio
import email.policy
import os
import signal
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from bot import metrics
from bot.config import Settings
from bot.core import (
    ChannelStatus,
    Conversations,
    DeliveryError,
    Duty,
    Failure,
    Inbound,
    Outcome,
    Profile,
    Store,
    StoreError,
    ToolSpec,
)
from bot.files import safe_filename, unique_path
from bot.lanes import Lanes
from bot.mail import compose, policy, smtp
from bot.mail.imap import Fetched, ImapWatcher, Mark
from bot.mail.outbox import MailStatus, Outbox, OutboxEntry, OutcomeRecord, body_digest
from bot.mail.parse import Mail, message_id, parse
from bot.mail.threads import Threads
from bot.mail.tools import MailTools
from bot.mail.worker import ParseWorker, WorkerFailed
from bot.store import keys

log = structlog.get_logger(__name__)

# Failures that say nothing about the message: leave it unmarked, it is taken again later.
RETRY_LATER = (Failure.SHUTDOWN, Failure.STORE, Failure.POOL_BUSY, Failure.USER_LIMIT)
# Failures of sending or recording a reply: retried soon, or recorded if the server's refusal is permanent.
_DEFERRABLE: tuple[type[Exception], ...] = (*smtp.SEND_FAILURES, StoreError)


@dataclass(frozen=True)
class Job:
    fetched: Fetched
    mail: Mail
    attempt: int = 0


MAX_ATTEMPTS = 6


@dataclass(frozen=True)
class Answer:
    """What to send back for one message, and the outcome to record once it is sent."""

    text: str
    status: MailStatus
    reason: str | None = None
    files: tuple[Path, ...] = ()


class EmailChannel:
    name = "email"

    def __init__(
        self, settings: Settings, profile: Profile, conversations: Conversations, store: Store, duty: Duty
    ) -> None:
        self._config, self._profile, self._conversations, self._store = settings.email, profile, conversations, store
        self._staging = settings.store.data_dir.resolve() / "incoming"
        # Reading the inbox is a duty: with replicas on one Redis, one of them at a time holds it.
        self._duty = duty
        self._watcher = ImapWatcher(self._config, store, duty, self._take_in)
        self._threads = Threads(self._config, store)
        self._outbox = Outbox(store, self._crash_point)
        self._parser = ParseWorker(self._config.parse_timeout_s)
        self._tools = MailTools(self._config, settings.triage, self._parser)
        self._lanes: Lanes[Job] = Lanes("email", self._process)
        self._inflight: set[str] = set()
        self._runner: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        if not self._config.intake:
            # Triage only: job results go out and the mail tools work, but no mail is taken in and answered.
            log.info("email_started", mailbox=self._config.mailbox, intake=False)
            return
        self._runner = asyncio.create_task(self._duty.run(self._watcher.run), name="imap")
        log.info("email_started", mailbox=self._config.mailbox, mode=self._config.conversation)

    async def stop_intake(self) -> None:
        self._watcher.stop_intake()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
        await self._lanes.join()
        self._duty.stop()
        self._watcher.stop()
        if self._runner is not None:
            await self._runner
        await self._tools.close()
        await self._parser.close()

    # -- scheduled jobs: delivery and the mail tools ------------------------------------------

    def toolsets(self) -> dict[str, list[ToolSpec]]:
        return {"mail": self._tools.specs()}

    async def deliver(self, target: str, subject: str, text: str) -> None:
        """A job's result as a new mail thread to ``target`` (the Courier for ``email:``)."""
        message = compose.new_message(self._address, target, subject, text, await self._html(text))
        try:
            await smtp.send(self._config, message.as_bytes(policy=email.policy.SMTP), self._address, target)
        except smtp.SEND_FAILURES as exc:
            raise DeliveryError(str(exc)[:300] or type(exc).__name__) from exc
        log.info("email_delivered", to=target, subject=subject)

    async def status(self) -> ChannelStatus:
        watcher = self._watcher
        return ChannelStatus(
            self.name,
            watcher.connected.is_set(),
            reconnects=watcher.reconnects,
            last_idle_renewal=watcher.last_idle_renewal,
            checkpoint_uid=watcher.checkpoint_uid,
            standby=self._config.intake and not self._duty.held,
        )

    @property
    def watcher(self) -> ImapWatcher:
        return self._watcher

    # -- intake: called by the IMAP loop for each message; records or enqueues, never waits for the agent --

    async def _take_in(self, fetched: Fetched) -> None:
        mail = await self._parse(fetched)
        if mail is None or mail.message_id in self._inflight:
            return
        recorded = await self._outbox.outcome(mail.message_id)
        if recorded is not None:
            await self._seen_again(fetched, mail, recorded)
            return
        screened = await self._screen(mail)
        if screened is not None:
            status, reason = screened
            if not fetched.complete:
                status, reason = MailStatus.OVERSIZED, f"{self._too_large(fetched)}; not answered: {reason}"
            await self._finish(fetched, mail.message_id, status, reason)
            return
        self._inflight.add(mail.message_id)
        self._lanes.put(await self._threads.conversation(mail), Job(fetched, mail))

    async def _seen_again(self, fetched: Fetched, mail: Mail, recorded: OutcomeRecord) -> None:
        """A Message-ID with an outcome: the same mail again is only marked; another mail reusing it is recorded.

        A stranger chooses his Message-ID: one that copies a message already taken must not vanish
        under that message's outcome, nor be answered through its outbox.
        """
        digest = body_digest(fetched.raw)
        if recorded.body in (None, digest):
            self._watcher.mark(self._mark(fetched, recorded.status))
            return
        own_id = f"{mail.message_id}#{digest[:16]}"
        if (again := await self._outbox.outcome(own_id)) is not None:
            self._watcher.mark(self._mark(fetched, again.status))
            return
        log.warning("email_message_id_reused", message_id=mail.message_id, sender=mail.sender)
        reason = "reuses the Message-ID of another message already taken"
        await self._finish(fetched, own_id, MailStatus.IGNORED, reason)

    async def _parse(self, fetched: Fetched) -> Mail | None:
        """The parsed mail; None (with the ``unreadable`` outcome recorded) if the parser failed or timed out."""
        try:
            return await self._parser.run(parse, fetched.raw, self._config.max_attachments, self._max_attachment_bytes)
        except WorkerFailed as exc:
            log.error("email_unparseable", uid=fetched.uid, error=str(exc))
            reason = f"the message could not be parsed: {exc}"
        except Exception:  # task boundary: malformed MIME must never stop the inbox
            log.exception("email_unparseable", uid=fetched.uid)
            reason = "the message could not be parsed"
        await self._finish(fetched, _raw_id(fetched.raw), MailStatus.UNREADABLE, reason)
        return None

    def _too_large(self, fetched: Fetched) -> str:
        return f"{fetched.size / 1e6:.1f} MB, over the limit of {self._config.max_message_mb:g} MB"

    @property
    def _max_attachment_bytes(self) -> int:
        return int(self._config.max_attachment_mb * 1_000_000)

    async def _screen(self, mail: Mail) -> tuple[MailStatus, str] | None:
        """(status, reason) for mail that must not be answered; None for mail the agent should see."""
        if reason := policy.loop_reason(mail, self._config.own):
            return MailStatus.IGNORED, reason
        if reason := policy.sender_refusal(mail, self._config):
            return MailStatus.REFUSED, reason
        count = await self._store.incr(keys.mail_sender_rate(mail.sender), keys.MAIL_RATE_WINDOW_S)
        if count > self._config.sender_rate_per_hour:
            limit = self._config.sender_rate_per_hour
            return MailStatus.RATE_LIMITED, f"more than {limit} messages from this sender in an hour"
        # A From address costs nothing to vary: the sender's domain has a budget of its own.
        domain = mail.sender.rpartition("@")[2]
        count = await self._store.incr(keys.mail_domain_rate(domain), keys.MAIL_RATE_WINDOW_S)
        if count > self._config.domain_rate_per_hour:
            limit = self._config.domain_rate_per_hour
            return MailStatus.RATE_LIMITED, f"more than {limit} messages from {domain} in an hour"
        return None

    # -- one message in its thread's lane --------------------------------------------

    async def _process(self, conversation: str, job: Job) -> None:
        retrying = False
        try:
            await self._reply(conversation, job)
        except _DEFERRABLE as exc:
            if smtp.permanent(exc):
                reason = str(exc)[:300]
                await self._finish(job.fetched, job.mail.message_id, MailStatus.UNDELIVERABLE, reason, conversation)
            else:
                retrying = self._defer(conversation, job, exc)
        except Exception:  # task boundary: a bug must still give the message one outcome, not a rescan loop
            log.exception("email_failed", conversation=conversation, message_id=job.mail.message_id)
            await self._finish(job.fetched, job.mail.message_id, MailStatus.FAILED, "internal error", conversation)
        finally:
            if not retrying:
                self._inflight.discard(job.mail.message_id)

    async def _reply(self, conversation: str, job: Job) -> None:
        mail = job.mail
        entry = await self._outbox.pending(mail.message_id) or await self._answer(conversation, job)
        if entry is None:
            return
        await self._outbox.send_once(mail.message_id, entry, self._send)
        await self._finish(job.fetched, mail.message_id, entry.status, entry.reason, conversation)

    def _defer(self, conversation: str, job: Job, exc: Exception) -> bool:
        log.error(
            "email_deferred",
            conversation=conversation,
            message_id=job.mail.message_id,
            error=str(exc)[:300],
            attempt=job.attempt,
        )
        return self._retry_later(conversation, job)

    def _retry_later(self, conversation: str, job: Job) -> bool:
        """Try a deferred message again soon; after MAX_ATTEMPTS it waits, unmarked, for the next rescan."""
        if job.attempt + 1 >= MAX_ATTEMPTS or self._closing:
            return False
        task = asyncio.create_task(self._requeue(conversation, replace(job, attempt=job.attempt + 1)))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return True

    async def _requeue(self, conversation: str, job: Job) -> None:
        try:
            await asyncio.sleep(min(2.0 * 3**job.attempt, 600.0))
            self._lanes.put(conversation, job)
        except asyncio.CancelledError:
            self._inflight.discard(job.mail.message_id)
            raise

    async def _answer(self, conversation: str, job: Job) -> OutboxEntry | None:
        """Run the turn and put its reply in the outbox; None when the message ended without a reply."""
        mail = job.mail
        replies = await self._store.incr(keys.mail_thread_replies(conversation), keys.MAIL_RECORD_TTL_S)
        if replies > self._config.thread_reply_cap:
            reason = f"the thread reached its cap of {self._config.thread_reply_cap} replies"
            await self._finish(job.fetched, mail.message_id, MailStatus.REPLY_CAP, reason, conversation)
            return None
        answer = await self._turn(conversation, job) if job.fetched.complete else self._refusal_of_size(job)
        if answer is None:
            return None
        message = compose.reply(mail, answer.text, self._address, answer.files, await self._html(answer.text))
        await self._threads.bind_reply(str(message["Message-ID"]).strip(), conversation, mail.sender)
        entry = OutboxEntry.of(message, mail.sender, answer.status, answer.reason)
        await self._outbox.put(mail.message_id, entry)
        return entry

    async def _turn(self, conversation: str, job: Job) -> Answer | None:
        """The agent's answer; None when the message ended without one (recorded, or to be retried)."""
        outcome = await self._conversations.ask(self._inbound(conversation, job.mail))
        if outcome.failure in RETRY_LATER:
            log.warning("email_retry_later", message_id=job.mail.message_id, failure=str(outcome.failure))
            return None
        if not outcome.ok and not self._config.error_reply:
            await self._finish(job.fetched, job.mail.message_id, MailStatus.FAILED, outcome.error, conversation)
            return None
        status = MailStatus.REPLIED if outcome.ok else MailStatus.FAILED_REPLIED
        return Answer(_reply_text(outcome), status, outcome.error, outcome.files)

    async def _html(self, text: str) -> str | None:
        """The answer rendered as HTML in the worker; None (a text-only reply) if rendering fails or is too slow."""
        try:
            return await self._parser.run(compose.to_html, text)
        except WorkerFailed as exc:
            log.warning("email_html_skipped", error=str(exc))
        except RecursionError:  # lists nested past the recursion limit: the text part is enough
            log.warning("email_html_skipped", error="RecursionError")
        except Exception:  # task boundary: the reply goes out as text, whatever the renderer did
            log.exception("email_html_skipped")
        return None

    def _refusal_of_size(self, job: Job) -> Answer:
        """Only the headers of an oversized mail were fetched: say so, without the agent."""
        text = compose.too_large_text(self._config.max_message_mb)
        return Answer(text, MailStatus.OVERSIZED, self._too_large(job.fetched))

    def _inbound(self, conversation: str, mail: Mail) -> Inbound:
        files = self._stage(mail)
        text = compose.prompt(mail, self._config.max_body_chars)
        return Inbound(conversation, text, "email", files, profile=self._profile.name, user=mail.sender)

    def _stage(self, mail: Mail) -> tuple[Path, ...]:
        if not mail.attachments:
            return ()
        batch = self._staging / uuid.uuid4().hex
        batch.mkdir(parents=True)
        staged = []
        for attachment in mail.attachments:
            path = unique_path(batch, safe_filename(attachment.name, fallback="attachment"))
            path.write_bytes(attachment.data)
            staged.append(path)
        return tuple(staged)

    # -- sending and recording ------------------------------------------------------------

    async def _send(self, raw: bytes, to: str) -> None:
        await smtp.send(self._config, raw, self._address, to)

    @property
    def _address(self) -> str:
        assert self._config.address is not None
        return self._config.address

    async def _finish(
        self,
        fetched: Fetched,
        message_id: str,
        status: MailStatus,
        reason: str | None,
        conversation: str | None = None,
    ) -> None:
        """Record the message's one outcome first, then mark it: a crash between them only leaves a mark to redo."""
        record = OutcomeRecord(status, reason, conversation, fetched.uid, body_digest(fetched.raw))
        await self._outbox.record(message_id, record)
        metrics.CHANNEL_MESSAGES.labels(channel="email", fate=status).inc()
        log.info("email_outcome", message_id=message_id, status=status, reason=reason, conversation=conversation)
        self._watcher.mark(self._mark(fetched, status))

    def _mark(self, fetched: Fetched, status: MailStatus | None) -> Mark:
        folder = self._config.refused_folder if status is MailStatus.REFUSED else self._config.processed_folder
        return Mark(fetched.uidvalidity, fetched.uid, folder)

    def _crash_point(self, name: str) -> None:
        """Tests only (``email.debug_crash_at``): die like ``kill -9`` at a named point."""
        if self._config.debug_crash_at == name:
            os.kill(os.getpid(), signal.SIGKILL)


def _reply_text(outcome: Outcome) -> str:
    if outcome.ok:
        return outcome.reply or "(The agent finished without a written answer.)"
    partial = f"\n\nWhat it had written so far:\n\n{outcome.reply}" if outcome.reply else ""
    return f"Sorry, I could not finish answering your message: {outcome.error}{partial}"


def _raw_id(raw: bytes) -> str:
    return message_id({}, raw)
