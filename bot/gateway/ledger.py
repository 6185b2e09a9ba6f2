"""What model requests cost, who spent it, and whether a budget allows the next one.

Usage comes from the gateway (the ``usage`` of each response), is priced per
model, and is added to store counters per UTC day: conversation, user,
profile, channel and the global total.  The budgets read the same counters,
so replicas sharing a Redis share one total.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from bot import metrics
from bot.config import BudgetConfig, PriceConfig
from bot.core import BudgetStop, Caller, Store, StoreError
from bot.store import keys

log = structlog.get_logger(__name__)

# USD per million tokens, by model name prefix (the longest matching prefix wins).
BUILTIN_PRICES: dict[str, PriceConfig] = {
    "claude-opus-4": PriceConfig(input=15.0, output=75.0, cache_write=18.75, cache_read=1.5),
    "claude-opus-4-5": PriceConfig(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5),
    "claude-sonnet-4": PriceConfig(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-3-7-sonnet": PriceConfig(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-haiku-4": PriceConfig(input=1.0, output=5.0, cache_write=1.25, cache_read=0.1),
    "claude-3-5-haiku": PriceConfig(input=0.8, output=4.0, cache_write=1.0, cache_read=0.08),
}
DIMENSIONS = ("conversation", "user", "profile", "channel", "global")


@dataclass(frozen=True)
class Usage:
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def tokens(self) -> dict[str, int]:
        return {
            "input": self.input_tokens,
            "output": self.output_tokens,
            "cache_write": self.cache_creation_input_tokens,
            "cache_read": self.cache_read_input_tokens,
        }


class Prices:
    def __init__(self, overrides: Mapping[str, PriceConfig]) -> None:
        self._table = {**BUILTIN_PRICES, **overrides}
        self._warned: set[str] = set()
        self._highest = max(self._table.values(), key=lambda p: p.output)

    def known(self, model: str) -> bool:
        return any(model.startswith(prefix) for prefix in self._table)

    def of(self, model: str) -> PriceConfig:
        matches = [prefix for prefix in self._table if model.startswith(prefix)]
        if not matches:
            # Unknown: count it at the highest known price, so a budget errs on the safe side.
            self.warn_unknown(model)
            return self._highest
        return self._table[max(matches, key=len)]

    def warn_unknown(self, model: str) -> None:
        """One warning per model, naming the key that prices it, not one per request."""
        if model not in self._warned:
            self._warned.add(model)
            log.warning(
                "price_unknown",
                model=model,
                note=f'counted at the highest known price; set [gateway.prices."{model}"] to price it',
            )

    def cost(self, usage: Usage) -> float:
        price = self.of(usage.model)
        return (
            usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_creation_input_tokens * price.cache_write
            + usage.cache_read_input_tokens * price.cache_read
        ) / 1_000_000


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


@dataclass
class _Known:
    """A daily counter as this replica knows it: the store's value when read, plus its own spend since."""

    usd: float
    read_at: float  # monotonic


