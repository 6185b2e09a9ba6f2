"""The only package that speaks claude-agent-sdk: the CLI launcher and the in-process tools it serves.

The interfaces it implements (``Launcher``, ``AgentSession``, ``SessionSpec``,
``TurnDone``) live in ``bot.core``, so the pool never imports the SDK.
"""

from bot.agent.launcher import ClaudeLauncher

__all__ = ["ClaudeLauncher"]
