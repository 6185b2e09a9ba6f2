"""Tool policies are decided per turn on a warm process: allow, deny, and ask a person."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.core import Inbound, ToolPolicy, ToolRequest, Verdict
from bot.store import Store
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel, ToolUse

READ_ONLY = ToolPolicy(allow=frozenset({"Read", "Glob", "Grep"}))


class ScriptedApprover:
    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.requests: list[ToolRequest] = []

    async def __call__(self, request: ToolRequest) -> Verdict:
        self.requests.append(request)
        await asyncio.sleep(0)
        return self.verdict


def touch(name: str) -> ToolUse:
    return ToolUse("Bash", {"command": f"echo made > {name}", "description": "touch"})


async def workdir(store: Store, conversation_id: str) -> Path:
    record = await store.get(conversation_id)
    assert record is not None
    return Path(record.workdir)


async def test_a_narrower_policy_cannot_use_bash(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    fake_model.add("first", tool=touch("allowed.txt"))
    fake_model.add("second", tool=touch("denied.txt"))
    assert (await pool.ask(Inbound("api:p", "first"))).ok
    pid = pool.live_pids()
    outcome = await pool.ask(Inbound("api:p", "second", policy=READ_ONLY))
    # The tool set is fixed when a CLI starts: a narrower one gets a resumed successor process.
    assert outcome.ok and pool.live_pids() != pid
    (request,) = fake_model.find("second")
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    work = await workdir(pool.store, "api:p")
    assert (work / "allowed.txt").exists() and not (work / "denied.txt").exists()


async def test_ask_tools_wait_for_the_approver(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    for verdict in Verdict:
        approver = ScriptedApprover(verdict)
        policy = ToolPolicy(allow=frozenset({"Read"}), ask=frozenset({"Bash"}), approver=approver)
        fake_model.add(f"try {verdict}", tool=touch(f"{verdict}.txt"))
        assert (await pool.ask(Inbound("api:q", f"try {verdict}", policy=policy))).ok
        assert [r.tool for r in approver.requests] == ["Bash"]
        assert approver.requests[0].summary == f"echo made > {verdict}.txt"
    work = await workdir(pool.store, "api:q")
    assert sorted(p.name for p in work.glob("*.txt")) == ["approved.txt"]
    results = fake_model.tool_results()
    assert "a person denied this tool call" in results
    assert "nobody approved this tool call in time" in results


async def test_ask_without_an_approver_is_a_denial(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    fake_model.add("go", tool=touch("x.txt"))
    policy = ToolPolicy(allow=frozenset(), ask=frozenset({"Bash"}))
    assert (await pool.ask(Inbound("api:r", "go", policy=policy))).ok
    assert not (await workdir(pool.store, "api:r") / "x.txt").exists()
