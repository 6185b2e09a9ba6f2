"""The /status page in a real headless Chromium (Debian's, driven by Playwright), and its auth."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, Page, async_playwright

from bot.config import HttpConfig
from bot.core import Channel, ChannelStatus, Inbound
from bot.http import STATUS_COOKIE, Api
from bot.status import RecentEvents
from tests.conftest import PoolFactory
from tests.fakes.mailserver import MailServer, message
from tests.fakes.model import FakeModel, ToolUse
from tests.fakes.slack import FakeSlack
from tests.support import paths
from tests.support.helpers import wait_for
from tests.support.inproc import InProcessDaemon, running_daemon
from tests.support.mail_harness import running as mail_running
from tests.support.slack_harness import running as slack_running

TOKEN = "status-page-token-7f3a9c"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = paths.ARTIFACTS
HOSTILE = "slack:T1:<img src=x onerror=window.__pwned=1>:1.0"
WAIT_MS = 20_000


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, model: FakeModel, **sections: dict[str, Any]) -> AsyncIterator[InProcessDaemon]:
    # A fast sampler, so the memory chart has several points within a second or two.
    sections.setdefault("pool", {})["rss_sample_s"] = 0.2
    async with running_daemon(tmp_path, model, **sections) as running:
        yield running


async def ask(url: str, conversation: str, text: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.post(f"{url}/v1/conversations/{conversation}/messages", json={"text": text}) as response,
    ):
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def sign_in(page: Page, url: str) -> None:
    response = await page.goto(f"{url}/status")
    assert response is not None and response.status == 401
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{url}/status")


async def until(page: Page, condition: str) -> None:
    """Wait, with a deadline, until the JS ``condition`` holds (as a function: the page's CSP forbids eval)."""
    await page.wait_for_function(f"() => {condition}", timeout=WAIT_MS)


def row_of(conversation: str) -> str:
    """A JS expression: the sessions-table row showing ``conversation`` (compared as text), or undefined."""
    return (
        '[...document.querySelectorAll("#sessions tr")]'
        f".find((r) => r.querySelector('.conversation')?.textContent === {conversation!r})"
    )


async def test_status_page_shows_the_live_session_and_its_memory_chart(tmp_path: Path, fake_model: FakeModel) -> None:
    async with daemon(tmp_path, fake_model, http={"api_token": TOKEN}) as d, chromium() as browser:
        assert d.parts is not None
        assert (await ask(d.url, "live", "hello status"))["reply"] == "echo: hello status"
        pid = d.parts.pool._workers["api:live"].pid
        assert pid is not None
        page = await browser.new_page(viewport={"width": 1400, "height": 800})
        await sign_in(page, d.url)
        row = row_of("api:live")
        await until(page, f"{row}?.querySelector('.pid')?.textContent === '{pid}'")
        # The chart is an SVG polyline over the sampler's ring buffer: wait until it has drawn several points.
        points = f"{row}?.querySelector('polyline')?.getAttribute('points')?.trim().split(' ').length ?? 0"
        await until(page, f"{points} >= 3")
        cells = await page.evaluate(f"[...{row}.querySelectorAll('td')].map((c) => c.textContent)")
        assert cells[1:4] == ["chat", "warm", str(pid)] and cells[6] == "1" and float(cells[9]) > 0, cells
        assert "sessions 1 of max_sessions 20" in await page.inner_text("#sessions-total")
        assert "no Redis mirror" in await page.inner_text("#mirror-total")  # the embedded store: no mirror

        # It refreshes in place: a second turn shows up without the page reloading.
        await page.evaluate("window.__sameDocument = true")
        await ask(d.url, "live", "second turn")
        await until(page, f"{row}?.querySelectorAll('td')[6].textContent === '2'")
        assert await page.evaluate("window.__sameDocument") is True

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"status page screenshot: {shot}")
        assert shot.stat().st_size > 10_000


