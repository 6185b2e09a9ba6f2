"""The IMAP side: one connection that catches up, IDLEs, fetches and marks, and is rebuilt on any failure.

Nothing here waits for the agent: each new message is handed to ``take_in``,
which records or enqueues it and returns.  Marks (a keyword or a move) are
requested later, by whoever recorded the outcome, and applied between IDLEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aioimaplib
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random_exponential,
)

from bot import metrics
from bot.config import EmailConfig
from bot.core import Duty, DutyLost, Store, StoreError
from bot.mail.mailbox import ImapError, Mailbox, text_of
from bot.store import keys

log = structlog.get_logger(__name__)


class _Reconnect(Exception):
    """A session ended by a failure (already logged): connect again after a pause."""


# What a lost or refused connection raises: the client is rebuilt. DutyLost: another replica took the
# inbox over; the duty cancels this watcher within a renewal period, and until then it only retries.
_CONNECTION_ERRORS = (ImapError, aioimaplib.AioImapException, StoreError, DutyLost, OSError, TimeoutError)


@dataclass(frozen=True)
class Fetched:
    """One message as the server holds it: all of it, or only its header section if it is over the size cap."""

    mailbox: str
    uidvalidity: int
    uid: int
    raw: bytes
    size: int = 0  # RFC822.SIZE
    complete: bool = True


@dataclass(frozen=True)
class Mark:
    """What to do with a message once its outcome is recorded: a keyword, or a move to ``folder``."""

    uidvalidity: int
    uid: int
    folder: str | None = None


# Takes in one fetched mail: records its outcome or queues it, never waits for the agent.
TakeIn = Callable[[Fetched], Awaitable[None]]


class ImapWatcher:
    def __init__(self, config: EmailConfig, store: Store, duty: Duty, take_in: TakeIn) -> None:
        self._config, self._store, self._duty, self._take_in = config, store, duty, take_in
        self._marks: list[Mark] = []
        self._wake = asyncio.Event()
        self._box = Mailbox(config)
        self._intake = True
        self._stopping = False
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.last_idle_renewal: float | None = None  # Unix seconds of the latest IDLE command
        self.checkpoint_uid: int | None = None

    # -- requests from the channel ------------------------------------------------

    def mark(self, mark: Mark) -> None:
        self._marks.append(mark)
        self._wake.set()

    def stop_intake(self) -> None:
        self._intake = False
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def pending_marks(self) -> int:
        return len(self._marks)

    # -- the connection loop ---------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and on any failure discard the client and reconnect with capped, jittered backoff."""
        half = self._config.reconnect_max_s / 2
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Reconnect),
            # Half fixed, half random: 0.5-1 s, then 1-2 s, ... up to reconnect_max_s, as many clients never sync up.
            wait=wait_exponential(multiplier=0.5, max=half) + wait_random_exponential(multiplier=0.5, max=half),
            sleep=self._pause,
            before_sleep=_log_retry,
        )
        async for attempt in retrying:
            with attempt:
                await self._attempt()

    async def _attempt(self) -> None:
        """One session; a failure is logged and, unless stopping, asks for another."""
        if self._stopping:
            return
        try:
            await self._session()
        except _CONNECTION_ERRORS as exc:
            log.warning("imap_reconnect", error=str(exc)[:200] or type(exc).__name__)
        except Exception:  # task boundary: a bug must not end the inbox for good
            log.exception("imap_failed")
        else:
            return
        if not self._stopping:
            self.reconnects += 1
            raise _Reconnect

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _session(self) -> None:
        self._box = box = Mailbox(self._config)  # a fresh client per session: aioimaplib's state is not reusable
        try:
            await box.connect()
            client = box.client
            uidvalidity = await box.select(self._config.mailbox)
            self.connected.set()
            metrics.CHANNEL_CONNECTED.labels(channel="email").set(1)
            if self._intake:
                await self._catch_up(client, uidvalidity, full=True)
            while not self._stopping:
                await self._apply_marks(client, uidvalidity)
                if self._intake:
                    await self._catch_up(client, uidvalidity, full=False)
                await self._idle(client)
            await self._apply_marks(client, uidvalidity)
        finally:
            self.connected.clear()
            metrics.CHANNEL_CONNECTED.labels(channel="email").set(0)
            await box.close()

    async def _command(self, pending: Awaitable[aioimaplib.Response]) -> aioimaplib.Response:
        return await self._box.command(pending)

    # -- catch-up ------------------------------------------------------------------

    async def _catch_up(self, client: aioimaplib.IMAP4, uidvalidity: int, full: bool) -> None:
        """Fetch what is new since the checkpoint; ``full`` also rereads every message not yet marked."""
        last = await self._checkpoint(uidvalidity)
        self._box.exists_seen = False
        uids = await self._search(client, last, full)
        log.debug("imap_catch_up", last_uid=last, full=full, found=uids[:50])
        for uid in uids:
            fetched = await self._fetch(client, uidvalidity, uid)
            if fetched is not None:
                await self._take_in(fetched)
            if uid > last:
                last = uid
                await self._save_checkpoint(uidvalidity, last)

    async def _search(self, client: aioimaplib.IMAP4, last: int, full: bool) -> list[int]:
        # Marked mail is never taken again, even when the checkpoint is lost (a new Redis, an expired key).
        unmarked = [] if self._config.processed_folder else ["UNKEYWORD", self._config.processed_keyword]
        criteria = (unmarked or ["ALL"]) if full else ["UID", f"{last + 1}:*", *unmarked]
        uids = await self._box.search(*criteria)
        # "UID n:*" names the highest UID even when it is below n.
        return uids if full else [u for u in uids if u > last]

    async def _fetch(self, client: aioimaplib.IMAP4, uidvalidity: int, uid: int) -> Fetched | None:
        """The whole message, or only its headers when RFC822.SIZE is over ``max_message_mb``; None if expunged."""
        size = await self._box.size(uid)
        if size is None:
            return None
        complete = size <= self._config.max_message_mb * 1_000_000
        raw = await self._box.fetch(uid, "BODY.PEEK[]" if complete else "BODY.PEEK[HEADER]")
        if raw is None:
            return None
        return Fetched(self._config.mailbox, uidvalidity, uid, raw, size, complete)

    async def _checkpoint(self, uidvalidity: int) -> int:
        raw = await self._store.get_value(keys.mail_checkpoint(self._config.mailbox))
        if raw is None:
            return 0
        saved = json.loads(raw)
        if saved.get("uidvalidity") != uidvalidity:
            log.warning("imap_uidvalidity_changed", old=saved.get("uidvalidity"), new=uidvalidity)
            return 0
        self.checkpoint_uid = int(saved.get("last_uid", 0))
        return self.checkpoint_uid

    async def _save_checkpoint(self, uidvalidity: int, last: int) -> None:
        value = json.dumps({"uidvalidity": uidvalidity, "last_uid": last})
        try:
            # Fenced: a replica that lost the duty (paused past its lease) cannot move the new holder's checkpoint.
            await self._duty.put_value(keys.mail_checkpoint(self._config.mailbox), value, keys.MAIL_RECORD_TTL_S)
            self.checkpoint_uid = last
        except StoreError as exc:  # the next catch-up rereads from the older checkpoint and dedupes
            log.error("store_error", error=str(exc))

    # -- IDLE and marks ----------------------------------------------------------------

    async def _idle(self, client: aioimaplib.IMAP4) -> None:
        """IDLE until the server reports mail, a mark is requested, or the renew period ends."""
        self._wake.clear()
        if self._marks or self._stopping or self._box.exists_seen:
            return
        idle = await self._command(client.idle_start(timeout=self._config.idle_renew_s + 60))
        self.last_idle_renewal = time.time()
        try:
            await self._wait_for_news(client)
        finally:
            # idle_start's own timeout does not send DONE: always end the IDLE ourselves.
            client.idle_done()
            await self._command(idle)

    async def _wait_for_news(self, client: aioimaplib.IMAP4) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.idle_renew_s
        while (left := deadline - loop.time()) > 0:
            push = asyncio.ensure_future(client.wait_server_push(timeout=left))
            wake = asyncio.ensure_future(self._wake.wait())
            lost = asyncio.ensure_future(self._box.lost.wait())
            done, pending = await asyncio.wait({push, wake, lost}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if lost in done:
                raise ImapError("connection lost during IDLE")
            if push not in done or push.exception() is not None:
                return
            lines = push.result()
            if not all(bytes(line).startswith(b"OK") for line in lines):
                # Anything but a keepalive ("OK Still here"): EXISTS, RECENT, EXPUNGE, BYE. Catch up now;
                # EXISTS and RECENT may come in separate pushes, and one of them may be missed.
                return

    async def _apply_marks(self, client: aioimaplib.IMAP4, uidvalidity: int) -> None:
        while self._marks:
            mark = self._marks[0]
            if mark.uidvalidity == uidvalidity:
                await self._apply(client, mark)
            # A mark from before a UIDVALIDITY change is redone by the full rescan (outcomes are recorded).
            self._marks.pop(0)

    async def _apply(self, client: aioimaplib.IMAP4, mark: Mark) -> None:
        if mark.folder is None:
            keyword = f"({self._config.processed_keyword})"
            response = await self._command(client.uid("store", str(mark.uid), "+FLAGS", keyword))
        else:
            await self._command(client.create(mark.folder))  # NO [ALREADYEXISTS] is fine
            response = await self._command(client.uid("move", str(mark.uid), mark.folder))
        if response.result != "OK":
            raise ImapError(f"marking UID {mark.uid} failed: {text_of(response)}")


def _log_retry(state: RetryCallState) -> None:
    pause = state.next_action.sleep if state.next_action else 0.0
    log.info("imap_retry", attempt=state.attempt_number, retry_in_s=round(pause, 1))
