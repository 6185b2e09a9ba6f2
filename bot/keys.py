"""Every Redis key name and TTL agentd uses, in one place."""

from __future__ import annotations

PREFIX = "agentd"
CONVERSATION_INDEX = f"{PREFIX}:conversations"
DAY_S = 86_400


def conversation(conversation_id: str) -> str:
    return f"{PREFIX}:conv:{conversation_id}"


def conversation_ttl_s(days: int) -> int:
    """Records expire this long after the conversation was last written."""
    return days * DAY_S
