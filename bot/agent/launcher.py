"""``ClaudeLauncher.open(spec)`` connects one ``ClaudeSDKClient`` and yields an ``AgentSession``.

Leaving the context disconnects it.  The caller must enter and leave that
context in one task and be the only one reading turns: the SDK requires both.
Everything a process is started with comes from its ``SessionSpec``: the
conversation's reach and the profile's tools, MCP servers, prompt and limits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    HookContext,
    HookMatcher,
    MirrorErrorMessage,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
    ToolPermissionContext,
)
from claude_agent_sdk.types import HookInput, HookJSONOutput, PermissionResult

from bot import procs
from bot.agent.binary import launch
from bot.agent.tools import Servers, mcp_servers
from bot.agent.transcripts import Transcripts
from bot.config import AgentConfig, TelemetryConfig
from bot.core import (
    AgentCrashed,
    AgentError,
    AgentSession,
    Approver,
    BudgetStop,
    Caller,
    Meter,
    SessionSpec,
    TextDelta,
    ToolPolicy,
    ToolRequest,
    ToolSpec,
    TurnContext,
    TurnDone,
    Verdict,
)
from bot.reach import Reach

log = structlog.get_logger(__name__)

_PATH_KEYS = ("file_path", "path", "notebook_path")


class _ToolGate:
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


class _ClaudeSession:
    def __init__(
        self, client: ClaudeSDKClient, gate: _ToolGate, meter: _Metered | None, mirror: _MirrorWatch | None = None
    ) -> None:
        self._client = client
        self._gate = gate
        self._meter = meter
        self._mirror = mirror

    @property
    def pid(self) -> int | None:
        # The SDK does not expose the pid; the transport's process is the CLI.
        process = getattr(getattr(self._client, "_transport", None), "_process", None)
        return getattr(process, "pid", None)

    async def interrupt(self) -> None:
        await self._client.interrupt()

    async def turn(self, text: str, context: TurnContext) -> AsyncIterator[TextDelta | TurnDone]:
        self._gate.policy = self._gate.for_turn(context.approver)
        if self._meter is not None:
            self._meter.begin(context)
        parts: list[str] = []
        try:
            await self._client.query(_verbatim(text))
            async for message in self._client.receive_response():
                if isinstance(message, StreamEvent):
                    delta = _text_delta(message.event, bool(parts))
                    if delta is not None:
                        yield delta
                elif isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
                    parts += [b.text for b in message.content if isinstance(b, TextBlock) and b.text]
                elif isinstance(message, MirrorErrorMessage):
                    self._mirror_failed(message, context.conversation_id)
                elif isinstance(message, ResultMessage):
                    yield self._done(message, parts)
                    return
        except ClaudeSDKError as exc:
            raise AgentCrashed(str(exc)) from exc
        raise AgentCrashed("the agent's output ended before the turn finished")

    async def preheat(self) -> str | None:
        """Warm a spare: one turn the gateway answers itself (no upstream call, no cost), then ``/clear``.

        A freshly connected CLI spends ~100 ms more on its first query; after this the adopting
        conversation's first message is as fast as a warm one, and its history holds nothing of the
        warm-up.  Returns the session id the CLI continues under, or None without a gateway.
        """
        if self._meter is None:
            return None
        gateway, credential = self._meter.gateway, self._meter.credential
        # Local answers last until the first real turn (``begin_turn``), not just the warm-up turn: the CLI's
        # title request for the warm-up may leave after its turn has ended, and must not go upstream either.
        gateway.answer_locally(credential, True)
        await self._client.query(_verbatim(WARM_UP_PROMPT))
        await self._until_result()
        await self._client.query("/clear")  # not verbatim: the CLI's own command
        return await self._until_result()

    async def _until_result(self) -> str | None:
        """Read to the end of a turn; the session id a reset moved to, if one did."""
        session_id = None
        try:
            async for message in self._client.receive_response():
                if isinstance(message, MirrorErrorMessage):
                    self._mirror_failed(message)
                elif isinstance(message, SystemMessage) and message.subtype == "init":
                    session_id = str(message.data.get("session_id") or "") or None
                elif isinstance(message, ResultMessage):
                    return session_id or message.session_id
        except ClaudeSDKError as exc:
            raise AgentCrashed(str(exc)) from exc
        raise AgentCrashed("the agent's output ended before the warm-up finished")

    def _mirror_failed(self, message: MirrorErrorMessage, conversation_id: str | None = None) -> None:
        """A batch the Redis mirror dropped: the turn goes on (local disk has it); the next append heals."""
        if self._mirror is not None:
            # A spare's process serves the conversation that adopted it: the turn names it.
            self._mirror.transcripts.mirror_failed(conversation_id or self._mirror.conversation_id, message.error)

    def _done(self, result: ResultMessage, parts: list[str]) -> TurnDone:
        done = _turn_done(result, parts)
        if self._meter is None:
            return done
        stop = self._meter.stopped()
        return dataclasses.replace(
            done, budget=stop.text if stop is not None else None, metered_usd=self._meter.spent()
        )


@dataclass(frozen=True)
class _Metered:
    """One process's line to the gateway: its credential, and the gateway that meters it."""

    gateway: Meter
    credential: str

    def begin(self, context: TurnContext) -> None:
        self.gateway.begin_turn(self.credential, context.conversation_id, context.user, context.channel)

    def stopped(self) -> BudgetStop | None:
        return self.gateway.stopped(self.credential)

    def spent(self) -> float:
        return self.gateway.turn_spent(self.credential)


