"""The model gateway: the real key stays in the daemon, every request is metered, budgets stop work, errors pass."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from bot.config import PriceConfig
from bot.core import Failure, Inbound
from bot.gateway.ledger import Prices, Usage
from tests.fakes.mailserver import MailServer, message
from tests.fakes.model import FakeModel, ToolUse
from tests.fakes.slack import FakeSlack
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until
from tests.support.inproc import InProcessDaemon, running_daemon
from tests.support.mail_harness import running as mail_daemon
from tests.support.mail_harness import wait_replies
from tests.support.slack_harness import reply_text, wait_done
from tests.support.slack_harness import running as slack_daemon

REAL_KEY = "sk-test-anthropic-key"  # what tests.support.daemon_proc gives the daemon


daemon = running_daemon


async def ask(d: InProcessDaemon, conversation: str, text: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{d.url}/v1/conversations/{conversation}/messages", json={"text": text}) as response,
    ):
        return response.status, dict(await response.json())


def cli_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


async def test_the_real_key_never_enters_a_cli_process(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("show env", tool=ToolUse("Bash", {"command": "env", "description": "env"}))
    proc = DaemonProcess(tmp_path, fake_model.url, toml="sandbox = true\n")
    await proc.start()
    try:
        assert (await proc.ask("k", "hello"))["reply"] == "echo: hello"
        assert "error" not in await proc.ask("k", "show env")
        assert proc.process is not None
        clis = [p for p in psutil.Process(proc.process.pid).children(recursive=True) if p.name() == "claude"]
        assert clis, "a CLI process is running"
        for cli in clis:
            environ, cmdline = cli_environ(cli.pid), " ".join(cli.cmdline())
            assert REAL_KEY not in json.dumps(environ) and REAL_KEY not in cmdline
            assert environ["ANTHROPIC_API_KEY"].startswith("agentd-gw-")
            assert environ["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
            assert environ["ANTHROPIC_BASE_URL"] != fake_model.url
    finally:
        await proc.stop()
    assert REAL_KEY not in fake_model.tool_results(), "the env the agent's Bash sees"
    assert all(r.headers.get("x-api-key") == REAL_KEY for r in fake_model.requests), "the gateway adds the key"
    assert set(fake_model.paths) == {"POST /v1/messages?beta=true"}, "all a real agentd run's CLI sends"
    assert "gateway_path_refused" not in proc.log.read_text(), "the CLI asked for nothing the gateway refuses"


async def test_an_unknown_credential_is_refused(tmp_path: Path, fake_model: FakeModel) -> None:
    async with daemon(tmp_path, fake_model) as d:
        gateway_url = d.gateway_url()
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"x-api-key": "agentd-gw-guessed"}, {"x-api-key": REAL_KEY}):
                async with http.post(f"{gateway_url}/v1/messages", json={}, headers=headers) as response:
                    assert response.status == 401
    assert fake_model.requests == []


async def test_turns_and_tool_calls_work_and_sse_passes_byte_for_byte(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("make a file", tool=ToolUse("Write", {"file_path": "note.txt", "content": "hi"}))
    async with daemon(tmp_path, fake_model) as d:
        assert (await ask(d, "t", "first turn"))[1]["reply"] == "echo: first turn"
        status, body = await ask(d, "t", "make a file")
        assert status == 200, body
        # The same request straight through the gateway: the bytes the fake model streamed arrive unchanged.
        credential = d.issue_credential("api:probe")
        request = {
            "model": "claude-sonnet-4-5",
            "stream": True,
            "max_tokens": 10,
            "tools": [{"name": "x"}],
            "messages": [{"role": "user", "content": "bytes please"}],
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{d.gateway_url()}/v1/messages", json=request, headers={"x-api-key": credential}) as response,
        ):
            received = await response.read()
    assert received == bytes(fake_model.find("bytes please")[0].streamed)
    written = list((tmp_path / "data" / "work").glob("*/note.txt"))
    assert [f.read_text() for f in written] == ["hi"], written  # the tool call really ran


async def test_an_interrupt_hangs_up_the_upstream_request_and_what_it_cost_is_kept(
    tmp_path: Path, fake_model: FakeModel
) -> None:
    fake_model.add("very slow", text="never shown", delay_s=30)
    interrupted = 'agentd_model_requests_total{model="claude-sonnet-4-5",status="interrupted"}'
    async with daemon(tmp_path, fake_model, pool={"busy_policy": "interrupt"}) as d:
        before = await metric(d, interrupted)
        pool = d.parts.pool
        first = await pool.submit(Inbound("api:i", "very slow"))
        await wait_until(lambda: bool(fake_model.find("very slow")), what="the slow request upstream")
        second = await pool.submit(Inbound("api:i", "newer"))
        a, b = await asyncio.wait_for(asyncio.gather(first.outcome, second.outcome), 30)
        assert a.failure is Failure.INTERRUPTED and b.ok and b.reply == "echo: newer"
        # The CLI hung up on the gateway, and the gateway on the upstream: the fake model saw it go.
        await wait_until(lambda: fake_model.find("very slow")[0].cancelled, what="the upstream request cancelled")
        assert await metric(d, interrupted) == before + 1


async def metric(d: InProcessDaemon, sample: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{d.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_ledger_prices_every_request_exactly(tmp_path: Path, fake_model: FakeModel) -> None:
    async with daemon(tmp_path, fake_model) as d:
        costs = []
        for text in ("one", "two", "three"):
            status, body = await ask(d, "ledger", text)
            assert status == 200
            costs.append(body["cost_usd"])
        usage = await d.usage("conversation")
        by_user = await d.usage("user")
    prices = Prices({})
    # The fake reports 100 input and 20 output tokens for every request (turns and titles alike).
    expected = sum(prices.cost(Usage(str(r.body["model"]), 100, 20)) for r in fake_model.requests)
    assert usage["api:ledger"] == pytest.approx(expected, abs=1e-6)
    assert sum(costs) == pytest.approx(expected, abs=1e-5), "each answer reports the metered cost of its turn"
    assert by_user["api"] == pytest.approx(expected, abs=1e-6)


def test_prices_take_the_longest_prefix_and_overrides() -> None:
    prices = Prices({"claude-sonnet-4-5": PriceConfig(input=1, output=2, cache_write=3, cache_read=4)})
    assert prices.cost(Usage("claude-sonnet-4-5-20250929", 1_000_000, 0, 0, 0)) == 1
    assert prices.cost(Usage("claude-sonnet-4-20250514", 0, 1_000_000)) == 15
    assert prices.cost(Usage("some-new-model", 1_000_000)) >= 15, "unknown models are priced high, not free"


@pytest.mark.parametrize(
    ("budget", "limit_name"),
    [
        ({"per_message_usd": 0.0005}, "per message"),
        ({"per_conversation_day_usd": 0.002}, "per conversation day"),
        ({"per_user_day_usd": 0.002}, "per user day"),
        ({"global_day_usd": 0.002}, "global day"),
    ],
)
async def test_every_budget_level_stops_work_with_a_visible_reason(
    tmp_path: Path, fake_model: FakeModel, budget: dict[str, float], limit_name: str
) -> None:
    fake_model.add("spend", tool=ToolUse("Bash", {"command": "echo spent", "description": "spend"}))
    async with daemon(tmp_path, fake_model, budget=budget) as d:
        baseline = await budget_stops(d)
        stopped: dict[str, Any] = {}
        for attempt in range(8):
            status, body = await ask(d, "b", f"spend {attempt}")
            if status != 200:
                stopped = body
                break
        assert stopped.get("failure") == "budget", stopped
        assert limit_name in stopped["error"] and "spent" in stopped["error"] and "resets" in stopped["error"]
        # Exactly one refusal: the CLI ended the turn at the 402, without retrying it.
        assert await budget_stops(d) == baseline + 1
        requests = len(fake_model.requests)
        if limit_name != "per message":  # a day budget keeps refusing, with no request reaching the model
            status, body = await ask(d, "b", "spend again")
            assert status == 402 and body["failure"] == "budget"
            assert len(fake_model.requests) == requests


async def budget_stops(d: InProcessDaemon) -> float:
    """Budget refusals in this process (the counter is process-wide: tests compare against a baseline)."""
    total = 0.0
    async with aiohttp.ClientSession() as http, http.get(f"{d.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("agentd_budget_stops_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize(
    "failure",
    [{"status": 429, "headers": {"retry-after": "1"}}, {"status": 529}, {"drop": True}],
    ids=["429 retry-after", "529 overloaded", "dropped stream"],
)
async def test_upstream_errors_pass_through_and_the_cli_retries(
    tmp_path: Path, fake_model: FakeModel, failure: dict[str, Any]
) -> None:
    fake_model.add("flaky upstream", text="answered after a retry")
    # Rules added later match first: one failure, then the plain answer.
    fake_model.add("flaky upstream", once=True, **failure)
    async with daemon(tmp_path, fake_model) as d:
        status, body = await ask(d, "u", "flaky upstream please")
        assert status == 200 and body["reply"] == "answered after a retry", body
        assert (await ask(d, "u", "still serving"))[0] == 200
        key = d.settings.agent.api_key
    attempts = fake_model.find("flaky upstream")
    assert len(attempts) >= 2, "the CLI retried through the gateway"
    assert key is not None and all(r.headers.get("x-api-key") == key.get_secret_value() for r in attempts)


async def test_a_budget_stop_is_told_in_slack(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    fake_model.add("spend in slack", tool=ToolUse("Bash", {"command": "echo spent", "description": "spend"}))
    async with slack_daemon(tmp_path, fake_model, slack, budget={"per_message_usd": 0.0005}):
        event = slack.message_event("spend in slack", mention=True)
        await slack.send_event(event)
        ts = str(event["ts"])
        assert await wait_done(slack, "C0GENERAL", ts) == ["x"]
        assert "per message budget is used up" in reply_text(slack, "C0GENERAL", ts)


async def test_a_budget_stop_is_told_in_the_email_reply(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    fake_model.add("spend by mail", tool=ToolUse("Read", {"file_path": "nothing.txt"}))
    async with mail_daemon(tmp_path, fake_model, mail, budget={"per_message_usd": 0.0005}) as d:
        sent = message("budget", "Please spend by mail.")
        mail.deliver(sent)
        [reply] = await wait_replies(mail, 1)
        assert (await d.outcome(str(sent["Message-ID"])))["status"] == "failed_replied"
    text = reply.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "per message budget is used up" in text and "resets" in text


async def test_a_job_run_is_stopped_by_its_own_budget(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("costly run", tool=ToolUse("Bash", {"command": "echo spent", "description": "spend"}))
    job = {"id": "costly", "every": 3600, "prompt": "costly run", "profile": "chat"}
    # The per-message budget is generous: only the job-run budget can stop this run.
    budget = {"per_job_run_usd": 0.0005, "per_message_usd": 1.0}
    async with daemon(tmp_path, fake_model, schedule=[job], budget=budget) as d:
        async with aiohttp.ClientSession() as http, http.post(f"{d.url}/v1/jobs/costly/run") as response:
            run = (await response.json())["run"]
        assert run["status"] == "failed" and "per job run budget is used up" in run["error"], run
        assert (await ask(d, "person", "a person's message is not a job run"))[0] == 200


async def test_a_spare_warms_up_without_a_trace(tmp_path: Path, fake_model: FakeModel) -> None:
    from bot.agent.session import WARM_UP_PROMPT

    async with daemon(tmp_path, fake_model, pool={"prewarm": 1, "session_max_turns": 2}) as d:
        assert d.parts is not None
        pool = d.parts.pool
        await wait_until(lambda: bool(pool._spares) and pool._spares[0].state == "warm", what="a warmed spare")
        await wait_until(lambda: pool._spares[0].preheated, what="the spare's warm-up")
        spare_session = pool._spares[0].record.session_id
        status, first = await ask(d, "fresh", "first real message")
        assert status == 200 and first["reply"] == "echo: first real message"
        assert first["session_id"] == spare_session, "the conversation continues the session the spare cleared into"
        assert (await ask(d, "fresh", "second message"))[0] == 200
        # The turn ceiling retires the process: the third message resumes from the transcript.
        status, third = await ask(d, "fresh", "third message")
        assert status == 200 and third["session_id"] == spare_session
    everything = json.dumps([r.body for r in fake_model.requests])
    assert WARM_UP_PROMPT not in everything, "the warm-up never reached the upstream"
    history = fake_model.find("third message")[-1].all_text()
    assert "first real message" in history and "second message" in history
    # No warm-up text; the CLI does keep a "/clear" command marker at the start of the new history.
    assert "warm-up" not in history and "reply with OK" not in history


async def raw_status(url: str, request_line: str, headers: str = "", body: bytes = b"") -> int:
    """The status of one request sent byte for byte, so no client library normalises its path."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"{request_line}\r\nHost: {host}:{port}\r\n{headers}Content-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        status_line = await asyncio.wait_for(reader.readline(), 30)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_only_the_messages_api_is_forwarded_and_path_tricks_are_refused(
    tmp_path: Path, fake_model: FakeModel
) -> None:
    async with daemon(tmp_path, fake_model) as d:
        assert (await ask(d, "t", "first turn"))[1]["reply"] == "echo: first turn"
        used = set(fake_model.paths)
        credential = d.issue_credential("api:probe")
        headers = f"x-api-key: {credential}\r\nContent-Type: application/json\r\n"
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}).encode()
        fake_model.paths.clear()
        tricks = [
            "POST /v1/./messages HTTP/1.1",
            "POST /v1/x/../messages HTTP/1.1",
            "POST /v1/%2e/messages HTTP/1.1",
            "POST /v1%2fmessages HTTP/1.1",
            "POST /v1/messages/batches HTTP/1.1",
            "GET /v1/files HTTP/1.1",
            "GET /v1/messages HTTP/1.1",
            "POST //v1/messages HTTP/1.1",
            "POST /v1/messages?beta=true&x=1 HTTP/1.1",
        ]
        for line in tricks:
            assert await raw_status(d.gateway_url(), line, headers, body) == 403, line
        assert fake_model.paths == [], "nothing refused reached the upstream"
        assert await raw_status(d.gateway_url(), "POST /v1/messages/count_tokens HTTP/1.1", headers, body) == 200
        assert await raw_status(d.gateway_url(), "POST /v1/messages?beta=true HTTP/1.1", headers, body) == 200
    assert used == {"POST /v1/messages?beta=true"}, "what the bundled CLI sends during a warm-up and a turn"