class Ledger:
    """Records spend and checks budgets without a store round trip on the request path.

    One background task owns the store traffic: it writes recorded spend (merged per counter, so a busy
    minute is a few writes, not one per request) and re-reads the counters the budgets use. Because it
    does both in turn, a counter read by it is exactly the store's value plus what is queued and not yet
    written; this replica's own spend counts in memory at once, and other replicas' spend shows within
    ``budget.refresh_s``.
    """

    def __init__(self, store: Store, budgets: BudgetConfig, prices: Prices) -> None:
        self._store, self._budgets, self._prices = store, budgets, prices
        self._unwritten: dict[str, float] = defaultdict(float)
        self._known: dict[str, _Known] = {}
        self._stale: set[str] = set()
        self._day = today()
        self._traffic = asyncio.Lock()  # one store operation of the ledger at a time: reads see every write
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def record(self, caller: Caller, usage: Usage) -> float:
        """Price one response's usage and add it to every counter; the cost.

        The counters are written in the background, so a response is never held up by the store;
        ``flush`` waits for them (reports, shutdown).
        """
        cost = self._prices.cost(usage)
        self._roll_day()
        for dimension, value in _dimensions(caller).items():
            key = keys.usage(self._day, dimension, value)
            self._unwritten[key] += cost
            if key in self._known:
                self._known[key].usd += cost
        self._kick()
        for kind, count in usage.tokens().items():
            metrics.MODEL_TOKENS.labels(model=usage.model, kind=kind).inc(count)
        metrics.COST.labels(profile=caller.profile).inc(cost)
        return cost

    async def check(self, caller: Caller, turn_spent_usd: float) -> BudgetStop | None:
        """The first budget the next request would start past, or None."""
        b = self._budgets
        turn_limit = b.per_job_run_usd if caller.channel == "job" else b.per_message_usd
        turn_name = "per_job_run" if caller.channel == "job" else "per_message"
        if turn_limit is not None and turn_spent_usd >= turn_limit:
            return BudgetStop(turn_name, turn_spent_usd, turn_limit, "with the next message")
        self._roll_day()
        daily = [
            (name, limit, keys.usage(self._day, dimension, value))
            for name, limit, dimension, value in (
                ("per_conversation_day", b.per_conversation_day_usd, "conversation", caller.conversation_id),
                ("per_user_day", b.per_user_day_usd, "user", caller.user),
                ("global_day", b.global_day_usd, "global", "all"),
            )
            if limit is not None and value
        ]
        if not daily:
            return None
        spent = await self._spent([key for _, _, key in daily])
        for name, limit, key in daily:
            assert limit is not None
            if spent[key] >= limit:
                return BudgetStop(name, spent[key], limit, "at 00:00 UTC")
        return None

    async def _spent(self, names: list[str]) -> dict[str, float]:
        unknown = [name for name in names if name not in self._known]
        if unknown:  # the first request of a counter today waits for one read
            async with self._traffic:
                await self._read(unknown)
        now = time.monotonic()
        stale = {name for name in names if now - self._known[name].read_at >= self._budgets.refresh_s}
        if stale:
            self._stale |= stale
            self._kick()
        return {name: self._known[name].usd for name in names}

    async def _read(self, names: list[str]) -> None:
        stored = await self._store.get_values(names)
        now = time.monotonic()
        for name in names:
            # Holding the traffic lock, nothing is being written: what is unwritten is not in the store yet.
            self._known[name] = _Known(float(stored.get(name) or 0.0) + self._unwritten.get(name, 0.0), now)

    def _roll_day(self) -> None:
        day = today()
        if day != self._day:  # yesterday's counters are done with: memory stays one day's worth
            self._day, self._stale = day, set()
            self._known = {name: known for name, known in self._known.items() if f":{day}:" in name}

    def _kick(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="ledger")
        self._wake.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._traffic:
                    await self._write()
                    await self._refresh()
            except StoreError as exc:
                metrics.STORE_ERRORS.inc()
                log.error("store_error", error=str(exc), note="ledger retries in 1 s")
                await self._retry_soon()
            except Exception:  # task boundary: a bug here must not silently stop all metering
                log.exception("ledger_write_failed", note="ledger retries in 1 s")
                await self._retry_soon()

    async def _retry_soon(self) -> None:
        await asyncio.sleep(1.0)
        self._wake.set()

    async def _write(self) -> None:
        if not self._unwritten:
            return
        amounts, self._unwritten = dict(self._unwritten), defaultdict(float)
        written = False
        try:
            await self._store.add_floats(amounts, keys.USAGE_TTL_S)
            written = True
        finally:
            if not written:  # kept for the next try, whatever failed: nothing recorded is dropped
                for name, usd in amounts.items():
                    self._unwritten[name] += usd

    async def _refresh(self) -> None:
        stale, self._stale = [name for name in self._stale if name in self._known], set()
        if stale:
            await self._read(stale)

    async def flush(self) -> None:
        """Wait until everything recorded so far is in the store."""
        async with self._traffic:
            await self._write()

    async def close(self) -> None:
        try:
            await self.flush()
        except StoreError as exc:
            usd = sum(v for k, v in self._unwritten.items() if ":global:" in k)
            log.error("store_error", error=str(exc), note="usage not recorded at shutdown", usd=usd)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def spent_today(self, dimension: str, values: list[str]) -> dict[str, float]:
        """USD spent today (UTC) by each of ``values`` of one dimension (conversations, say)."""
        if not values:
            return {}
        day = today()
        names = {value: keys.usage(day, dimension, value) for value in values}
        spent = await self._store.get_values(list(names.values()))
        # Spend not yet written counts too: the figure must not dip while a write is queued.
        return {value: float(spent.get(name) or 0.0) + self._unwritten.get(name, 0.0) for value, name in names.items()}

    async def report(self, by: str) -> dict[str, float]:
        """USD spent per value of one dimension (all days), or per day (``by = "day"``)."""
        await self.flush()
        totals: dict[str, float] = defaultdict(float)
        for name, value in (await self._store.values(keys.usage_prefix())).items():
            day, dimension, key = name.removeprefix(keys.usage_prefix()).split(":", 2)
            if by == "day" and dimension == "global":
                totals[day] += float(value)
            elif dimension == by:
                totals[key] += float(value)
        return dict(sorted(totals.items()))


def _dimensions(caller: Caller) -> dict[str, str]:
    found = {
        "conversation": caller.conversation_id,
        "profile": caller.profile,
        "channel": caller.channel or "unknown",
        "global": "all",
    }
    if caller.user:
        found["user"] = caller.user
    return found
