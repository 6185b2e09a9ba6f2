"""Tool approvals as Block Kit buttons in the thread; a click resolves the waiting ``can_use_tool``."""

from __future__ import annotations

import asyncio
import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from slack_sdk.errors import SlackApiError, SlackClientError

from bot.core import ToolRequest, Verdict
from bot.files import safe_filename
from bot.slack.reply import Thread

log = structlog.get_logger(__name__)

APPROVE, DENY = "agentd_approve", "agentd_deny"
SECTION_CHARS = 3_000  # what a section block holds
PREVIEW_CHARS = 2_400  # the start of a long input: leaves room for labels, heading and the note
LABEL_CHARS = 80
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


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


@dataclass(frozen=True)
class InputView:
    """How an approval request shows the tool input: the blocks, and the complete input when they can't hold it."""

    blocks: tuple[dict[str, Any], ...]
    attachment: str | None  # the whole input as JSON, to upload before the buttons; None if shown in full


class ThreadApprover:
    """The ``Approver`` for one Slack turn: asks in its thread, answers with the click or a timeout."""

    def __init__(self, approvals: Approvals, thread: Thread, allowed: frozenset[str]) -> None:
        self._approvals, self._thread, self._allowed = approvals, thread, allowed

    async def __call__(self, request: ToolRequest) -> Verdict:
        approval_id = uuid.uuid4().hex
        view = input_view(request)
        try:
            if view.attachment is not None:
                await self._attach(request, view.attachment)
            posted = await self._thread.client.chat_postMessage(
                channel=self._thread.channel,
                thread_ts=self._thread.thread_ts,
                text=f"Approval needed: the agent wants to run {request.tool}",
                blocks=[*view.blocks, _actions(approval_id)],
            )
        except (SlackApiError, SlackClientError) as exc:
            # Nobody can see exactly what would run: it does not run.
            log.error("slack_approval_not_posted", tool=request.tool, error=str(exc)[:200])
            return Verdict.DENIED
        verdict, user = await self._approvals.wait(approval_id, self._allowed)
        log.info("slack_approval", tool=request.tool, verdict=str(verdict), user=user)
        await self._record(str(posted["ts"]), view, verdict_line(request, verdict, user))
        return verdict

    async def _attach(self, request: ToolRequest, content: str) -> None:
        name = f"{safe_filename(request.tool, 'tool')}-input.json"
        await self._thread.client.files_upload_v2(
            content=content,
            filename=name,
            title=f"Complete input of {request.tool} (awaiting approval)",
            channel=self._thread.channel,
            thread_ts=self._thread.thread_ts,
        )

    async def _record(self, ts: str, view: InputView, line: str) -> None:
        """Replace the buttons by the verdict; the input stays shown, as the record of what was decided."""
        try:
            await self._thread.client.chat_update(
                channel=self._thread.channel, ts=ts, text=line, blocks=[*view.blocks, _section(line)]
            )
        except (SlackApiError, SlackClientError) as exc:
            log.warning("slack_approval_not_updated", error=str(exc)[:200])


def input_view(request: ToolRequest) -> InputView:
    """Every field of the tool input, inline when one section block holds it exactly, else a preview and a file."""
    fields = dict(request.input) or {"summary": request.summary}
    heading = f":raised_hand: The agent wants to run *{_label(request.tool)}* with this input:"
    full, exact = _render(fields, budget=None)
    if exact and len(heading) + 1 + len(full) <= SECTION_CHARS:
        return InputView((_section(f"{heading}\n{full}"),), None)
    preview, _ = _render(fields, budget=PREVIEW_CHARS)
    note = (
        "_The input is too long to show here, or holds characters a message would alter: the start is shown, "
        "and the complete input is in the file just above._"
    )
    attachment = json.dumps(fields, ensure_ascii=False, indent=2, default=str)
    return InputView((_section(f"{heading}\n{preview}\n{note}"),), attachment)


def _render(fields: dict[str, Any], budget: int | None) -> tuple[str, bool]:
    """mrkdwn for each field (label, then the value in a code block); True if every value is shown exactly."""
    parts: list[str] = []
    exact = True
    left = budget
    for key, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2, default=str)
        exact = exact and not _alters(text)
        shown, cut = _escaped_prefix(text, left)
        part = f"*{_label(key)}*\n```{shown}{'…' if cut else ''}```" if text else f"*{_label(key)}*: _empty_"
        parts.append(part)
        if left is not None:
            left -= len(part)
            if left <= 0:
                break
    return "\n".join(parts), exact


def _alters(text: str) -> bool:
    """Backticks that touch (a fence inside a value, or next to ours) cannot be shown verbatim in a code block."""
    return "``" in text or text.startswith("`") or text.endswith("`")


def _escaped_prefix(text: str, budget: int | None) -> tuple[str, bool]:
    """``text`` escaped for mrkdwn, cut to ``budget`` characters (never inside an escape); True if cut.

    Slack wants &, < and > escaped (it shows them as typed).  A zero-width space keeps any two backticks
    apart, so no fence can form inside ours.
    """
    out: list[str] = []
    used, previous = 0, ""
    for char in text:
        piece = "\u200b`" if char == "`" and previous == "`" else _ENTITIES.get(char, char)
        if budget is not None and used + len(piece) > budget:
            return "".join(out), True
        out.append(piece)
        used, previous = used + len(piece), char
    return "".join(out), False


def _escape(text: str) -> str:
    return _escaped_prefix(text, None)[0]


def _label(name: str) -> str:
    """A field or tool name as a bold label (names are identifiers; a freak one is shortened, not trusted)."""
    plain = name.replace("*", "").replace("`", "").replace("\n", " ")
    return _escape(plain if len(plain) <= LABEL_CHARS else plain[:LABEL_CHARS] + "…") or "(unnamed)"


def _actions(approval_id: str) -> dict[str, Any]:
    return {
        "type": "actions",
        "block_id": "agentd_approval",
        "elements": [
            _button("Approve", APPROVE, approval_id, "primary"),
            _button("Deny", DENY, approval_id, "danger"),
        ],
    }


def verdict_line(request: ToolRequest, verdict: Verdict, user: str | None) -> str:
    if verdict is Verdict.APPROVED:
        return f":white_check_mark: *{_label(request.tool)}* approved by <@{user}>."
    if verdict is Verdict.DENIED:
        by = f" by <@{user}>" if user else ""
        return f":no_entry: *{_label(request.tool)}* denied{by}; it was not run."
    return f":hourglass: Nobody approved *{_label(request.tool)}* in time; it was not run (timed out, not denied)."


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:SECTION_CHARS]}}


def _button(label: str, action_id: str, value: str, style: str) -> dict[str, Any]:
    return {
        "type": "button",
        "text": {"type": "plain_text", "text": label},
        "action_id": action_id,
        "value": value,
        "style": style,
    }
