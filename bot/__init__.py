"""agentd: a daemon that hosts warm Claude agent sessions for Slack, email and an HTTP API."""

__version__ = "0.1.0"
