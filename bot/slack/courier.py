"""What Slack does for scheduled jobs: deliver a run's result to a channel, and the ``slack_post`` tool.

Both post as the bot to a channel (or a thread in it) that nobody addressed: the text may echo a
stranger's mail, so it never pings anyone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.core import DeliveryError, ToolRefused, ToolSpec
from bot.slack.reply import SLACK_ERRORS, Thread

log = structlog.get_logger(__name__)


class SlackCourier:
    """``deliver`` (the Courier for ``slack:`` targets) and ``slack_post``, limited to ``allowlist``."""

    def __init__(self, client: AsyncWebClient, allowlist: frozenset[str], team: Callable[[], str]) -> None:
        self._client, self._allowlist, self._team = client, allowlist, team

    async def deliver(self, target: str, subject: str, text: str) -> None:
        """A job's result into ``C123``, ``#name`` or ``C123:<thread ts>``."""
        channel, _, thread_ts = target.partition(":")
        try:
            await self._post_markdown(channel, thread_ts or None, text)
        except SLACK_ERRORS as exc:
            raise DeliveryError(_slack_reason(exc)) from exc

    def toolsets(self) -> dict[str, list[ToolSpec]]:
        """``slack_post``: scheduled runs may post to the channels in ``triage.slack_channels``, nowhere else."""
        return {
            "slack": [
                ToolSpec(
                    name="slack_post",
                    description="Post a message (Markdown) to one of the allowed Slack channels, "
                    "optionally as a reply in a thread.",
                    input_schema={
                        "type": "object",
                        "properties": {
                            "channel": {"type": "string", "description": "channel id (C…) or #name"},
                            "text": {"type": "string"},
                            "thread_ts": {"type": "string", "description": "reply in this thread (optional)"},
                        },
                        "required": ["channel", "text"],
                    },
                    handler=self._slack_post,
                )
            ]
        }

    async def _slack_post(self, conversation_id: str, arguments: Mapping[str, Any]) -> str:
        channel, text = str(arguments.get("channel") or ""), str(arguments.get("text") or "")
        if channel.removeprefix("#") not in self._allowlist:
            allowed = ", ".join(sorted(self._allowlist)) or "none"
            raise ToolRefused(f"posting to {channel!r} is not allowed (allowed: {allowed})")
        if not text.strip():
            raise ToolRefused("the text is empty")
        thread_ts = str(arguments.get("thread_ts") or "") or None
        log.info("slack_post_tool", conversation=conversation_id, channel=channel)
        try:
            await self._post_markdown(channel, thread_ts, text)
        except SLACK_ERRORS as exc:
            return f"Slack refused the post: {_slack_reason(exc)}"
        return f"Posted to {channel}."

    async def _post_markdown(self, channel: str, thread_ts: str | None, text: str) -> None:
        # A job's or slack_post's text can echo a stranger's mail: it never pings anyone.
        thread = Thread(self._client, channel, thread_ts, self._team(), "", dm=False, mentions=False)
        await thread.post_all(text)


def _slack_reason(exc: Exception) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or exc)
    return str(exc)[:200] or type(exc).__name__
