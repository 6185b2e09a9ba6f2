"""One owner per live conversation: a lease in Redis, and a fencing token for every write it makes.

The owner of a conversation's warm process holds ``keys.conversation_lease(id)``, renewed while the
process is warm and released at eviction. Each new owner gets a fresh *epoch* from ``INCR``; every
write the owner makes on the conversation's behalf carries it, and a script refuses the write when
a newer owner exists. A paused or partitioned old owner (SIGSTOP, a GC pause, a network split) may
still believe it owns the conversation after its lease expired, but its writes fail: this is
Kleppmann's fencing token, with Redis scripts as the checked store.

All checks run inside Redis scripts, so no read-then-write race exists between replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from bot.store import keys

# KEYS: lease, epoch.  ARGV: replica, ttl_ms.  -> {1, epoch} when held by the caller (new or renewed),
# {0, epoch, holder} when another replica holds it.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
  local holder, epoch = string.match(held, '^(.*) (%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(epoch)}
  end
  return {0, tonumber(epoch), holder}
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
return {1, epoch}
"""
# KEYS: lease.  ARGV: replica, epoch, ttl_ms.  -> 1 renewed, 0 lost.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"""
# KEYS: lease.  ARGV: replica, epoch.  -> 1 released, 0 not (no longer) ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: epoch, target.  ARGV: epoch, value, ttl_s (0: none).  -> 1 written, 0 fenced off.
_FENCED_SET = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current > tonumber(ARGV[1]) then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""


@dataclass(frozen=True)
class Lease:
    """A replica's hold on one conversation; ``epoch`` is the token its writes carry."""

    conversation_id: str
    replica: str
    epoch: int


@dataclass(frozen=True)
class Held:
    """Another replica owns the conversation: forward to it."""

    conversation_id: str
    holder: str
    epoch: int


class Fenced(Exception):
    """A write was refused: a newer owner holds the conversation (this replica's lease was lost)."""


class Leases:
    """Acquire, renew and release conversation leases; write under their fencing tokens."""

    def __init__(self, client: redis.Redis, replica: str, ttl_s: float) -> None:
        self._redis = client
        self.replica = replica
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._fenced_set = client.register_script(_FENCED_SET)

    async def acquire(self, conversation_id: str) -> Lease | Held:
        """This replica's lease (a new epoch if it was free, the same one if already ours), or who holds it."""
        reply: list[Any] = await self._acquire(
            keys=[keys.conversation_lease(conversation_id), keys.conversation_epoch(conversation_id)],
            args=[self.replica, self._ttl_ms],
        )
        if int(reply[0]) == 1:
            return Lease(conversation_id, self.replica, int(reply[1]))
        return Held(conversation_id, _text(reply[2]), int(reply[1]))

    async def renew(self, lease: Lease) -> bool:
        """False if the lease was lost (expired and taken, or released): stop serving the conversation."""
        renewed = await self._renew(
            keys=[keys.conversation_lease(lease.conversation_id)], args=[lease.replica, lease.epoch, self._ttl_ms]
        )
        return bool(int(renewed))

    async def release(self, lease: Lease) -> bool:
        released = await self._release(
            keys=[keys.conversation_lease(lease.conversation_id)], args=[lease.replica, lease.epoch]
        )
        return bool(int(released))

    async def fenced_set(self, lease: Lease, key: str, value: str, ttl_s: int = 0) -> None:
        """``SET key value`` unless a newer owner exists; raises ``Fenced`` then."""
        written = await self._fenced_set(
            keys=[keys.conversation_epoch(lease.conversation_id), key], args=[lease.epoch, value, ttl_s]
        )
        if not int(written):
            raise Fenced(f"{lease.conversation_id}: a newer owner than epoch {lease.epoch} holds it")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
