"""Which conversation a mail belongs to, and who may continue it.

Every recipient of a thread (and whoever they forward it to) knows its
Message-IDs, and a stranger chooses his own Message-ID, References and
In-Reply-To: no key he names may be enough to continue someone else's
conversation.  So a conversation keeps its participants (its root's From, To
and Cc, and everyone answered in it), and a mail joins a thread only if its
sender is one of them.
"""

from __future__ import annotations

import json
import uuid

import structlog

from bot.config import EmailConfig
from bot.core import Store
from bot.mail.parse import Mail, addresses
from bot.store import keys

log = structlog.get_logger(__name__)

# A conversation's participants are its root's From, To and Cc: a huge Cc list is cut here.
MAX_PARTICIPANTS = 100
# Only the most recent References are looked up: enough for any real thread, bounded for a hostile one.
MAX_REFERENCES = 20


class Threads:
    """The thread binding (Message-ID to conversation) and each conversation's participants, in the store."""

    def __init__(self, config: EmailConfig, store: Store) -> None:
        self._config, self._store = config, store

    async def conversation(self, mail: Mail) -> str:
        """Mailbox mode: one conversation. Thread mode: the thread any known Message-ID belongs to, else its root."""
        if self._config.conversation == "mailbox":
            conversation = f"email:mailbox:{self._config.mailbox}"
        else:
            conversation = await self._thread_conversation(mail)
        # A Message-ID already mapped stays with its thread: a stranger reusing one (say the agent's reply,
        # learned from a forward) must not re-point it and pull the thread's next reply into his conversation.
        if await self._store.get_value(keys.mail_thread(mail.message_id)) is None:
            await self._bind(mail.message_id, conversation)
        return conversation

    async def bind_reply(self, reply_id: str, conversation: str, sender: str) -> None:
        """The agent's reply belongs to the conversation, and the sender it answers may continue it."""
        await self._bind(reply_id, conversation)
        await self._add_participants(conversation, frozenset({sender}))

    async def _thread_conversation(self, mail: Mail) -> str:
        """The thread's conversation if the sender takes part in it; else one of the sender's own.

        Every candidate is checked against its participants; an outsider whose every candidate is
        taken gets a fresh key nobody can name.
        """
        candidates = [*await self._known_threads(mail), f"email:{_root(mail)}", f"email:{mail.message_id}"]
        unclaimed = None
        for conversation in dict.fromkeys(candidates):
            participants = await self._participants(conversation)
            if mail.sender in participants:
                return conversation
            if not participants and unclaimed is None:
                unclaimed = conversation
            elif participants:
                log.info("email_thread_outsider", conversation=conversation, message_id=mail.message_id)
        conversation = unclaimed or f"email:{mail.message_id}#{uuid.uuid4().hex[:12]}"
        await self._add_participants(conversation, _participants_of(mail))
        return conversation

    async def _participants(self, conversation: str) -> frozenset[str]:
        raw = await self._store.get_value(keys.mail_participants(conversation))
        return frozenset(json.loads(raw)) if raw else frozenset()

    async def _add_participants(self, conversation: str, added: frozenset[str]) -> None:
        known = await self._participants(conversation)
        if added <= known:
            return
        value = json.dumps([*sorted(known), *sorted(added - known)][:MAX_PARTICIPANTS])
        await self._store.put_value(keys.mail_participants(conversation), value, keys.MAIL_RECORD_TTL_S)

    async def _known_threads(self, mail: Mail) -> list[str]:
        """The conversations of the Message-IDs this mail names, the most recent reference first."""
        found = []
        recent = mail.references[-MAX_REFERENCES:]  # a stranger's References can be thousands long
        for known_id in dict.fromkeys([*reversed(recent), mail.in_reply_to]):
            if known_id and (known := await self._store.get_value(keys.mail_thread(known_id))):
                found.append(known)
        return found

    async def _bind(self, message_id: str, conversation: str) -> None:
        await self._store.put_value(keys.mail_thread(message_id), conversation, keys.MAIL_RECORD_TTL_S)


def _root(mail: Mail) -> str:
    if mail.references:
        return mail.references[0]
    return mail.in_reply_to or mail.message_id


def _participants_of(mail: Mail) -> frozenset[str]:
    """The sender and everyone the mail was addressed to (From, To, Cc), lower case."""
    found: set[str] = set()
    for name in ("from", "to", "cc"):
        for value in mail.header(name):
            found.update(address.lower() for _, address in addresses(value) if "@" in address)
    sender = {mail.sender} if mail.sender else set()
    return frozenset(sender | set(sorted(found - sender)[: MAX_PARTICIPANTS - 1]))
