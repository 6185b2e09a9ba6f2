"""In-process tools (SDK MCP servers) built from the channels' ``ToolSpec``s, one server set per process.

Each handler is bound to the conversation that started the process, so a tool
knows who called it without trusting anything the model says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from claude_agent_sdk import SdkMcpTool, create_sdk_mcp_server
from claude_agent_sdk.types import McpSdkServerConfig

from bot.core import ToolRefused, ToolSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Servers:
    """The MCP servers of one process and the names the model calls their tools by."""

    configs: dict[str, McpSdkServerConfig] = field(default_factory=dict)
    tool_names: frozenset[str] = frozenset()


def mcp_servers(toolsets: Mapping[str, Sequence[ToolSpec]], conversation_id: str) -> Servers:
    configs: dict[str, McpSdkServerConfig] = {}
    names: set[str] = set()
    for server, specs in toolsets.items():
        configs[server] = create_sdk_mcp_server(server, tools=[_bind(spec, conversation_id) for spec in specs])
        names.update(f"mcp__{server}__{spec.name}" for spec in specs)
    return Servers(configs, frozenset(names))


def _bind(spec: ToolSpec, conversation_id: str) -> SdkMcpTool[Any]:
    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            text = await spec.handler(conversation_id, arguments)
        except ToolRefused as exc:
            log.warning("tool_refused", tool=spec.name, conversation=conversation_id, reason=str(exc))
            return _result(f"Refused: {exc}", error=True)
        except Exception as exc:  # task boundary: a failing tool is the model's error to read, not a crash
            log.exception("tool_failed", tool=spec.name, conversation=conversation_id)
            return _result(f"The tool failed: {type(exc).__name__}: {str(exc)[:300]}", error=True)
        return _result(text)

    return SdkMcpTool(
        name=spec.name, description=spec.description, input_schema=dict(spec.input_schema), handler=handler
    )


def _result(text: str, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "is_error": error}
