"""The Slack channel's pure rules: event translation, skip and access rules, splitting, mrkdwn."""

from __future__ import annotations

import pytest

from bot.config import SlackConfig
from bot.slack import events
from bot.slack.reply import split_text, to_mrkdwn

ME = events.Identity(team_id="T1", user_id="U0BOT", bot_id="B0BOT")
CONFIG = SlackConfig(bot_token="xoxb-1", app_token="xapp-1")


def event(**fields: object) -> dict[str, object]:
    return {"type": "message", "channel": "C1", "ts": "10.1", "user": "U1", "text": "hi", **fields}


def test_mention_is_stripped_and_thread_root_is_the_message_itself() -> None:
    message = events.parse(event(type="app_mention", text="<@U0BOT> do it"), "T1", ME)
    assert (message.text, message.thread_ts, message.mentioned, message.in_thread) == ("do it", "10.1", True, False)
    assert message.conversation_id == "slack:T1:C1:10.1"


def test_reply_in_thread_keys_by_the_root() -> None:
    message = events.parse(event(thread_ts="9.0"), "T1", ME)
    assert message.conversation_id == "slack:T1:C1:9.0" and message.in_thread


@pytest.mark.parametrize("bad", [{"channel": None}, {"ts": ""}, {"channel": 5}])
def test_events_without_channel_or_ts_are_bad(bad: dict[str, object]) -> None:
    with pytest.raises(events.BadEvent):
        events.parse(event(**bad), "T1", ME)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"subtype": "message_changed"}, events.Skip.EDIT_OR_DELETE),
        ({"subtype": "message_deleted"}, events.Skip.EDIT_OR_DELETE),
        ({"user": "U0BOT"}, events.Skip.OWN),
        ({"bot_id": "B0BOT"}, events.Skip.OWN),
        ({"bot_id": "B9", "subtype": "bot_message"}, events.Skip.BOT),
        ({"bot_id": "B9"}, events.Skip.BOT),
        ({"text": "<@U0BOT> hi"}, events.Skip.MENTION_EVENT_HANDLES_IT),
        ({"subtype": "file_share"}, None),
        ({"channel": "D1", "channel_type": "im", "text": "<@U0BOT> hi"}, None),
    ],
)
def test_skip_rules(fields: dict[str, object], reason: events.Skip | None) -> None:
    raw = event(**fields)
    assert events.skip_reason(raw, events.parse(raw, "T1", ME), ME, CONFIG) == reason


def test_access_rules() -> None:
    config = SlackConfig(bot_token="x", app_token="y", allowed_users=["U1"], allowed_channels=["C1"])
    assert events.refusal(events.parse(event(), "T1", ME), config) is None
    assert events.refusal(events.parse(event(user="U2"), "T1", ME), config) == events.Refusal.USER
    assert events.refusal(events.parse(event(channel="C2"), "T1", ME), config) == events.Refusal.CHANNEL
    assert events.refusal(events.parse(event(channel="D2", channel_type="im"), "T1", ME), config) is None


@pytest.mark.parametrize(("text", "word"), [("!reset", "reset"), (" !STATS ", "stats"), ("!cancel now", None)])
def test_control_words(text: str, word: str | None) -> None:
    assert events.parse(event(text=text), "T1", ME).control == word


def test_thread_context_quotes_earlier_messages_only() -> None:
    history = [
        {"ts": "1.0", "user": "U1", "text": "first"},
        {"ts": "2.0", "user": "U0BOT", "text": "mine"},
        {"ts": "3.0", "user": "U2", "text": "the mention itself"},
    ]
    context = events.thread_context(history, "3.0", ME, limit=10)
    assert "<@U1>: first" in context and "you (the agent): mine" in context
    assert "the mention itself" not in context and "not instructions" in context


def test_split_keeps_every_word_within_the_limit() -> None:
    text = "\n\n".join(" ".join(f"w{i}-{j}" for j in range(50)) for i in range(100))
    pieces = split_text(text, 1000)
    assert all(len(p) <= 1000 for p in pieces) and " ".join(pieces).split() == text.split()
    assert split_text("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]
    assert split_text("", 10) == [""]


def test_markdown_becomes_mrkdwn() -> None:
    assert to_mrkdwn("**bold** and [link](https://example.com)") == "*bold* and <https://example.com|link>"
