"""Scheduled jobs end to end: the real scheduler, pool and CLI, the fake model, the fake Slack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bot.store.redis import RedisStore
from tests.fakes.model import FakeModel, RecordedRequest
from tests.fakes.redis_server import RedisServer
from tests.fakes.slack import FakeSlack
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until
from tests.support.slack_harness import SlackDaemon, running

OPS = "C0OPS"


def job(job_id: str = "digest", **fields: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "every": 3600,
        "prompt": f"run {job_id}",
        "profile": "chat",
        "deliver_to": f"slack:{OPS}",
    } | fields


def posts(slack: FakeSlack, channel: str = OPS) -> list[str]:
    return [str(m.get("text") or "") for m in slack.posted(channel)]


async def api(daemon: SlackDaemon, method: str, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.request(method, f"{daemon.url}{path}") as response:
        return response.status, dict(await response.json())


def tool_names(request: RecordedRequest) -> set[str]:
    return {str(tool["name"]) for tool in request.body.get("tools", [])}


async def test_an_every_job_fires_and_posts_its_result_to_slack(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("run digest", text="DIGEST: all quiet")
    async with running(tmp_path, fake_model, slack, schedule=[job(every=1)]) as daemon:
        await wait_until(lambda: any("DIGEST: all quiet" in text for text in posts(slack)), what="the digest in #ops")
        status, body = await api(daemon, "GET", "/v1/jobs/digest/runs")
        assert status == 200 and body["runs"][0]["status"] == "ok"
        assert body["runs"][0]["delivered_to"] == f"slack:{OPS}"
        assert all(m.get("thread_ts") is None for m in slack.posted(OPS)), "a job posts at the top of the channel"


async def test_a_thread_target_gets_the_post_in_the_thread(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("run threaded", text="in the thread")
    target = f"slack:{OPS}:1700000000.000100"
    async with running(tmp_path, fake_model, slack, schedule=[job("threaded", deliver_to=target)]) as daemon:
        status, body = await api(daemon, "POST", "/v1/jobs/threaded/run")
        assert status == 200 and body["run"]["status"] == "ok", body
    assert [m["thread_ts"] for m in slack.posted(OPS)] == ["1700000000.000100"]


async def test_overlap_skip_records_a_skipped_run_while_one_is_busy(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("run slow", text="slow result", delay_s=3)
    async with running(tmp_path, fake_model, slack, schedule=[job("slow", overlap="skip")]) as daemon:
        first = asyncio.create_task(api(daemon, "POST", "/v1/jobs/slow/run"))
        await wait_until(lambda: bool(fake_model.find("run slow")), what="the first run reaching the model")
        status, second = await api(daemon, "POST", "/v1/jobs/slow/run")
        assert status == 200 and second["run"]["status"] == "skipped", second
        _, done = await first
        assert done["run"]["status"] == "ok"
        assert len(fake_model.find("run slow")) == 1
        _, runs = await api(daemon, "GET", "/v1/jobs/slow/runs")
        assert [r["status"] for r in runs["runs"]] == ["ok", "skipped"]


async def test_consecutive_failures_pause_the_job_and_alert_its_target(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("run flaky", text="too late", delay_s=5)
    flaky = job("flaky", every=1, max_failures_before_pause=2)
    async with running(tmp_path, fake_model, slack, schedule=[flaky], agent={"turn_timeout_s": 0.5}) as daemon:
        await wait_until(lambda: any("paused" in text for text in posts(slack)), timeout=30, what="the alert")
        alert = next(text for text in posts(slack) if "paused" in text)
        assert "flaky" in alert and "2 times" in alert and "agentd jobs resume flaky" in alert
        _, body = await api(daemon, "GET", "/v1/jobs")
        (row,) = body["jobs"]
        assert row["paused"] is True and row["last_status"] == "failed"
        requests = len(fake_model.find("run flaky"))
        await asyncio.sleep(2.5)  # two more intervals: a paused job must not fire (no event exists to wait on)
        assert len(fake_model.find("run flaky")) == requests
        _, runs = await api(daemon, "GET", "/v1/jobs/flaky/runs")
        # Skipped ticks (the previous run was still busy) neither fail nor count.
        assert [r["status"] for r in runs["runs"] if r["status"] != "skipped"] == ["failed", "failed"]
        assert "took too long" in runs["runs"][0]["error"]


async def test_run_pause_and_resume_through_the_api_and_the_cli(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("run manual", text="manual result")
    async with running(tmp_path, fake_model, slack, schedule=[job("manual")]) as daemon:
        assert await api(daemon, "POST", "/v1/jobs/manual/pause") == (200, {"job": "manual", "paused": True})
        _, listing = await api(daemon, "GET", "/v1/jobs")
        assert listing["jobs"][0]["paused"] is True
        assert (await api(daemon, "POST", "/v1/jobs/nope/run"))[0] == 404
        cli = ["--url", daemon.url]
        table = await agentd(tmp_path, "jobs", *cli)
        assert "manual" in table and "True" in table
        assert "manual: resumed" in await agentd(tmp_path, "jobs", "resume", "manual", *cli)
        assert "manual: ok" in await agentd(tmp_path, "jobs", "run", "manual", *cli)
        history = json.loads(await agentd(tmp_path, "jobs", "history", "manual", "--json", *cli))
        assert history["runs"][0]["status"] == "ok"
        assert "manual: paused" in await agentd(tmp_path, "jobs", "pause", "manual", *cli)
        _, listing = await api(daemon, "GET", "/v1/jobs")
        assert listing["jobs"][0]["paused"] is True
    assert any("manual result" in text for text in posts(slack))


async def agentd(tmp_path: Path, *args: str) -> str:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bot.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "AGENTD_STORE__DATA_DIR": str(tmp_path / "cli-data")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_a_run_and_a_user_message_on_one_conversation_are_serialized(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    fake_model.add("user asks", text="user answer", delay_s=1.5)
    fake_model.add("run shared", text="job answer")
    shared = job("shared", conversation="api:shared")
    # busy_policy reject refuses a person's second message; a scheduled run waits its turn instead.
    async with (
        running(tmp_path, fake_model, slack, schedule=[shared], pool={"busy_policy": "reject"}) as daemon,
        aiohttp.ClientSession() as http,
    ):
        user = asyncio.create_task(
            http.post(f"{daemon.url}/v1/conversations/shared/messages", json={"text": "user asks"})
        )
        await wait_until(lambda: bool(fake_model.find("user asks")), what="the user's turn")
        status, body = await api(daemon, "POST", "/v1/jobs/shared/run")
        assert status == 200 and body["run"]["status"] == "ok", body
        assert (await user).status == 200
    (run_request,) = fake_model.find("run shared")
    # The run's request carries the user's finished turn: it started only after that turn ended.
    assert "user answer" in run_request.all_text()


async def test_a_triage_run_gets_the_slack_tool_and_a_slack_turn_does_not(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    triage = job("triage", profile="triage")
    async with running(tmp_path, fake_model, slack, schedule=[triage], triage={"slack_channels": [OPS]}) as daemon:
        assert (await api(daemon, "POST", "/v1/jobs/triage/run"))[1]["run"]["status"] == "ok"
        thread = await slack.send_event(slack.message_event("hello there", channel="C0TEAM", mention=True))
        await wait_until(lambda: bool(fake_model.find("hello there")), what="the Slack turn")
    (run_request,) = fake_model.find("run triage")
    assert "mcp__slack__slack_post" in tool_names(run_request)
    assert not any(name.startswith("mcp__") for name in tool_names(fake_model.find("hello there")[0]))
    assert thread


async def test_two_daemons_on_one_redis_run_each_occurrence_once(
    tmp_path: Path, fake_model: FakeModel, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url, ttl_days=1)
    await store._redis.flushdb()
    fake_model.add("tick now", text="tock")
    schedule = '[[schedule]]\nid = "tick"\nevery = 2\nprompt = "tick now"\nprofile = "chat"\n'
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    daemons = [
        DaemonProcess(
            tmp_path / name,
            fake_model.url,
            extra_env={"REDIS_URL": redis_server.url},
            toml=f'{schedule}[cluster]\nreplica = "tick-{name}"\n',
        )
        for name in ("a", "b")
    ]
    try:
        for daemon in daemons:
            await daemon.start()
        await wait_until(lambda: len(fake_model.find("tick now")) >= 3, timeout=30, what="three occurrences")
    finally:
        for daemon in daemons:
            assert await daemon.stop() == 0
    claims = [key async for key in store._redis.scan_iter("agentd:job:fire:tick:*")]
    raw = await store.get_value("agentd:job:runs:tick")
    await store.close()
    runs = json.loads(raw or "[]")
    fire_times = [run["fire_time"] for run in runs if run["status"] == "ok"]
    assert len(fire_times) == len(set(fire_times)), "an occurrence ran twice"
    # Each model request is one run that finished ok (an occurrence claimed while the last one still ran is
    # skipped, which a loaded machine makes likely), and no run's occurrence was left unclaimed.
    assert len(fake_model.find("tick now")) == len(fire_times), "every run reached the model once"
    claimed = {(key if isinstance(key, str) else key.decode()).removeprefix("agentd:job:fire:tick:") for key in claims}
    assert set(fire_times) <= claimed, "a run without its claim"
