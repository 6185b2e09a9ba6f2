"""The IMAP side: one connection that catches up, IDLEs, fetches and marks, and is rebuilt on any failure.

Nothing here waits for the agent: each new message is handed to ``deliver``,
which records or enqueues it and returns.  Marks (a keyword or a move) are
requested later, by whoever recorded the outcome, and applied between IDLEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
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

from bot import keys, metrics
from bot.config import EmailConfig
from bot.store import Store, StoreError

log = structlog.get_logger(__name__)

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_UID = re.compile(rb"UID (\d+)")
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


class ImapError(Exception):
    """The server refused a command, or the connection broke."""


class _Reconnect(Exception):
    """A session ended by a failure (already logged): connect again after a pause."""


# What a lost or refused connection raises: the client is rebuilt.
_CONNECTION_ERRORS = (ImapError, aioimaplib.AioImapException, StoreError, OSError, TimeoutError)


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


Deliver = Callable[[Fetched], Awaitable[None]]


class ImapWatcher:
    def __init__(self, config: EmailConfig, store: Store, deliver: Deliver) -> None:
        self._config, self._store, self._deliver = config, store, deliver
        self._marks: list[Mark] = []
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._intake = True
        self._stopping = False
        self._news = False
        self.connected = asyncio.Event()

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
            raise _Reconnect

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _session(self) -> None:
        client = await self._connect()
        try:
            uidvalidity = await self._select(client)
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
            await self._discard(client)

    async def _connect(self) -> aioimaplib.IMAP4:
        c = self._config
        self._lost.clear()
        timeout = c.command_timeout_s
        lost = self._lost.set
        # IMAP4 itself takes an SSL context (IMAP4_SSL would drop conn_lost_cb).
        client = aioimaplib.IMAP4(
            host=c.imap_host,
            port=c.imap_port or (993 if c.imap_security == "tls" else 143),
            timeout=timeout,
            conn_lost_cb=lambda _: lost(),
            ssl_context=c.tls_context() if c.imap_security == "tls" else None,
        )
        await asyncio.wait_for(client.wait_hello_from_server(), timeout)
        if c.imap_security == "starttls":
            await self._starttls(client)
        assert c.imap_user is not None
        assert c.imap_password is not None
        response = await self._command(client.login(c.imap_user, c.imap_password.get_secret_value()))
        if response.result != "OK":
            raise ImapError(f"login refused: {_text(response)}")
        return client

    async def _starttls(self, client: aioimaplib.IMAP4) -> None:
        """aioimaplib has no STARTTLS: send the command, then upgrade the transport in place."""
        protocol = client.protocol
        response = await self._command(protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag())))
        if response.result != "OK":
            raise ImapError(f"STARTTLS refused: {_text(response)}")
        loop = asyncio.get_running_loop()
        context, host = self._config.tls_context(), self._config.imap_host
        protocol.transport = await loop.start_tls(protocol.transport, protocol, context, server_hostname=host)
        await self._command(protocol.capability())  # capabilities may differ once encrypted

    async def _select(self, client: aioimaplib.IMAP4) -> int:
        response = await self._command(client.select(self._config.mailbox))
        if response.result != "OK":
            raise ImapError(f"cannot select {self._config.mailbox}: {_text(response)}")
        for line in response.lines:
            if match := _UIDVALIDITY.search(bytes(line)):
                return int(match.group(1))
        raise ImapError("the server sent no UIDVALIDITY")

    async def _discard(self, client: aioimaplib.IMAP4) -> None:
        with contextlib.suppress(aioimaplib.AioImapException, OSError, TimeoutError, ImapError):
            await asyncio.wait_for(client.logout(), 5)

    async def _command(self, pending: Awaitable[aioimaplib.Response]) -> aioimaplib.Response:
        """Every command gets a deadline; a lost connection ends it at once."""
        if self._lost.is_set():
            raise ImapError("connection lost")
        try:
            response = await asyncio.wait_for(pending, self._config.command_timeout_s)
        except TimeoutError as exc:
            raise ImapError(f"no answer within {self._config.command_timeout_s}s") from exc
        # New mail is announced in whatever response comes next, not only during IDLE: note it, or mail
        # arriving between a catch-up's SEARCH and the next IDLE would wait for the IDLE renewal.
        lines = getattr(response, "lines", None) or []
        if any(isinstance(line, bytes) and line.endswith(b" EXISTS") for line in lines):
            self._news = True
        return response

    # -- catch-up ------------------------------------------------------------------

    async def _catch_up(self, client: aioimaplib.IMAP4, uidvalidity: int, full: bool) -> None:
        """Fetch what is new since the checkpoint; ``full`` also rereads every message not yet marked."""
        last = await self._checkpoint(uidvalidity)
        self._news = False
        uids = await self._search(client, last, full)
        log.debug("imap_catch_up", last_uid=last, full=full, found=uids[:50])
        for uid in uids:
            fetched = await self._take(client, uidvalidity, uid)
            if fetched is not None:
                await self._deliver(fetched)
            if uid > last:
                last = uid
                await self._save_checkpoint(uidvalidity, last)

    async def _search(self, client: aioimaplib.IMAP4, last: int, full: bool) -> list[int]:
        # Marked mail is never taken again, even when the checkpoint is lost (a new Redis, an expired key).
        unmarked = [] if self._config.processed_folder else ["UNKEYWORD", self._config.processed_keyword]
        criteria = (unmarked or ["ALL"]) if full else ["UID", f"{last + 1}:*", *unmarked]
        response = await self._command(client.uid_search(*criteria))
        if response.result != "OK":
            raise ImapError(f"search failed: {_text(response)}")
        uids = sorted({int(n) for line in response.lines[:-1] for n in bytes(line).split() if n.isdigit()})
        # "UID n:*" names the highest UID even when it is below n.
        return uids if full else [u for u in uids if u > last]

    async def _take(self, client: aioimaplib.IMAP4, uidvalidity: int, uid: int) -> Fetched | None:
        """The whole message, or only its headers when RFC822.SIZE is over ``max_message_mb``; None if expunged."""
        size = await self._size(client, uid)
        if size is None:
            return None
        complete = size <= self._config.max_message_mb * 1_000_000
        raw = await self._fetch(client, uid, "BODY.PEEK[]" if complete else "BODY.PEEK[HEADER]")
        if raw is None:
            return None
        return Fetched(self._config.mailbox, uidvalidity, uid, raw, size, complete)

    async def _size(self, client: aioimaplib.IMAP4, uid: int) -> int | None:
        response = await self._command(client.uid("fetch", str(uid), "(RFC822.SIZE)"))
        if response.result != "OK":
            raise ImapError(f"fetch {uid} failed: {_text(response)}")
        for line in response.lines[:-1]:
            if match := _FETCH_SIZE.search(bytes(line)):
                return int(match.group(1))
        return None  # expunged meanwhile

    async def _fetch(self, client: aioimaplib.IMAP4, uid: int, section: str) -> bytes | None:
        response = await self._command(client.uid("fetch", str(uid), section))
        if response.result != "OK":
            raise ImapError(f"fetch {uid} failed: {_text(response)}")
        bodies = [bytes(line) for line in response.lines if isinstance(line, bytearray)]
        return bodies[0] if bodies else None  # expunged meanwhile

    async def _checkpoint(self, uidvalidity: int) -> int:
        raw = await self._store.get_value(keys.mail_checkpoint(self._config.mailbox))
        if raw is None:
            return 0
        saved = json.loads(raw)
        if saved.get("uidvalidity") != uidvalidity:
            log.warning("imap_uidvalidity_changed", old=saved.get("uidvalidity"), new=uidvalidity)
            return 0
        return int(saved.get("last_uid", 0))

    async def _save_checkpoint(self, uidvalidity: int, last: int) -> None:
        value = json.dumps({"uidvalidity": uidvalidity, "last_uid": last})
        try:
            await self._store.put_value(keys.mail_checkpoint(self._config.mailbox), value, keys.MAIL_RECORD_TTL_S)
        except StoreError as exc:  # the next catch-up rereads from the older checkpoint and dedupes
            log.error("store_error", error=str(exc))

    # -- IDLE and marks ----------------------------------------------------------------

    async def _idle(self, client: aioimaplib.IMAP4) -> None:
        """IDLE until the server reports mail, a mark is requested, or the renew period ends."""
        self._wake.clear()
        if self._marks or self._stopping or self._news:
            return
        idle = await self._command(client.idle_start(timeout=self._config.idle_renew_s + 60))
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
            lost = asyncio.ensure_future(self._lost.wait())
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
            raise ImapError(f"marking UID {mark.uid} failed: {_text(response)}")


def _text(response: aioimaplib.Response) -> str:
    return b" ".join(bytes(line) for line in response.lines[-1:]).decode(errors="replace")[:200]


def _log_retry(state: RetryCallState) -> None:
    pause = state.next_action.sleep if state.next_action else 0.0
    log.info("imap_retry", attempt=state.attempt_number, retry_in_s=round(pause, 1))
