"""``ClaudeLauncher.open(spec)`` starts one CLI process and yields its live ``AgentSession``.

Leaving the context disconnects it.  The caller must enter and leave that
context in one task and be the only one reading turns: the SDK requires both.
Everything a process is started with comes from its ``SessionSpec``: the
conversation's reach and the profile's tools, MCP servers, prompt and limits.
The launcher builds that setup; the session itself is in ``session`` and the
check of every tool call in ``gate``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from claude_agent_sdk import ClaudeAgentOptions, HookMatcher

from bot import procs
from bot.agent import session
from bot.agent.binary import launch
from bot.agent.gate import ToolGate
from bot.agent.session import Metered, MirrorWatch
from bot.agent.tools import Servers, mcp_servers
from bot.agent.transcripts import Transcripts
from bot.config import AgentConfig, TelemetryConfig
from bot.core import AgentSession, Caller, Meter, SessionSpec, ToolSpec
from bot.reach import Reach

log = structlog.get_logger(__name__)


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
        gate = ToolGate(self.reach(spec), spec, servers.tool_names)
        meter = self._metered(spec)
        try:
            # In a thread: the sandbox's deny rules list /tmp and home (70-200 ms on a busy host), which on the
            # event loop would stall every live turn each time a spare or a new conversation starts.
            options = await asyncio.to_thread(self.options, spec, gate, servers, meter)
            async with session.connect(options, gate, meter, self._mirror_watch(spec)) as live:
                yield live
        finally:
            if meter is not None:
                meter.gateway.revoke(meter.credential)

    def _mirror_watch(self, spec: SessionSpec) -> MirrorWatch | None:
        return None if self.transcripts is None else MirrorWatch(self.transcripts, spec.conversation_id)

    def _metered(self, spec: SessionSpec) -> Metered | None:
        if self._gateway is None:
            return None
        return Metered(self._gateway, self._gateway.issue(Caller(spec.conversation_id, spec.profile.name)))

    def options(
        self, spec: SessionSpec, gate: ToolGate, servers: Servers, meter: Metered | None = None
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
            # Every user message is stamped verbatim by the session instead: the option would make
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

    def environment(self, spec: SessionSpec, meter: Metered | None = None) -> dict[str, str]:
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


def _stderr_logger(spec: SessionSpec) -> Any:
    bound = log.bind(session_id=spec.session_id)

    def emit(line: str) -> None:
        bound.debug("agent_stderr", line=line[:500])

    return emit
