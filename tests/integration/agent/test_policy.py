"""Profiles decide the tools: what is offered, what is denied, and what waits for a person's approval."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.core import Inbound, Store, ToolRequest, Verdict
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel, ToolUse

PROFILES = {"readonly": {"tools": ["Read", "Glob", "Grep"]}, "asker": {"tools": ["Read"], "ask_tools": ["Bash"]}}


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


async def test_a_conversation_keeps_its_profile_for_life(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(profiles=PROFILES, pool={"session_max_turns": 1})
    fake_model.add("first", tool=touch("allowed.txt"))
    fake_model.add("second", tool=touch("denied.txt"))
    assert (await pool.ask(Inbound("api:chat", "first"))).ok
    assert (await pool.ask(Inbound("api:p", "second", profile="readonly"))).ok
    (request,) = fake_model.find("second")
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    # Later messages name the chat profile, and the process was replaced in between: still read-only.
    fake_model.add("third", tool=touch("denied-too.txt"))
    assert (await pool.ask(Inbound("api:p", "third"))).ok
    (request,) = fake_model.find("third")
    assert {tool["name"] for tool in request.body["tools"]} == {"Read", "Glob", "Grep"}
    assert (await workdir(pool.store, "api:chat") / "allowed.txt").exists()
    work = await workdir(pool.store, "api:p")
    assert not (work / "denied.txt").exists() and not (work / "denied-too.txt").exists()
    record = await pool.store.get("api:p")
    assert record is not None and record.profile == "readonly"


async def test_ask_tools_wait_for_the_approver(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(profiles=PROFILES)
    for verdict in Verdict:
        approver = ScriptedApprover(verdict)
        fake_model.add(f"try {verdict}", tool=touch(f"{verdict}.txt"))
        assert (await pool.ask(Inbound("api:q", f"try {verdict}", profile="asker", approver=approver))).ok
        assert [r.tool for r in approver.requests] == ["Bash"]
        assert approver.requests[0].summary == f"echo made > {verdict}.txt"
    work = await workdir(pool.store, "api:q")
    assert sorted(p.name for p in work.glob("*.txt")) == ["approved.txt"]
    results = fake_model.tool_results()
    assert "a person denied this tool call" in results
    assert "nobody approved this tool call in time" in results


async def test_ask_without_an_approver_is_a_denial(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(profiles=PROFILES)
    fake_model.add("go", tool=touch("x.txt"))
    assert (await pool.ask(Inbound("api:r", "go", profile="asker"))).ok
    assert not (await workdir(pool.store, "api:r") / "x.txt").exists()
