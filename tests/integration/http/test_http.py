from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp_sse_client2 import client as sse_client

from bot import guard
from bot.config import ConfigError, HttpConfig
from bot.http import Api, with_keepalive
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.fakes.slack import FakeSlack
from tests.support.helpers import wait_for, wait_until
from tests.support.hostile import assert_linear
from tests.support.slack_harness import running as slack_running
from tests.support.slack_harness import wait_reply

TOKEN = "test-api-token-123"


@pytest.fixture
async def api_server(make_pool: PoolFactory) -> AsyncIterator[Api]:
    pool = await make_pool()
    server = Api(HttpConfig(listen="127.0.0.1:0", api_token=TOKEN, max_text_chars=1000), pool, pool.store)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def api(api_server: Api) -> str:
    return f"http://127.0.0.1:{api_server.port}"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_message_round_trip_and_sessions(api: str) -> None:
    async with aiohttp.ClientSession(headers=auth()) as http:
        async with http.post(f"{api}/v1/conversations/c1/messages", json={"text": "hi there"}) as response:
            assert response.status == 200
            body = await response.json()
        assert body["reply"] == "echo: hi there" and body["turns"] == 1 and body["session_id"]
        assert body["cost_usd"] >= 0
        async with http.get(f"{api}/v1/sessions") as response:
            (row,) = (await response.json())["sessions"]
        assert row["conversation_id"] == "api:c1" and row["state"] == "warm" and row["pid"] > 0
        assert set(row) == {"conversation_id", "session_id", "state", "pid", "rss_mb", "turns", "idle_s", "cost_usd"}


async def test_streaming_reply(api: str, fake_model: FakeModel) -> None:
    fake_model.chunk_size = 5
    fake_model.add("stream me", text="a fairly long streamed answer")
    events: list[tuple[str, dict[str, object]]] = []
    async with (
        aiohttp.ClientSession(headers=auth()) as http,
        http.post(
            f"{api}/v1/conversations/s1/messages", json={"text": "stream me"}, headers={"Accept": "text/event-stream"}
        ) as response,
    ):
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    deltas = [d["text"] for e, d in events if e == "delta"]
    assert len(deltas) > 3 and "".join(deltas) == "a fairly long streamed answer"  # type: ignore[arg-type]
    assert events[-1][0] == "result" and events[-1][1]["reply"] == "a fairly long streamed answer"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
