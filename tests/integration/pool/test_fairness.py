"""Fair admission: the pure policy, and the pool holding one user's flood back from another user's question."""

from __future__ import annotations

import asyncio

from bot.core import Failure, Inbound, Outcome
from bot.fairness import Waiter, is_domain, next_waiter, over_cap, tenant_of
from bot.pool import Pool
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.support.helpers import wait_until

# -- the policy --------------------------------------------------------------------------


def test_mail_senders_count_by_domain_and_trusted_callers_not_at_all() -> None:
    assert tenant_of("Eve@Example.COM") == tenant_of("mallory@example.com") == "@example.com"
    assert tenant_of("U123") == "U123"
    assert tenant_of("api") is None and tenant_of("job:digest") is None and tenant_of("") is None


def test_the_next_room_goes_to_the_tenant_holding_least_then_the_earliest() -> None:
    heavy1, heavy2, light = Waiter("UH", 1), Waiter("UH", 2), Waiter("UL", 3)
    assert next_waiter([heavy1, heavy2, light], ["UH", "UH"]) == light
    # Nothing admitted: the heavy backlog itself still counts against its tenant.
    assert next_waiter([heavy1, heavy2, light], []) == light
    assert next_waiter([heavy1, heavy2], ["UH"]) == heavy1
    assert next_waiter([Waiter(None, 5), Waiter("UL", 4)], []) == Waiter("UL", 4)
    assert next_waiter([], ["UH"]) is None


def test_mail_domains_are_told_apart_from_slack_users() -> None:
    assert is_domain(tenant_of("eve@example.com")) and not is_domain(tenant_of("U123")) and not is_domain(None)


def test_the_cap_counts_one_tenant_and_zero_means_none() -> None:
    assert over_cap("UH", ["UH", "UH", "UL"], cap=2)
    assert not over_cap("UL", ["UH", "UH", "UL"], cap=2)
    assert not over_cap("UH", ["UH"] * 10, cap=0)
    assert not over_cap(None, [None] * 10, cap=1)


# -- the pool, with real CLIs ------------------------------------------------------------


def slack(name: str, user: str, text: str) -> Inbound:
    return Inbound(f"slack:T1:C1:{name}", text, source="slack", user=user)


async def start_turn(pool: Pool, inbound: Inbound) -> asyncio.Task[Outcome]:
    turn = await pool.submit(inbound)
    return asyncio.ensure_future(turn.outcome)


async def hold_the_pool(pool: Pool, fake_model: FakeModel) -> asyncio.Task[Outcome]:
    """One heavy conversation running a long turn in the only room there is."""
    fake_model.add("slow", text="late", delay_s=30)
    running = await start_turn(pool, slack("h1", "UHEAVY", "slow h1"))
    await wait_until(lambda: any("slow h1" in r.last_said() for r in fake_model.requests), what="the heavy turn")
    return running


async def test_a_light_user_is_admitted_before_a_heavy_users_backlog(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    pool = await make_pool(pool={"max_sessions": 1, "prewarm": 0, "max_busy_per_user": 3})
    running = await hold_the_pool(pool, fake_model)
    backlog = [await start_turn(pool, slack(f"h{i}", "UHEAVY", f"slow h{i}")) for i in (2, 3)]
    refused = await (await pool.submit(slack("h4", "UHEAVY", "slow h4"))).outcome
    assert refused.failure is Failure.USER_LIMIT, refused
    light = await start_turn(pool, slack("l1", "ULIGHT", "a quick question"))
    await wait_until(lambda: len(pool._waiting) == 3, what="three conversations waiting for room")
    assert await pool.cancel("slack:T1:C1:h1")
    answer = await asyncio.wait_for(light, 60)
    assert answer.ok and "a quick question" in answer.reply
    assert not any(t.done() for t in backlog), "the heavy backlog went before the light user"
    assert running.done()


async def test_a_conversation_waits_for_room_at_most_the_admission_timeout(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    pool = await make_pool(pool={"max_sessions": 1, "prewarm": 0, "admission_timeout_s": 0.5})
    await hold_the_pool(pool, fake_model)
    waited = await (await pool.submit(slack("l1", "ULIGHT", "hello"))).outcome
    assert waited.failure is Failure.POOL_BUSY and "busy" in (waited.error or "")
    assert pool._live("slack:T1:C1:l1") is None  # nothing holds its place any more


async def test_a_full_admission_queue_refuses_at_once(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(pool={"max_sessions": 1, "prewarm": 0, "admission_queue_limit": 1})
    await hold_the_pool(pool, fake_model)
    waiting = await start_turn(pool, slack("l1", "ULIGHT", "first in line"))
    refused = await asyncio.wait_for((await pool.submit(slack("l2", "UOTHER", "second"))).outcome, 10)
    assert refused.failure is Failure.POOL_BUSY
    assert not waiting.done()
