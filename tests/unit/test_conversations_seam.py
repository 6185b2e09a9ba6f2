"""A channel against a fake ``Conversations``: no pool and no CLI, only the protocol the channels are typed against.

The real Slack channel (real slack-bolt, fake Slack) takes its messages in, submits them to the fake, streams
the fake's reply into the thread and passes its control words on; nothing of ``bot.pool`` is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from bot.config import AgentConfig, Settings, SlackConfig, StoreConfig
from bot.core import Conversations, Inbound, Outcome, SessionInfo
from bot.slack import SlackChannel
from bot.store.sqlite import SqliteStore
from tests.fakes.slack import FakeSlack
from tests.support.slack_harness import wait_done, wait_reply

CHANNEL = "C0GENERAL"


class FakeTurn:
    """A turn that is already answered: its reply streams in two deltas, its outcome is resolved."""

    def __init__(self, inbound: Inbound) -> None:
        self._parts = ("pong: ", inbound.text)
        reply = "".join(self._parts)
        self._outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._outcome.set_result(Outcome(inbound.conversation_id, reply, "fake-session", 0.0, 1))

    async def stream(self) -> AsyncIterator[str]:
        for part in self._parts:
            yield part

    @property
    def outcome(self) -> asyncio.Future[Outcome]:
        return self._outcome


class FakeConversations:
    """Records what a channel asks of the engine."""

    def __init__(self) -> None:
        self.submitted: list[Inbound] = []
        self.resets: list[str] = []
        self.cancels: list[str] = []

    async def submit(self, inbound: Inbound) -> FakeTurn:
        self.submitted.append(inbound)
        return FakeTurn(inbound)

    async def ask(self, inbound: Inbound) -> Outcome:
        return await (await self.submit(inbound)).outcome

    async def info(self, conversation_id: str) -> SessionInfo | None:
        return None

    async def reset(self, conversation_id: str) -> None:
        self.resets.append(conversation_id)

    async def cancel(self, conversation_id: str) -> bool:
        self.cancels.append(conversation_id)
        return False


async def test_the_slack_channel_serves_a_thread_from_a_fake_conversations(tmp_path: Path, slack: FakeSlack) -> None:
    settings = Settings(
        agent=AgentConfig(api_key="sk-unused"),
        store=StoreConfig(data_dir=tmp_path / "data"),
        slack=SlackConfig(bot_token="xoxb-test-bot", app_token="xapp-test-app", api_url=slack.url),
    )
    fake = FakeConversations()
    conversations: Conversations = fake  # the fake satisfies the protocol the channel is typed against
    store = SqliteStore(tmp_path / "state.db", ttl_days=1)
    channel = SlackChannel(settings, settings.profile(settings.slack.profile), conversations, store)
    await channel.start()
    try:
        await slack.wait_connected()
        event = slack.message_event("hello seam", mention=True)
        await slack.send_event(event)
        root = str(event["ts"])
        # The channel names the sender in the prompt; the fake echoes it back, so the reply shows that too.
        assert (await wait_reply(slack, CHANNEL, root, "hello seam")).startswith("pong: ")
        assert await wait_done(slack, CHANNEL, root) == ["white_check_mark"]
        [inbound] = fake.submitted
        assert (inbound.source, inbound.user, inbound.profile) == ("slack", "U0ALICE", "chat")
        assert "hello seam" in inbound.text

        await slack.send_event(slack.message_event("!cancel", thread_ts=root))
        await wait_reply(slack, CHANNEL, root, "Nothing is running here.")
        await slack.send_event(slack.message_event("!reset", thread_ts=root))
        await wait_reply(slack, CHANNEL, root, "fresh session")
        assert fake.cancels == fake.resets == [inbound.conversation_id]
    finally:
        await channel.stop_intake()
        await channel.close()
        await store.close()