@dataclass(frozen=True)
class _MirrorWatch:
    """Where one process reports the batches its transcript mirror failed to store."""

    transcripts: Transcripts
    conversation_id: str


WARM_UP_PROMPT = "agentd warm-up: reply with OK."


async def _verbatim(text: str) -> AsyncIterator[dict[str, Any]]:
    """One user message the CLI delivers as written: no ``@file`` expansion, no slash commands."""
    yield {
        "type": "user",
        "message": {"role": "user", "content": text},
        "parent_tool_use_id": None,
        "client_composed": True,
    }


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
        num_turns=result.num_turns,
    )


class ClaudeLauncher:
    """Spawns the bundled Claude Code CLI with an isolated, allowlisted setup."""

    def __init__(
        self,
        config: AgentConfig,
        config_file: Path | None = None,
        toolsets: Mapping[str, Sequence[ToolSpec]] | None = None,
        gateway: Meter | None = None,
        telemetry: TelemetryConfig | None = None,
        transcripts: Transcripts | None = None,
    ) -> None:
        self._config = config
        # Claude Code's own OpenTelemetry export, when [telemetry] asks for it.
        self._telemetry = telemetry or TelemetryConfig()
        # With Redis: every process mirrors its transcript there, so a fresh host can resume it.
        self.transcripts = transcripts
        # With a gateway, each process gets its own credential; the real key stays in the daemon.
        self._gateway = gateway
        # Never readable by any agent, on top of data_dir, the home dotfiles (~/.ssh, ~/.aws,
        # ~/.config, ~/.netrc, ...) and the profile's deny_read: the config file.
        self._config_file = config_file
        # In-process tool sets by name (``mail``, ``slack``), offered to the profiles that name them.
        self._toolsets = dict(toolsets or {})
        # Under a parent-death signal, so a daemon killed by SIGKILL takes its CLIs (and their helpers) along.
        self._cli_path, self._cli_env = launch(config)
        if not self._cli_env:
            log.warning("cli_pdeathsig_unavailable", note="no setpriv (util-linux): a crashed daemon leaves its CLIs")

    def add_toolset(self, name: str, tools: Sequence[ToolSpec]) -> None:
        """A channel offers its in-process tools; processes started from now on may get them."""
        self._toolsets[name] = tools

    def reach(self, spec: SessionSpec) -> Reach:
        protected = [*([self._config_file] if self._config_file else []), *spec.profile.deny_read]
        return Reach.of(spec.workdir, spec.data_dir, Path.home(), protected)

    def _servers(self, spec: SessionSpec) -> Servers:
        named = {name: self._toolsets[name] for name in spec.profile.mcp if name in self._toolsets}
        return mcp_servers(named, spec.conversation_id)

    @asynccontextmanager
    async def open(self, spec: SessionSpec) -> AsyncIterator[AgentSession]:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        spec.config_dir.mkdir(parents=True, exist_ok=True)
        servers = self._servers(spec)
        gate = _ToolGate(self.reach(spec), spec, servers.tool_names)
        meter = self._metered(spec)
        client = ClaudeSDKClient(self.options(spec, gate, servers, meter))
        try:
            try:
                await client.connect()
            except ClaudeSDKError as exc:
                await client.disconnect()
                raise AgentError(f"could not start the agent: {exc}") from exc
            try:
                yield _ClaudeSession(client, gate, meter, self._mirror_watch(spec))
            finally:
                await client.disconnect()
        finally:
            if meter is not None:
                meter.gateway.revoke(meter.credential)

    def _mirror_watch(self, spec: SessionSpec) -> _MirrorWatch | None:
        return None if self.transcripts is None else _MirrorWatch(self.transcripts, spec.conversation_id)

    def _metered(self, spec: SessionSpec) -> _Metered | None:
        if self._gateway is None:
            return None
        return _Metered(self._gateway, self._gateway.issue(Caller(spec.conversation_id, spec.profile.name)))

    def options(
        self, spec: SessionSpec, gate: _ToolGate, servers: Servers, meter: _Metered | None = None
    ) -> ClaudeAgentOptions:
        c, profile = self._config, spec.profile
        reach = self.reach(spec)
        return ClaudeAgentOptions(
            cwd=spec.workdir,
            # The model sees only the profile's tools; with the sandbox on the CLI would otherwise swap
            # Glob and Grep for Bash and add agents, skills and the like that no profile names.
            tools=sorted(profile.offered),
            mcp_servers=dict(servers.configs),
            model=profile.model,
            system_prompt=profile.system_prompt,
            # Nothing is pre-approved: the gate decides every call per turn.
            allowed_tools=[],
            disallowed_tools=list(c.disallowed_tools),
            permission_mode=c.permission_mode,
            max_turns=profile.max_turns,
            max_budget_usd=profile.max_budget_usd,
            cli_path=self._cli_path,
            setting_sources=[],
            # Every user message is stamped verbatim by ``_verbatim`` instead: the option would make
            # the spare's own ``/clear`` (see ``preheat``) plain text too.
            verbatim_prompts=False,
            include_partial_messages=True,
            resume=spec.session_id if spec.resume else None,
            session_id=None if spec.resume else spec.session_id,
            settings=str(self._write_settings(spec, reach)),
            env={**self.environment(spec, meter), **self._cli_env, **procs.owner_env(spec.data_dir)},
            can_use_tool=gate.can_use_tool,
            hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[gate.hook])]},
            stderr=_stderr_logger(spec),
            session_store=None if self.transcripts is None else self.transcripts.attach(spec),
            session_store_flush=self.transcripts.flush if self.transcripts is not None else "batched",
        )

    def environment(self, spec: SessionSpec, meter: _Metered | None = None) -> dict[str, str]:
        """What the CLI gets on top of the (already scrubbed) daemon environment."""
        c = self._config
        env = {
            "CLAUDE_CONFIG_DIR": str(spec.config_dir),
            "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            # Bash reads ~/.bashrc even non-interactively when its stdin is a socket (it takes itself for one
            # started by rshd) and it is a top-level shell; the CLI's stdin is one, and the sandbox denies
            # home's dotfiles: every result began with ".bashrc: Permission denied". Level 1 makes it a subshell.
            "SHLVL": "1",
        }
        if meter is not None:
            # The real key and upstream never enter the process: only the gateway and a credential.
            env["ANTHROPIC_BASE_URL"] = meter.gateway.url
            env["ANTHROPIC_API_KEY"] = meter.credential
        else:
            if c.api_key is not None:
                env["ANTHROPIC_API_KEY"] = c.api_key.get_secret_value()
            if c.auth_token is not None:
                env["ANTHROPIC_AUTH_TOKEN"] = c.auth_token.get_secret_value()
            if c.base_url:
                env["ANTHROPIC_BASE_URL"] = c.base_url
        if spec.profile.sandbox:
            # Lets the CLI strip its own API credentials from what Bash sees.
            env["CLAUDE_CODE_SUBPROCESS_ENV_SCRUB"] = "1"
        if c.permission_mode == "bypassPermissions":
            env["IS_SANDBOX"] = "1"
        # Only the documented OTEL settings, built from the config: the daemon's own OTEL_* are scrubbed.
        env.update(self._telemetry.cli_environment(spec.profile.name))
        return env

    def _write_settings(self, spec: SessionSpec, reach: Reach) -> Path:
        """The settings as a file in the conversation's Claude state dir (unreadable by the agent).

        Not inline: the deny lists grow with the filesystem (every entry of /tmp), and one command-line
        argument is capped at 128 KiB by the kernel ("argument list too long").
        """
        path = spec.config_dir / "agentd-settings.json"
        spec.config_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._settings(reach, spec.profile.sandbox)))
        return path

    def _settings(self, reach: Reach, sandbox: bool) -> dict[str, Any]:
        settings: dict[str, Any] = {"permissions": {"deny": reach.permission_rules()}}
        if sandbox:
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