async def test_a_hostile_conversation_id_is_shown_as_text(tmp_path: Path, fake_model: FakeModel) -> None:
    async with daemon(tmp_path, fake_model) as d, chromium() as browser:
        assert d.parts is not None
        # Not through /v1 (its ids are restricted): Slack and mail ids carry whatever the sender chose.
        outcome = await d.parts.pool.ask(Inbound(conversation_id=HOSTILE, text="hi", source="slack"))
        assert outcome.ok, outcome.error
        await d.parts.pool.reset(HOSTILE)  # an eviction: the id shows in the recent events too
        await ask(d.url, "other", "keeps the table non-empty")
        page = await browser.new_page()
        response = await page.goto(f"{d.url}/status")
        assert response is not None and response.status == 200
        await until(page, f"[...document.querySelectorAll('#events td')].some((c) => c.textContent === {HOSTILE!r})")
        assert await page.evaluate("document.querySelectorAll('img').length") == 0
        assert await page.evaluate("window.__pwned") is None
        events = await page.inner_text("#events")
        assert HOSTILE in events and "reset" in events


@contextlib.asynccontextmanager
async def exposed_api(
    make_pool: PoolFactory, listen: str = "0.0.0.0:0", channels: Sequence[Channel] = ()
) -> AsyncIterator[str]:
    """The HTTP server listening on every interface (beyond loopback), with its required token."""
    pool = await make_pool()
    server = Api(HttpConfig(listen=listen, api_token=TOKEN), pool, pool.store, channels=channels)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def test_beyond_loopback_the_page_and_its_data_need_the_token(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/status") as response:
            assert response.status == 401
            page = await response.text()
        assert '<form method="post" action="/status/login">' in page and TOKEN not in page
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        async with http.get(f"{url}/v1/status") as response:
            assert response.status == 401
        async with http.get(f"{url}/v1/status", cookies={STATUS_COOKIE: "forged"}) as response:
            assert response.status == 401
        async with http.post(f"{url}/status/login", data={"token": "wrong"}) as response:
            assert response.status == 401 and "not the daemon&#x27;s API token" in await response.text()
        async with http.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200 and (await response.json())["pool"]["totals"]["max_sessions"] == 20


async def test_signing_in_sets_a_cookie_that_only_reads_status(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/status/login", data={"token": TOKEN}, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/status"
            set_cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and TOKEN not in set_cookie
        cookie = response.cookies[STATUS_COOKIE].value
        jar = {STATUS_COOKIE: cookie}
        async with http.get(f"{url}/status", cookies=jar) as response:
            assert response.status == 200 and 'id="sessions"' in await response.text()
        async with http.get(f"{url}/v1/status", cookies=jar) as response:
            assert response.status == 200
        # The cookie is for reading the page only: it does not stand in for the token anywhere else.
        async with http.post(f"{url}/v1/conversations/x/messages", json={"text": "hi"}, cookies=jar) as response:
            assert response.status == 401
        async with http.get(f"{url}/v1/sessions", cookies=jar) as response:
            assert response.status == 401


async def test_bad_sign_in_requests_are_refused_and_the_server_goes_on(make_pool: PoolFactory) -> None:
    bodies: list[dict[str, Any]] = [
        {"data": b"\xff\xfe not a form", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        {"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        {"json": {"token": TOKEN}},  # the token, but not as the form sends it
        {"data": {"token": "x" * 100_000}},
        {"data": {"other": TOKEN}},
    ]
    async with exposed_api(make_pool) as url, aiohttp.ClientSession() as http:
        for body in bodies:
            async with http.post(f"{url}/status/login", allow_redirects=False, **body) as response:
                assert response.status in (400, 401), (body, response.status)
                assert STATUS_COOKIE not in response.cookies
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200


async def test_the_browser_without_the_token_sees_only_the_sign_in_form(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool) as url, chromium() as browser:
        page = await browser.new_page()
        response = await page.goto(f"{url}/status")
        assert response is not None and response.status == 401
        assert await page.locator("#token").count() == 1
        assert await page.locator("#sessions").count() == 0
        data = await page.evaluate("fetch('/v1/status').then((r) => r.status)")
        assert data == 401
        assert "listens beyond loopback (0.0.0.0:0)" in await page.inner_text("body")


async def test_the_sign_in_page_says_where_the_daemon_listens(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool, listen="127.0.0.1:0") as url, chromium() as browser:
        page = await browser.new_page()
        response = await page.goto(f"{url}/status")
        assert response is not None and response.status == 401
        said = await page.inner_text("body")
        assert "listens only on loopback (127.0.0.1:0)" in said and "beyond" not in said


@dataclass
class StoppedSlack:
    """A channel as Slack's looks once the app was uninstalled: stopped for good, with the reason."""

    name: str = "slack"

    async def start(self) -> None: ...

    async def stop_intake(self) -> None: ...

    async def close(self) -> None: ...

    async def status(self) -> ChannelStatus:
        return ChannelStatus(self.name, False, 0, stopped="app_uninstalled: <b>reinstall</b> the app")


async def test_a_stopped_channel_shows_why_on_the_page(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool, channels=[StoppedSlack()]) as url, chromium() as browser:
        page = await browser.new_page()
        await sign_in(page, url)
        cell = '[...document.querySelectorAll("#channels tr td")].map((td) => td.textContent)'
        await until(page, f"{cell}.includes('stopped: app_uninstalled: <b>reinstall</b> the app')")
        assert await page.locator("#channels b").count() == 0  # the reason is text, never markup


async def test_sign_in_attempts_are_rate_limited_per_client(make_pool: PoolFactory) -> None:
    async with exposed_api(make_pool) as url, aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(8):
            async with http.post(f"{url}/status/login", data={"token": "guess"}, allow_redirects=False) as response:
                statuses.append(response.status)
                retry_after = response.headers.get("Retry-After")
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
        assert retry_after is not None and 1 <= int(retry_after) <= 10
        # Even the right token waits: the limit is on attempts, so guessing gains nothing.
        async with http.post(f"{url}/status/login", data={"token": TOKEN}, allow_redirects=False) as response:
            assert response.status == 429
        async with http.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200, "the API itself is not limited"


async def channel_status(url: str, name: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as response:
        assert response.status == 200
        channels = (await response.json())["channels"]
    return next((c for c in channels if c["name"] == name), {})


async def test_slack_shows_connected_and_counts_reconnects(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    async with slack_running(tmp_path, fake_model, slack) as d:
        status = await channel_status(d.url, "slack")
        assert status["connected"] is True and status["reconnects"] == 0
        await slack.disconnect()

        async def reconnected() -> bool:
            status.update(await channel_status(d.url, "slack"))
            return bool(status["connected"] and status["reconnects"] == 1)

        await wait_for(reconnected, what="the reconnect to be counted")


async def test_imap_shows_connected_its_idle_renewal_and_checkpoint(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer
) -> None:
    async with mail_running(tmp_path, fake_model, mail) as d:
        status: dict[str, Any] = {}

        async def idling() -> bool:
            status.update(await channel_status(d.url, "email"))
            return bool(status["connected"] and status["last_idle_renewal"])

        await wait_for(idling, what="the IMAP IDLE")
        assert abs(status["last_idle_renewal"] - time.time()) < 60 and status["reconnects"] == 0
        mail.deliver(message("checkpoint", "Move the checkpoint."))

        async def checkpointed() -> bool:
            status.update(await channel_status(d.url, "email"))
            return bool(status["checkpoint_uid"] == 1)

        await wait_for(checkpointed, what="the checkpoint to show the first UID")


async def test_budget_stops_and_jobs_are_in_the_snapshot(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("spend it", tool=ToolUse("Bash", {"command": "echo spent", "description": "spend"}))
    job = {"id": "nightly", "every": 3600, "prompt": "a job", "profile": "chat"}
    budget = {"per_message_usd": 0.0005}
    async with (
        daemon(tmp_path, fake_model, budget=budget, schedule=[job]) as d,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(f"{d.url}/v1/conversations/b1/messages", json={"text": "spend it"}) as response:
            assert (await response.json())["failure"] == "budget"
        async with http.post(f"{d.url}/v1/jobs/nightly/pause") as response:
            assert response.status == 200
        async with http.get(f"{d.url}/v1/status") as response:
            status = await response.json()
    [stop] = [e for e in status["pool"]["events"] if e["kind"] == "budget_stop"]
    assert stop["conversation_id"] == "api:b1" and "per message budget is used up" in stop["detail"]
    [nightly] = status["jobs"]
    assert nightly["id"] == "nightly" and nightly["paused"] is True and nightly["schedule"] == "every 3600s"
    assert status["problems"] == []


def test_recent_events_keep_only_the_newest() -> None:
    events = RecentEvents(size=3)
    for n in range(5):
        events.add("evict", f"c{n}", "idle")
    assert [e.conversation_id for e in events.items()] == ["c2", "c3", "c4"]
