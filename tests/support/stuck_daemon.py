"""``agentd`` with a pool that never finishes closing, even when cancelled, and a 2 s shutdown margin.

For the shutdown-deadline test: run as ``python -m tests.support.stuck_daemon --config PATH run``.
"""

from __future__ import annotations

import asyncio
import sys

from bot.app import cli, shutdown
from bot.pool import Pool


async def close_never(self: Pool, grace_s: float) -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # a wedged cleanup that swallows cancellation, as a misbehaving library can


if __name__ == "__main__":
    Pool.close = close_never  # type: ignore[method-assign]
    shutdown.SHUTDOWN_MARGIN_S = 2.0
    sys.exit(cli.main())
