"""The Slack fake, driven by the real slack-sdk clients the daemon uses."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.slack import MAX_TEXT, FakeSlack
from tests.support.helpers import wait_until


@pytest.fixture
def fake_slack(slack: FakeSlack) -> FakeSlack:
    """The fake Slack of ``conftest``, under the name these tests use."""
    return slack


def client_for(fake: FakeSlack, **kwargs: Any) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-test", base_url=fake.url, **kwargs)


async def test_auth_post_update_and_react(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    auth = await client.auth_test()
    assert (auth["team_id"], auth["user_id"], auth["bot_id"]) == ("T0TEAM", "U0BOT", "B0BOT")

    posted = await client.chat_postMessage(channel="C1", thread_ts="1.0", text="hello")
    await client.chat_update(channel="C1", ts=posted["ts"], text="hello again")
    await client.reactions_add(channel="C1", timestamp="1.0", name="eyes")
    await client.reactions_add(channel="C1", timestamp="1.0", name="white_check_mark")
    await client.reactions_remove(channel="C1", timestamp="1.0", name="eyes")

    [message] = fake_slack.posted("C1", "1.0")
    assert (message["text"], message["method"], message["edits"]) == ("hello again", "chat.postMessage", 1)
    assert fake_slack.reactions("C1", "1.0") == ["white_check_mark"]
    assert fake_slack.calls_to("auth.test")[0].token == "xoxb-test"


async def test_limits_and_errors(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    with pytest.raises(SlackApiError, match="msg_too_long"):
        await client.chat_postMessage(channel="C1", text="x" * (MAX_TEXT + 1))
    posted = await client.chat_postMessage(channel="C1", text="x" * 5000)
    with pytest.raises(SlackApiError, match="msg_too_long"):
        await client.chat_update(channel="C1", ts=posted["ts"], text="y" * 5000)
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "z" * 3001}}
    with pytest.raises(SlackApiError, match="invalid_blocks"):
        await client.chat_postMessage(channel="C1", text="t", blocks=[section])
    with pytest.raises(SlackApiError, match="message_not_found"):
        await client.chat_update(channel="C1", ts="9.9", text="nope")
    fake_slack.status_api = False
    with pytest.raises(SlackApiError, match="not_allowed"):
        await client.assistant_threads_setStatus(channel_id="C1", thread_ts="1.0", status="is thinking…")
    assert len(fake_slack.calls_to("chat.postMessage")) == 3  # failed calls are recorded too


async def test_rate_limited_call_is_retried(fake_slack: FakeSlack) -> None:
    # slack-sdk sleeps Retry-After plus up to 1 s of jitter: 0 keeps this test fast.
    fake_slack.fail_next("chat.postMessage", retry_after=0)
    client = client_for(fake_slack, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)])
    await client.chat_postMessage(channel="C1", text="after the limit")
    assert len(fake_slack.calls_to("chat.postMessage")) == 2
    assert [m["text"] for m in fake_slack.posted("C1")] == ["after the limit"]


async def test_files_upload_v2_and_download(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    done = await client.files_upload_v2(content=b"report body", filename="a.txt", channel="C1", thread_ts="1.0")
    assert done["file"]["title"] == "a.txt"
    assert list(fake_slack.uploads.values()) == [b"report body"]
    assert fake_slack.shared_files("C1", "1.0") == [("a.txt", b"report body")]

    hosted = fake_slack.add_file("notes v1.txt", b"some notes")
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer xoxb-test"}
        async with session.get(hosted["url_private_download"], headers=headers) as response:
            assert (response.status, await response.read()) == (200, b"some notes")
        async with session.get(hosted["url_private_download"]) as response:
            assert response.status == 403


async def test_chat_stream(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    stream = await client.chat_stream(channel="D1", thread_ts="1.0", buffer_size=5)
    await stream.append(markdown_text="Hello ")  # fills the buffer: startStream
    await stream.append(markdown_text="world")  # appendStream
    await stream.stop(markdown_text="!")
    methods = [c.method for c in fake_slack.calls]
    assert methods == ["chat.startStream", "chat.appendStream", "chat.stopStream"]
    [message] = fake_slack.posted("D1", "1.0")
    assert (message["text"], message["streaming"]) == ("Hello world!", False)

    with pytest.raises(SlackApiError, match="missing_recipient_team_id"):
        await client.chat_startStream(channel="C1", thread_ts="1.0", markdown_text="hi")
    fake_slack.streaming = False
    with pytest.raises(SlackApiError, match="unknown_method"):
        await client.chat_startStream(channel="D1", thread_ts="1.0", markdown_text="hi")


async def test_socket_mode_events_acks_and_reconnect(fake_slack: FakeSlack) -> None:
    received: list[dict[str, Any]] = []

    async def on_request(client: AsyncBaseSocketModeClient, request: SocketModeRequest) -> None:
        received.append(request.payload)
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    web_client = AsyncWebClient(token="xoxb", base_url=fake_slack.url)
    socket = SocketModeClient(app_token="xapp-test", web_client=web_client)
    socket.socket_mode_request_listeners.append(on_request)
    try:
        await socket.connect()
        await fake_slack.wait_connected()
        event_id = await fake_slack.send_event(fake_slack.message_event("hi", mention=True))
        await wait_until(lambda: len(fake_slack.acks) == 1, 5, "the first ack")
        assert received[0]["event_id"] == event_id
        assert received[0]["event"]["text"] == "<@U0BOT> hi"

        await fake_slack.disconnect()
        await wait_until(lambda: fake_slack.connections == 2, 5, "a reconnect")
        await fake_slack.click(action_id="approve", value="yes", user="U0ALICE", channel="C1", message_ts="2.0")
        await wait_until(lambda: len(fake_slack.acks) == 2, 5, "the second ack")
        assert received[1]["actions"][0]["action_id"] == "approve"
        assert fake_slack.calls_to("apps.connections.open")[0].token == "xapp-test"
    finally:
        await socket.close()


async def test_assistant_thread_methods(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    prompts = [{"title": "Hi", "message": "Say hi"}]
    await client.assistant_threads_setSuggestedPrompts(channel_id="D1", thread_ts="1.0", prompts=prompts)
    await client.assistant_threads_setTitle(channel_id="D1", thread_ts="1.0", title="A title")
    assert fake_slack.suggested_prompts("D1", "1.0") == [prompts]
    assert fake_slack.titles("D1", "1.0") == ["A title"]
    with pytest.raises(SlackApiError, match="invalid_arguments"):
        await client.assistant_threads_setSuggestedPrompts(channel_id="D1", thread_ts="1.0", prompts=prompts * 5)
    with pytest.raises(SlackApiError, match="invalid_blocks"):
        await client.chat_postMessage(channel="D1", text="t", blocks=[{"type": "context_actions", "elements": []}])
    fake_slack.status_api = False  # a workspace without the AI-app feature
    with pytest.raises(SlackApiError, match="not_allowed"):
        await client.assistant_threads_setTitle(channel_id="D1", thread_ts="1.0", title="again")