async def test_api_requires_bearer_token(api: str, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{api}/v1/sessions") as response:
            assert response.status == 401
        async with http.post(f"{api}/v1/conversations/x/messages", json={"text": "hi"}) as response:
            assert response.status == 401
        async with http.get(f"{api}/healthz") as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("path_id", "body", "message"),
    [
        ("c", b"{not json", "JSON"),
        ("c", b'{"txt": "hi"}', "'text'"),
        ("c", b'{"text": ""}', "'text'"),
        ("c", b'{"text": 5}', "'text'"),
        ("c", b'["text"]', "'text'"),
        ("c", json.dumps({"text": "x" * 1001}).encode(), "longer than 1000"),
        ("a" * 129, b'{"text": "hi"}', "conversation id"),
        ("bad%20id", b'{"text": "hi"}', "conversation id"),
        ("c", b"\xff\xfe", "JSON"),
    ],
)
async def test_bad_requests_get_clear_400(api: str, path_id: str, body: bytes, message: str) -> None:
    async with aiohttp.ClientSession(headers=auth()) as http:
        async with http.post(
            f"{api}/v1/conversations/{path_id}/messages", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 400
            assert message in (await response.json())["error"]
        async with http.post(f"{api}/v1/conversations/ok/messages", json={"text": "still alive"}) as response:
            assert response.status == 200


async def test_readyz_and_metrics(api: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/readyz") as response:
            assert response.status == 200
        async with http.get(f"{api}/metrics") as response:
            assert "agentd_turns_total" in await response.text()


async def test_refuses_non_loopback_without_token(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = await make_pool()
    with pytest.raises(ConfigError, match="api_token"):
        Api(HttpConfig(listen="0.0.0.0:0"), pool, pool.store)
    Api(HttpConfig(listen="127.0.0.1:0"), pool, pool.store)


async def test_draining_refuses_new_messages_while_running_turns_finish(
    api_server: Api, api: str, fake_model: FakeModel
) -> None:
    fake_model.add("slowish", text="finished anyway", delay_s=1.0)
    async with aiohttp.ClientSession(headers=auth()) as http:

        async def ask(conversation: str, text: str, **headers: str) -> tuple[int, dict[str, object]]:
            url = f"{api}/v1/conversations/{conversation}/messages"
            async with http.post(url, json={"text": text}, headers=headers) as response:
                return response.status, await response.json()

        running = asyncio.create_task(ask("d1", "slowish"))
        await wait_until(lambda: bool(fake_model.find("slowish")), what="the running turn to reach the model")
        api_server.draining = True
        for headers in ({}, {"Accept": "text/event-stream"}):
            status, body = await ask("d2", "too late", **headers)
            assert status == 503 and body["failure"] == "shutdown" and "shutting down" in str(body["error"])
        status, body = await running
    assert status == 200 and body["reply"] == "finished anyway"
    assert not fake_model.find("too late")


@pytest.fixture
async def open_api(make_pool: PoolFactory) -> AsyncIterator[str]:
    """The quick start's defaults: loopback, no token."""
    pool = await make_pool()
    server = Api(HttpConfig(listen="127.0.0.1:0"), pool, pool.store)
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.stop()


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
        {"Origin": "https://evil.example", "Content-Type": "application/json"},
        {"Origin": "null", "Content-Type": "application/json"},
        {"Host": "evil.example", "Content-Type": "application/json"},
        {"Host": "evil.example:8080", "Content-Type": "application/json"},
        {"Host": "127.0.0.1.evil.example", "Content-Type": "application/json"},
    ],
)
async def test_without_a_token_foreign_pages_are_refused(
    open_api: str, fake_model: FakeModel, headers: dict[str, str]
) -> None:
    async with aiohttp.ClientSession() as http:
        body = json.dumps({"text": "run a turn"})
        async with http.post(f"{open_api}/v1/conversations/x/messages", data=body, headers=headers) as response:
            assert response.status == 403, await response.text()
        assert fake_model.requests == []
        # This machine's own clients still get in, under every loopback name.
        port = open_api.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            own = {"Host": host, "Origin": f"http://{host}"}
            async with http.get(f"{open_api}/v1/sessions", headers=own) as response:
                assert response.status == 200, host


async def test_the_api_takes_only_json_bodies(api: str) -> None:
    async with aiohttp.ClientSession(headers=auth()) as http:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            body = json.dumps({"text": "hi"})
            async with http.post(
                f"{api}/v1/conversations/c/messages", data=body, headers={"Content-Type": kind}
            ) as response:
                assert response.status == 415, kind
        async with http.post(f"{api}/v1/conversations/c/messages", json={"text": "still alive"}) as response:
            assert response.status == 200


def nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


async def test_nesting_bombs_get_400_before_any_parser(api: str) -> None:
    async with aiohttp.ClientSession(headers=auth()) as http:
        for body in (nested(30_000), b"[" * 60_000, b'{"a": "' + b"[" * 1000 + b'", "text": ' + nested(65)[9:]):
            async with http.post(
                f"{api}/v1/conversations/c/messages", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                assert response.status == 400 and "nested deeper" in (await response.json())["error"]
        # Brackets inside strings do not count, and ordinary nesting passes.
        text = {"text": "[" * 500 + '\\"{' * 100}
        async with http.post(f"{api}/v1/conversations/c/messages", json=text) as response:
            assert response.status == 200


def test_the_depth_scan_is_linear() -> None:
    assert_linear(guard.json_depth_exceeds, lambda n: b'["a\\"[",' * n + b"1" + b"]" * n, n=5000)
    assert_linear(guard.form_depth_exceeds, lambda n: b"payload=" + b"%5B" * n, n=5000)


async def test_a_nesting_bomb_to_slack_events_is_a_400_and_slack_goes_on(
    tmp_path: Path, fake_model: FakeModel, slack: FakeSlack
) -> None:
    async with slack_running(tmp_path, fake_model, slack, mode="http") as daemon:
        assert await daemon.post_event(b"[" * 400_000) == 400  # was an uncaught RecursionError, a 500
        assert await daemon.post_event(b'{"type": "event_callback", "event": ' + b"{" * 200_000 + b"}") == 400
        event = slack.message_event("after the bomb", mention=True)
        assert await daemon.post_event(json.dumps(slack.event_payload(event)).encode()) == 200
        await wait_reply(slack, "C0GENERAL", str(event["ts"]), "after the bomb")


@contextlib.asynccontextmanager
async def served(make_pool: PoolFactory, **http: Any) -> AsyncIterator[str]:
    pool = await make_pool()
    server = Api(HttpConfig(listen="127.0.0.1:0", api_token=TOKEN, **http), pool, pool.store)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def test_a_silent_turn_keeps_its_sse_stream_alive_through_an_idle_timeout(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    """A proxy that cuts a stream silent for 2 s (the client's read timeout) keeps a 4 s silent turn."""
    fake_model.add("think long", text="thought it over", delay_s=4)
    idle_proxy = aiohttp.ClientTimeout(total=None, sock_read=2)
    async with (
        served(make_pool, sse_keepalive_s=0.2) as url,
        aiohttp.ClientSession(headers=auth(), timeout=idle_proxy) as http,
        sse_client.EventSource(
            f"{url}/v1/conversations/sse/messages",
            option={"method": "POST"},
            session=http,
            max_connect_retry=0,
            json={"text": "think long"},
        ) as source,
    ):
        events = []
        async for event in source:
            events.append((event.type, json.loads(event.data)))
            if event.type in ("result", "error"):
                break
    assert events[-1] == ("result", events[-1][1]) and events[-1][1]["reply"] == "thought it over"
    assert "".join(str(data["text"]) for kind, data in events if kind == "delta") == "thought it over"


async def test_the_keep_alive_is_an_sse_comment(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    fake_model.add("pause", text="after a pause", delay_s=1)
    async with (
        served(make_pool, sse_keepalive_s=0.1) as url,
        aiohttp.ClientSession(headers=auth()) as http,
        http.post(
            f"{url}/v1/conversations/c/messages", json={"text": "pause"}, headers={"Accept": "text/event-stream"}
        ) as response,
    ):
        raw = await response.read()
    assert b"\n\n: keep-alive\n\n" in b"\n\n" + raw and raw.endswith(b"\n\n")


async def test_a_keep_alive_tick_loses_no_delta() -> None:
    """The tick's wait does not cancel the stream it waits on: the delta that comes after a tick arrives whole."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def deltas() -> AsyncIterator[str]:
        while (text := await queue.get()) is not None:
            yield text

    async with contextlib.aclosing(with_keepalive(deltas(), 0.01)) as ticked:
        assert await anext(ticked) is None, "silence: a tick"
        queue.put_nowait("after the tick")
        seen = [text async for text in _until_text(ticked)]
        queue.put_nowait(None)
        rest = [text async for text in ticked if text is not None]
    assert seen[-1] == "after the tick" and rest == []


async def _until_text(ticked: AsyncIterator[str | None]) -> AsyncIterator[str | None]:
    async for text in ticked:
        yield text
        if text is not None:
            return


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def healthy(url: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return response.status == 200


async def test_clients_that_stop_mid_header_are_closed_and_others_are_served(make_pool: PoolFactory) -> None:
    async with served(make_pool, header_timeout_s=0.5) as url:
        slow = [await connect(url) for _ in range(30)]
        for _, writer in slow:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        assert await healthy(url)
        # Each one is closed by the server: its read ends (EOF) without an answer.
        said = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in slow)), 30)
        assert said == [b""] * 30
        for _, writer in slow:
            writer.close()
        assert await healthy(url)


async def test_a_body_that_stops_coming_is_a_408(make_pool: PoolFactory) -> None:
    async with served(make_pool, body_timeout_s=0.5) as url:
        reader, writer = await connect(url)
        writer.write(
            b"POST /v1/conversations/c/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"text": "'
        )
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        assert status_line.split()[1] == b"408"
        assert await healthy(url)


async def test_connections_beyond_the_cap_are_refused_at_once(make_pool: PoolFactory) -> None:
    async with served(make_pool, max_connections=5, header_timeout_s=60) as url:
        held = [await connect(url) for _ in range(5)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
        # The next one is answered 503 and closed, without waiting for its request.
        reader, writer = await connect(url)
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ")
        for _, held_writer in held:
            held_writer.close()

        async def served_again() -> bool:
            try:
                return await healthy(url)
            except aiohttp.ClientError:
                return False

        await wait_for(served_again, what="room again once the held connections are gone")
