"""The tool gate: every tool call the agent makes is decided here, by the turn's policy and the conversation's reach.

Security-critical.  What it guarantees, for every call the CLI is about to run:

* A call with a path argument (Read, Write, Edit, Glob, Grep, NotebookEdit and
  any tool with a path-like key) runs only if each path's *real* path (symlinks,
  ``..`` and ``~`` resolved, relative paths from the tool's cwd) lies in the
  conversation's workdir (``Reach.refusal``); a tool input that is not an object
  is refused.  Deny by default.
* A tool the turn's policy does not allow is refused; an "ask" tool runs only
  after a person approves it through the turn's approver (a timeout or a missing
  approver refuses it).
* The decision is made per call, from the policy of the turn running now: a warm
  process serves turns of different policies (a spare is adopted by any channel),
  so nothing is decided by CLI flags at spawn.

The PreToolUse ``hook`` sees every call first (paths, then policy, and forces a
prompt for "ask" tools); the prompt then reaches ``can_use_tool``.  Permission
rules and Bash's sandbox repeat the path boundary in the CLI itself
(``bot.reach``), so one bug here does not open the door.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import structlog
from claude_agent_sdk import HookContext, PermissionResultAllow, PermissionResultDeny, ToolPermissionContext
from claude_agent_sdk.types import HookInput, HookJSONOutput, PermissionResult

from bot.core import Approver, SessionSpec, ToolPolicy, ToolRequest, Verdict
from bot.reach import Reach

log = structlog.get_logger(__name__)

_PATH_KEYS = ("file_path", "path", "notebook_path")


class ToolGate:
    """Decides every tool call by the current turn's policy and the conversation's reach.

    A warm process serves turns from different policies (a spare is adopted by
    any channel), so the decision is made per call, not by CLI flags.  The
    PreToolUse hook sees every call: it refuses any path outside the workdir,
    denies what the policy does not name and forces a prompt for "ask" tools;
    the prompt then reaches ``can_use_tool``.
    """

    def __init__(self, reach: Reach, spec: SessionSpec, mcp_tools: frozenset[str]) -> None:
        self._profile = spec.profile
        self._mcp_tools = mcp_tools
        self._reach = reach
        self.policy = self.for_turn(None)

    def for_turn(self, approver: Approver | None) -> ToolPolicy:
        """The profile's tools (and its in-process ones), with this turn's approver for ``ask_tools``."""
        profile = self._profile.policy(approver)
        return ToolPolicy(allow=profile.allow | self._mcp_tools, ask=profile.ask, approver=approver)

    async def hook(self, hook_input: HookInput, tool_use_id: str | None, context: HookContext) -> HookJSONOutput:
        tool = str(hook_input.get("tool_name", ""))
        tool_input = hook_input.get("tool_input")
        if not isinstance(tool_input, dict):
            return _decision("deny", "the tool input is not an object")
        cwd = hook_input.get("cwd")
        refusal = self._reach.refusal(tool, tool_input, cwd if isinstance(cwd, str) else None)
        if refusal is not None:
            log.warning("tool_refused", tool=tool, reason=refusal)
            return _decision("deny", refusal)
        if tool in self.policy.ask:
            return _decision("ask", "this tool needs a person's approval")
        if tool not in self.policy.allow:
            return _decision("deny", f"the {tool} tool is not allowed in this conversation")
        return {}

    async def can_use_tool(
        self, tool: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResult:
        policy = self.policy
        if tool in policy.allow:
            return PermissionResultAllow()
        if tool not in policy.ask or policy.approver is None:
            return PermissionResultDeny(message=f"the {tool} tool is not allowed in this conversation")
        verdict = await policy.approver(ToolRequest(tool=tool, summary=_summary(tool_input), input=dict(tool_input)))
        if verdict is Verdict.APPROVED:
            return PermissionResultAllow()
        if verdict is Verdict.TIMED_OUT:
            return PermissionResultDeny(message="nobody approved this tool call in time; it was not run")
        return PermissionResultDeny(message="a person denied this tool call")


def _summary(tool_input: dict[str, Any]) -> str:
    for key in ("command", *_PATH_KEYS, "url", "pattern"):
        if isinstance(tool_input.get(key), str):
            return str(tool_input[key])[:500]
    return json.dumps(tool_input, ensure_ascii=False, default=str)[:500]


def _decision(decision: Literal["deny", "ask"], reason: str) -> HookJSONOutput:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": decision,
            "permissionDecisionReason": reason,
        }
    }
