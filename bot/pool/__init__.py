"""The warm session pool: one long-lived task per live CLI process.

Routing (``Pool.submit``) is synchronous after at most one store read, so under asyncio it cannot
interleave with eviction decisions.  A worker is retired only between turns; its queued turns, if
any, move to the front of its successor's queue, in order, and the successor resumes the same
Claude session once the old process has exited.  A process holds its room (``max_sessions``,
memory budget) from admission until it has exited, retiring or not.

``pool`` routes, ``spares`` keeps processes ready for new conversations, ``worker`` runs one process,
``room`` admits and evicts, ``sampler`` measures memory and enforces its ceilings, ``turn`` is one
message in flight, ``report`` is what ``/status`` and ``agentd sessions`` show.
"""

from bot.pool.pool import Pool
from bot.pool.spares import SpareBackoff
from bot.pool.turn import FAILURE_TEXT, Turn
from bot.pool.worker import LOST_CONTEXT_NOTICE, Worker, WorkerHost, WorkerState, transcript_exists

__all__ = [
    "FAILURE_TEXT",
    "LOST_CONTEXT_NOTICE",
    "Pool",
    "SpareBackoff",
    "Turn",
    "Worker",
    "WorkerHost",
    "WorkerState",
    "transcript_exists",
]
