"""Slack payloads nobody here wrote: fixtures from the Slack SDKs' own test suites, through the real daemon.

Each file in ``tests/data/slack`` (origins in its SOURCES.md) is POSTed, signed, to the HTTP Events
endpoint of a running daemon, and pushed as a Socket Mode envelope to another, against the fake Slack
and the real CLI. Each must get a 200 (an ack) and exactly
one outcome, read from ``agentd_channel_messages_total{channel="slack"}``: answered (``accepted``, then
a threaded reply and ✅), or ignored for the reason listed here. The revocation payloads stop the
Slack channel and each gets a daemon of its own.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from bot import metrics
from tests.fakes.model import FakeModel
from tests.fakes.slack import FakeSlack
from tests.support import paths
from tests.support.helpers import wait_for, wait_until
from tests.support.slack_harness import SlackDaemon, reply_text, running, wait_done

DATA = paths.DATA / "slack"

ANSWERED = "accepted"
# The one fate each payload must get.
EXPECTED = {
    "shared_channel_app_mention": ANSWERED,
    "slack_connect_app_mention_enterprise_actor": ANSWERED,
    "assistant_dm_user_message": ANSWERED,  # a reply in an AI-app DM thread: a DM, so addressed
    "slack_connect_app_mention_without_ts": "bad_event",  # trimmed by the SDK's authors: no ts to reply to
    "message_file_share": "not_addressed",  # a file shared in a channel, no mention: nothing is downloaded
    "message_file_share_private_channel": "not_addressed",
    "message_channel_unaddressed": "not_addressed",
    "message_org_install_null_team": "not_addressed",  # mentions the SDK test's bot, not this one
    "message_thread_broadcast": "not_addressed",  # a thread the agent never joined
    "slack_connect_message_unaddressed": "not_addressed",
    "slack_connect_message_mentioning_another_bot": "not_addressed",
    "message_changed": "edit_or_delete",
    "message_deleted": "edit_or_delete",
    "slack_connect_message_channel_name": "edit_or_delete",
    "message_from_another_app": "bot_message",
    "message_bot_message_classic": "bot_message",
    "message_bot_message_response_url": "bot_message",
    # Outside the manifest, or not agentd's button: acknowledged and ignored.
    "shared_channel_reaction_added": "ignored",
    "shared_channel_member_joined_channel": "ignored",
    "shared_channel_member_left_channel": "ignored",
    "slack_connect_reaction_added": "ignored",
    "slack_connect_file_shared": "ignored",
    "slack_connect_message_metadata_posted": "ignored",
    "app_home_opened_org_install": "ignored",
    "team_access_granted": "ignored",
    "function_executed": "ignored",
    "block_actions_foreign_button": "ignored",
}
# The AI-app surface's events (bot/slack/assistant.py answers them where it is built): a 200 and no turn.
AI_APP = ("assistant_thread_started", "assistant_thread_context_changed")
STOPS = {
    "shared_channel_app_uninstalled": "the app was uninstalled from the workspace",
    "shared_channel_tokens_revoked": "the bot token was revoked",
    "tokens_revoked_no_team": "the bot token was revoked",
}


def load(name: str) -> dict[str, Any]:
    payload = json.loads((DATA / f"{name}.json").read_text())
    assert isinstance(payload, dict)
    return payload


def slack_fates() -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in metrics.CHANNEL_MESSAGES.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("channel") == "slack":
                counts[sample.labels["fate"]] += int(sample.value)
    return counts


async def deliver(daemon: SlackDaemon, name: str, mode: str) -> int:
    """Send one fixture as Slack would; the HTTP status, or 200 once a Socket Mode envelope is acked.

    HTTP: interactivity as a form, events as JSON, signed. Socket Mode: an envelope of its type.
    """
    payload = load(name)
    interactive = payload.get("type") == "block_actions"
    if not interactive:
        # The SDK tests reuse event ids (Ev111): a unique one per file, so the retry guard does not join them.
        payload["event_id"] = f"Ev-{name}"
    if mode == "socket":
        envelope = await daemon.slack.push(payload, type="interactive" if interactive else "events_api")
        await wait_until(lambda: envelope in daemon.slack.acks, what=f"the envelope of {name} acked")
        return 200
    if interactive:
        form = urlencode({"payload": json.dumps(payload)}).encode()
        return await daemon.post_event(form, content_type="application/x-www-form-urlencoded")
    return await daemon.post_event(json.dumps(payload).encode())


def test_every_fixture_has_an_expected_outcome_and_a_source() -> None:
    files = {path.stem for path in DATA.glob("*.json")}
    assert files == set(EXPECTED) | set(AI_APP) | set(STOPS)
    sources = (DATA / "SOURCES.md").read_text()
    assert all(f"`{name}.json`" in sources for name in files)


@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_sdk_payloads_each_get_a_200_and_exactly_one_outcome(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack, mode: str
) -> None:
    async with running(tmp_path, fake_model, slack, mode=mode) as daemon:
        for name, fate in EXPECTED.items():
            assert await outcome(daemon, name, mode) == Counter({fate: 1}), name
            if fate == ANSWERED:
                await answered(slack, fake_model, load(name)["event"])
        before = slack_fates()
        for name in AI_APP:
            assert await deliver(daemon, name, mode) == 200, name
        sentinel = slack.message_event("sentinel after the SDK payloads", mention=True)
        if mode == "socket":
            await slack.push(slack.event_payload(sentinel))
        else:
            assert await daemon.post_event(json.dumps(slack.event_payload(sentinel)).encode()) == 200
        await answered(slack, fake_model, sentinel)
        delta = slack_fates() - before
        assert delta[ANSWERED] == 1 and set(delta) <= {ANSWERED, "ignored"}, delta
        assert len(fake_model.turn_requests()) == 4, "three answered payloads and the sentinel, nothing else"


async def outcome(daemon: SlackDaemon, name: str, mode: str) -> Counter[str]:
    """The fates counted for one fixture: it must be answered 200 (acked), then something must be counted."""
    before = slack_fates()
    assert await deliver(daemon, name, mode) == 200, name
    await wait_until(lambda: slack_fates() != before, what=f"an outcome for {name}")
    return slack_fates() - before


async def answered(slack: FakeSlack, fake_model: FakeModel, event: dict[str, Any]) -> None:
    channel, ts = str(event["channel"]), str(event["ts"])
    assert await wait_done(slack, channel, ts) == ["white_check_mark"]
    assert "echo:" in reply_text(slack, channel, str(event.get("thread_ts") or ts))


@pytest.mark.parametrize("name", sorted(STOPS))
async def test_sdk_revocation_payloads_stop_the_slack_channel(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack, name: str
) -> None:
    async with running(tmp_path, fake_model, slack, mode="http") as daemon:
        assert await deliver(daemon, name, "http") == 200
        await wait_for(lambda: stopped(daemon, STOPS[name]), what="the Slack channel to stop")
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{daemon.url}/v1/conversations/api-1/messages", json={"text": "still serving"}) as response,
        ):
            assert response.status == 200 and "still serving" in (await response.json())["reply"]


async def stopped(daemon: SlackDaemon, reason: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/v1/status") as response:
        slack = next(c for c in (await response.json())["channels"] if c["name"] == "slack")
    return slack["connected"] is False and slack["stopped"] == reason
