"""A small IMAP client (aioimaplib): connect with TLS, STARTTLS or plain, log in, and run commands with deadlines.

The IDLE watcher and the triage tools each own one: the tools never share the
watcher's connection, so a tool call cannot disturb IDLE.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import Awaitable
from dataclasses import dataclass

import aioimaplib

from bot.config import EmailConfig
from bot.mail import oauth

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


class ImapError(Exception):
    """The server refused a command, or the connection broke."""


class _SaslCommand(aioimaplib.Command):  # type: ignore[misc]  # aioimaplib is untyped
    """AUTHENTICATE with an initial response. A refused token comes back as a "+" challenge (the
    error details) that the server answers with NO only after an empty line; aioimaplib calls
    ``flush`` on exactly such continuation lines, and would otherwise wait for its timeout."""

    def __init__(self, protocol: aioimaplib.IMAP4ClientProtocol, *args: str) -> None:
        super().__init__(*args)
        self._protocol = protocol

    def flush(self) -> None:
        transport = self._protocol.transport
        if transport is not None:
            transport.write(b"\r\n")


@dataclass(frozen=True)
class Listed:
    """One message as a listing shows it (nothing of its body)."""

    uid: int
    sender: str
    subject: str
    date: str
    flags: tuple[str, ...]
    size: int


class Mailbox:
    """One IMAP connection.  ``lost`` is set when the server hangs up; every command then fails at once."""

    def __init__(self, config: EmailConfig) -> None:
        self._config = config
        self._client: aioimaplib.IMAP4 | None = None
        self.lost = asyncio.Event()
        self.exists_seen = False  # an untagged EXISTS came with some response: new mail

    @property
    def client(self) -> aioimaplib.IMAP4:
        if self._client is None:
            raise ImapError("not connected")
        return self._client

    async def connect(self) -> None:
        c = self._config
        self.lost.clear()
        # IMAP4 itself takes an SSL context (IMAP4_SSL would drop conn_lost_cb).
        client = aioimaplib.IMAP4(
            host=c.imap_host,
            port=c.imap_port or (993 if c.imap_security == "tls" else 143),
            timeout=c.command_timeout_s,
            conn_lost_cb=lambda _: self.lost.set(),
            ssl_context=c.tls_context() if c.imap_security == "tls" else None,
        )
        self._client = client
        await asyncio.wait_for(client.wait_hello_from_server(), c.command_timeout_s)
        if c.imap_security == "starttls":
            await self._starttls(client)
        assert c.imap_user is not None
        if c.auth == "password":
            assert c.imap_password is not None
            response = await self.command(client.login(c.imap_user, c.imap_password.get_secret_value()))
        else:
            response = await self._authenticate(client, c.imap_user)
        if response.result != "OK":
            if c.auth != "password":
                oauth.refused(c)  # revoked or expired early: the next attempt fetches a new token
            raise ImapError(f"login refused: {text_of(response)}")

    async def _authenticate(self, client: aioimaplib.IMAP4, user: str) -> aioimaplib.Response:
        """SASL with an OAuth2 access token, sent as the initial response (SASL-IR)."""
        mechanism = self._config.auth.upper()
        if not client.protocol.capabilities:  # not in the greeting: ask
            await self.command(client.protocol.capability())
        offered = sorted(c[5:] for c in client.protocol.capabilities if c.startswith("AUTH="))
        if mechanism not in offered:
            raise ImapError(f"the server does not offer AUTH={mechanism} (it offers {', '.join(offered) or 'none'})")
        try:
            token = await oauth.access_token(self._config)
        except oauth.TokenError as exc:
            raise ImapError(f"no OAuth2 token: {exc}") from None
        encode = oauth.xoauth2 if self._config.auth == "xoauth2" else oauth.oauthbearer
        initial = base64.b64encode(encode(user, token).encode()).decode()
        protocol = client.protocol
        command = _SaslCommand(protocol, "AUTHENTICATE", protocol.new_tag(), mechanism, initial)
        response = await self.command(protocol.execute(command))
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH  # what aioimaplib's own login and xoauth2 do
        return response

    async def _starttls(self, client: aioimaplib.IMAP4) -> None:
        """aioimaplib has no STARTTLS: send the command, then upgrade the transport in place."""
        protocol = client.protocol
        response = await self.command(protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag())))
        if response.result != "OK":
            raise ImapError(f"STARTTLS refused: {text_of(response)}")
        loop = asyncio.get_running_loop()
        context, host = self._config.tls_context(), self._config.imap_host
        protocol.transport = await loop.start_tls(protocol.transport, protocol, context, server_hostname=host)
        await self.command(protocol.capability())  # capabilities may differ once encrypted

    async def select(self, folder: str) -> int:
        """Select ``folder``; its UIDVALIDITY."""
        response = await self.command(self.client.select(quote(folder)))
        if response.result != "OK":
            raise ImapError(f"cannot select {folder}: {text_of(response)}")
        for line in response.lines:
            if match := _UIDVALIDITY.search(bytes(line)):
                return int(match.group(1))
        raise ImapError("the server sent no UIDVALIDITY")

    async def command(self, pending: Awaitable[aioimaplib.Response]) -> aioimaplib.Response:
        """Every command gets a deadline; a lost connection ends it at once."""
        if self.lost.is_set():
            raise ImapError("connection lost")
        try:
            response = await asyncio.wait_for(pending, self._config.command_timeout_s)
        except TimeoutError as exc:
            raise ImapError(f"no answer within {self._config.command_timeout_s}s") from exc
        # New mail is announced in whatever response comes next, not only during IDLE.
        lines = getattr(response, "lines", None) or []
        if any(isinstance(line, bytes) and line.endswith(b" EXISTS") for line in lines):
            self.exists_seen = True
        return response

    async def uid(self, *args: str) -> aioimaplib.Response:
        """A UID command that must succeed."""
        response = await self.command(self.client.uid(*args))
        if response.result != "OK":
            raise ImapError(f"UID {args[0].upper()} failed: {text_of(response)}")
        return response

    async def size(self, uid: int) -> int | None:
        """RFC822.SIZE of a message; None if it is gone (expunged meanwhile)."""
        response = await self.uid("fetch", str(uid), "(RFC822.SIZE)")
        for line in response.lines[:-1]:
            if match := _FETCH_SIZE.search(bytes(line)):
                return int(match.group(1))
        return None

    async def fetch(self, uid: int, section: str) -> bytes | None:
        """One section (``BODY.PEEK[]``, ``BODY.PEEK[HEADER]``) of a message; None if it is gone."""
        response = await self.uid("fetch", str(uid), section)
        bodies = [bytes(line) for line in response.lines if isinstance(line, bytearray)]
        return bodies[0] if bodies else None

    async def search(self, *criteria: str) -> list[int]:
        response = await self.command(self.client.uid_search(*criteria))
        if response.result != "OK":
            raise ImapError(f"search failed: {text_of(response)}")
        return sorted({int(n) for line in response.lines[:-1] for n in bytes(line).split() if n.isdigit()})

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aioimaplib.AioImapException, OSError, TimeoutError, ImapError):
                await asyncio.wait_for(client.logout(), 5)


def text_of(response: aioimaplib.Response) -> str:
    return b" ".join(bytes(line) for line in response.lines[-1:]).decode(errors="replace")[:200]


def quote(name: str) -> str:
    """An IMAP quoted string (folder names may hold spaces)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
