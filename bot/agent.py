"""The only module that speaks claude-agent-sdk.

``ClaudeLauncher.open(spec)`` connects one ``ClaudeSDKClient`` and yields an
``AgentSession``; leaving the context disconnects it.  The caller must enter
and leave that context in one task and be the only one reading turns: the SDK
requires both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    HookContext,
    HookMatcher,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    StreamEvent,
    TextBlock,
    ToolPermissionContext,
)
from claude_agent_sdk.types import HookInput, HookJSONOutput, PermissionResult

from bot.config import AgentConfig
from bot.core import ToolPolicy, ToolRequest, Verdict
from bot.reach import Reach

log = structlog.get_logger(__name__)

_PATH_KEYS = ("file_path", "path", "notebook_path")


class AgentError(Exception):
    """The agent subprocess could not start or serve a turn."""


class AgentCrashed(AgentError):
    """The CLI died or its stream broke mid-turn."""


@dataclass(frozen=True)
class SessionSpec:
    """Where and as what one CLI process runs."""

    workdir: Path
    config_dir: Path
    data_dir: Path
    session_id: str
    resume: bool
    # The tools the model is offered (``--tools``); None: the launcher's default policy.
    tools: frozenset[str] | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TurnDone:
    reply: str
    session_id: str
    total_cost_usd: float
    error: str | None
    interrupted: bool


class AgentSession(Protocol):
    @property
    def pid(self) -> int | None: ...

    def turn(self, text: str, policy: ToolPolicy | None = None) -> AsyncIterator[TextDelta | TurnDone]: ...

    async def interrupt(self) -> None: ...


class Launcher(Protocol):
    def open(self, spec: SessionSpec) -> AbstractAsyncContextManager[AgentSession]: ...


class _ToolGate:
    """Decides every tool call by the current turn's policy and the conversation's reach.

    A warm process serves turns from different policies (a spare is adopted by
    any channel), so the decision is made per call, not by CLI flags.  The
    PreToolUse hook sees every call: it refuses any path outside the workdir,
    denies what the policy does not name and forces a prompt for "ask" tools;
    the prompt then reaches ``can_use_tool``.
    """

    def __init__(self, reach: Reach, default: ToolPolicy) -> None:
        self.default = default
        self.policy = default
        self._reach = reach

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


class _ClaudeSession:
    def __init__(self, client: ClaudeSDKClient, gate: _ToolGate) -> None:
        self._client = client
        self._gate = gate

    @property
    def pid(self) -> int | None:
        # The SDK does not expose the pid; the transport's process is the CLI.
        process = getattr(getattr(self._client, "_transport", None), "_process", None)
        return getattr(process, "pid", None)

    async def interrupt(self) -> None:
        await self._client.interrupt()

    async def turn(self, text: str, policy: ToolPolicy | None = None) -> AsyncIterator[TextDelta | TurnDone]:
        self._gate.policy = policy or self._gate.default
        parts: list[str] = []
        try:
            await self._client.query(text)
            async for message in self._client.receive_response():
                if isinstance(message, StreamEvent):
                    delta = _text_delta(message.event, bool(parts))
                    if delta is not None:
                        yield delta
                elif isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
                    parts += [b.text for b in message.content if isinstance(b, TextBlock) and b.text]
                elif isinstance(message, ResultMessage):
                    yield _turn_done(message, parts)
                    return
        except ClaudeSDKError as exc:
            raise AgentCrashed(str(exc)) from exc
        raise AgentCrashed("the agent's output ended before the turn finished")


def _text_delta(event: dict[str, Any], after_text: bool) -> TextDelta | None:
    kind = event.get("type")
    if kind == "content_block_start" and after_text and event.get("content_block", {}).get("type") == "text":
        return TextDelta("\n\n")
    if kind == "content_block_delta" and event.get("delta", {}).get("type") == "text_delta":
        return TextDelta(str(event["delta"].get("text", "")))
    return None


def _turn_done(result: ResultMessage, parts: list[str]) -> TurnDone:
    interrupted = (result.terminal_reason or "").startswith("aborted")
    error = None
    if result.is_error and not interrupted:
        detail = "; ".join(result.errors or []) or result.result or result.subtype
        error = f"{result.subtype}: {detail}"
    return TurnDone(
        reply="\n\n".join(parts),
        session_id=result.session_id,
        total_cost_usd=result.total_cost_usd or 0.0,
        error=error,
        interrupted=interrupted,
    )


class ClaudeLauncher:
    """Spawns the bundled Claude Code CLI with an isolated, allowlisted setup."""

    def __init__(self, config: AgentConfig, config_file: Path | None = None) -> None:
        self._config = config
        # Never readable by any agent, on top of data_dir and the home dotfiles (~/.ssh, ~/.aws,
        # ~/.config, ~/.netrc, ...): the config file and the operator's own list.
        self._protected = [*([config_file] if config_file else []), *config.deny_read]

    def reach(self, spec: SessionSpec) -> Reach:
        return Reach.of(spec.workdir, spec.data_dir, Path.home(), self._protected)

    @asynccontextmanager
    async def open(self, spec: SessionSpec) -> AsyncIterator[AgentSession]:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        spec.config_dir.mkdir(parents=True, exist_ok=True)
        gate = _ToolGate(self.reach(spec), self.default_policy())
        client = ClaudeSDKClient(self.options(spec, gate))
        try:
            await client.connect()
        except ClaudeSDKError as exc:
            await client.disconnect()
            raise AgentError(f"could not start the agent: {exc}") from exc
        try:
            yield _ClaudeSession(client, gate)
        finally:
            await client.disconnect()

    def default_policy(self) -> ToolPolicy:
        return ToolPolicy(allow=frozenset(self._config.allowed_tools))

    def options(self, spec: SessionSpec, gate: _ToolGate) -> ClaudeAgentOptions:
        c = self._config
        reach = self.reach(spec)
        offered = spec.tools if spec.tools is not None else self.default_policy().offered
        return ClaudeAgentOptions(
            cwd=spec.workdir,
            # The model sees only these tools; with the sandbox on the CLI would otherwise swap Glob and
            # Grep for Bash and add agents, skills and the like that no policy names.
            tools=sorted(offered),
            model=c.model,
            system_prompt=c.system_prompt,
            # Nothing is pre-approved: the gate decides every call per turn.
            allowed_tools=[],
            disallowed_tools=list(c.disallowed_tools),
            permission_mode=c.permission_mode,
            max_turns=c.max_turns,
            max_budget_usd=c.max_budget_usd,
            cli_path=c.cli_path,
            setting_sources=[],
            verbatim_prompts=True,
            include_partial_messages=True,
            resume=spec.session_id if spec.resume else None,
            session_id=None if spec.resume else spec.session_id,
            settings=json.dumps(self._settings(reach)),
            env=self.environment(spec),
            can_use_tool=gate.can_use_tool,
            hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[gate.hook])]},
            stderr=_stderr_logger(spec),
        )

    def environment(self, spec: SessionSpec) -> dict[str, str]:
        """What the CLI gets on top of the (already scrubbed) daemon environment."""
        c = self._config
        env = {
            "CLAUDE_CONFIG_DIR": str(spec.config_dir),
            "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
        }
        if c.api_key is not None:
            env["ANTHROPIC_API_KEY"] = c.api_key.get_secret_value()
        if c.base_url:
            env["ANTHROPIC_BASE_URL"] = c.base_url
        if c.sandbox_enabled:
            # Lets the CLI strip its own API credentials from what Bash sees.
            env["CLAUDE_CODE_SUBPROCESS_ENV_SCRUB"] = "1"
        if c.permission_mode == "bypassPermissions":
            env["IS_SANDBOX"] = "1"
        return env

    def _settings(self, reach: Reach) -> dict[str, Any]:
        settings: dict[str, Any] = {"permissions": {"deny": reach.permission_rules()}}
        if self._config.sandbox_enabled:
            settings["sandbox"] = {
                "enabled": True,
                # Bash goes through the gate like every other tool.
                "autoAllowBashIfSandboxed": False,
                "allowUnsandboxedCommands": False,
                # Writes are confined to cwd by default; reads are denied everywhere but the
                # system directories, and the workdir is re-allowed on top.
                "filesystem": reach.sandbox_filesystem(),
            }
        return settings


def _decision(decision: Literal["deny", "ask"], reason: str) -> HookJSONOutput:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": decision,
            "permissionDecisionReason": reason,
        }
    }


def _stderr_logger(spec: SessionSpec) -> Any:
    bound = log.bind(session_id=spec.session_id)

    def emit(line: str) -> None:
        bound.debug("agent_stderr", line=line[:500])

    return emit
