"""Tool approvals as Block Kit buttons in the thread; a click resolves the waiting ``can_use_tool``."""

from __future__ import annotations

import asyncio
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from slack_sdk.errors import SlackApiError, SlackClientError

from bot.core import ToolRequest, Verdict
from bot.slack.reply import Thread

log = structlog.get_logger(__name__)

APPROVE, DENY = "agentd_approve", "agentd_deny"


class Click(enum.StrEnum):
    ACCEPTED = "accepted"
    NOT_ALLOWED = "not_allowed"
    UNKNOWN = "unknown"


@dataclass(eq=False)
class _Pending:
    allowed: frozenset[str]
    verdict: asyncio.Future[tuple[Verdict, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Approvals:
    """Approval requests waiting for a click, by id.  They live only as long as their turn."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}

    def approver(self, thread: Thread, allowed: frozenset[str]) -> ThreadApprover:
        return ThreadApprover(self, thread, allowed)

    def click(self, approval_id: str, user: str, approved: bool) -> Click:
        pending = self._pending.get(approval_id)
        if pending is None or pending.verdict.done():
            return Click.UNKNOWN
        if user not in pending.allowed:
            return Click.NOT_ALLOWED
        pending.verdict.set_result((Verdict.APPROVED if approved else Verdict.DENIED, user))
        return Click.ACCEPTED

    async def wait(self, approval_id: str, allowed: frozenset[str]) -> tuple[Verdict, str | None]:
        pending = self._pending[approval_id] = _Pending(allowed)
        try:
            return await asyncio.wait_for(pending.verdict, self._timeout_s)
        except TimeoutError:
            return Verdict.TIMED_OUT, None
        finally:
            del self._pending[approval_id]


class ThreadApprover:
    """The ``Approver`` for one Slack turn: asks in its thread, answers with the click or a timeout."""

    def __init__(self, approvals: Approvals, thread: Thread, allowed: frozenset[str]) -> None:
        self._approvals, self._thread, self._allowed = approvals, thread, allowed

    async def __call__(self, request: ToolRequest) -> Verdict:
        approval_id = uuid.uuid4().hex
        client, channel = self._thread.client, self._thread.channel
        try:
            posted = await client.chat_postMessage(
                channel=channel,
                thread_ts=self._thread.thread_ts,
                text=f"Approval needed: the agent wants to run {request.tool}",
                blocks=request_blocks(request, approval_id),
            )
        except (SlackApiError, SlackClientError) as exc:
            log.error("slack_approval_not_posted", tool=request.tool, error=str(exc)[:200])
            return Verdict.DENIED
        verdict, user = await self._approvals.wait(approval_id, self._allowed)
        log.info("slack_approval", tool=request.tool, verdict=str(verdict), user=user)
        line = verdict_line(request, verdict, user)
        try:
            await client.chat_update(channel=channel, ts=str(posted["ts"]), text=line, blocks=[_section(line)])
        except (SlackApiError, SlackClientError) as exc:
            log.warning("slack_approval_not_updated", error=str(exc)[:200])
        return verdict


def request_blocks(request: ToolRequest, approval_id: str) -> list[dict[str, Any]]:
    summary = request.summary.replace("```", "` ` `")  # a fence in the summary must not end ours
    return [
        _section(f":raised_hand: The agent wants to run *{request.tool}*:\n```{summary}```"),
        {
            "type": "actions",
            "block_id": "agentd_approval",
            "elements": [
                _button("Approve", APPROVE, approval_id, "primary"),
                _button("Deny", DENY, approval_id, "danger"),
            ],
        },
    ]


def verdict_line(request: ToolRequest, verdict: Verdict, user: str | None) -> str:
    if verdict is Verdict.APPROVED:
        return f":white_check_mark: *{request.tool}* approved by <@{user}>."
    if verdict is Verdict.DENIED:
        by = f" by <@{user}>" if user else ""
        return f":no_entry: *{request.tool}* denied{by}; it was not run."
    return f":hourglass: Nobody approved *{request.tool}* in time; it was not run (timed out, not denied)."


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _button(label: str, action_id: str, value: str, style: str) -> dict[str, Any]:
    return {
        "type": "button",
        "text": {"type": "plain_text", "text": label},
        "action_id": action_id,
        "value": value,
        "style": style,
    }
