"""OpenTelemetry: the CLI's own metrics and events, and the daemon's turn spans, reach a local OTLP receiver."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ConfigError, TelemetryConfig, load_settings
from bot.security import INHERITABLE
from bot.telemetry import Telemetry, conversation_hash
from tests.fakes.model import FakeModel, RecordedRequest
from tests.fakes.otlp import OtlpSink
from tests.fakes.redis_server import free_port
from tests.integration.app.test_once import Once, clis_in, environ_of
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until

TOKEN = "otlp-ingest-token-123"
# What agentd may add to a CLI's environment on top of the allowlist, telemetry included.
OTEL_KEYS = {
    "CLAUDE_CODE_ENABLE_TELEMETRY",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_LOGS_EXPORT_INTERVAL",
    "OTEL_RESOURCE_ATTRIBUTES",
}


@pytest.fixture
async def sink() -> AsyncIterator[OtlpSink]:
    receiver = OtlpSink()
    await receiver.start()
    yield receiver
    await receiver.stop()


def telemetry_toml(sink: OtlpSink) -> str:
    return (
        f'[telemetry]\nendpoint = "{sink.url}"\nprotocol = "http/json"\nheaders = "x-otlp-token={TOKEN}"\n'
        "export_interval_ms = 300\nlogs_export_interval_ms = 300\n"
    )


def turn_spans(sink: OtlpSink) -> list[dict[str, object]]:
    return [s for s in sink.spans() if s["name"] == "agentd.turn"]


async def test_once_exports_the_cli_telemetry_and_a_turn_span(
    tmp_path: Path, fake_model: FakeModel, sink: OtlpSink
) -> None:
    ran = await Once(tmp_path, fake_model, toml=telemetry_toml(sink)).run("--prompt", "measure me", "--output", "json")
    assert ran.code == 0, ran.stderr
    # The CLI's own signals: exported while it ran or when it exited.
    await wait_until(lambda: bool(sink.of("metrics") or sink.of("logs")), what="the CLI's metrics or events")
    cli_exports = sink.of("metrics") + sink.of("logs")
    assert all(e.headers.get("x-otlp-token") == TOKEN and "json" in e.content_type for e in cli_exports)
    resources = sink.resource_attributes("metrics") + sink.resource_attributes("logs")
    assert any(r.get("agentd.profile") == "chat" and r.get("service.name") == "claude-code" for r in resources)
    # The daemon's span: sent before `once` returned (flushed at close).
    spans = turn_spans(sink)
    assert len(spans) == 1, sink.spans()
    attributes = spans[0]["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["agentd.profile"] == "chat" and attributes["agentd.outcome"] == "ok"
    assert attributes["agentd.channel"] == "once"
    assert float(attributes["agentd.cost_usd"]) == pytest.approx(json.loads(ran.stdout)["cost_usd"])
    assert re.fullmatch(r"[0-9a-f]{16}", str(attributes["agentd.conversation_hash"]))
    assert all(e.headers.get("x-otlp-token") == TOKEN for e in sink.of("traces"))


async def test_the_daemon_spans_each_turn_and_the_cli_gets_only_otel_settings(
    tmp_path: Path, fake_model: FakeModel, sink: OtlpSink
) -> None:
    seen: dict[int, dict[str, str]] = {}

    def capture(request: RecordedRequest) -> None:
        for proc in clis_in(tmp_path):
            if proc.info["name"] == "claude":
                seen[proc.pid] = environ_of(proc.pid)

    fake_model.on_request = capture
    planted = {"OTEL_TRACES_EXPORTER": "console", "OTEL_PYTHON_LOG_LEVEL": "debug", "PLAIN_DAEMON_VAR": "v-1"}
    daemon = DaemonProcess(tmp_path, fake_model.url, extra_env=planted, toml=telemetry_toml(sink))
    await daemon.start()
    try:
        for text in ("first", "second"):
            reply = await daemon.ask("traced", text)
            assert reply.get("reply") == f"echo: {text}", reply
        await wait_until(lambda: len(turn_spans(sink)) == 2, what="a span per turn")
        await wait_until(lambda: bool(sink.of("metrics") or sink.of("logs")), what="the CLI's telemetry")
    finally:
        assert await daemon.stop() == 0
    hashes = {s["attributes"]["agentd.conversation_hash"] for s in turn_spans(sink)}  # type: ignore[index]
    assert hashes == {conversation_hash("api:traced")}
    assert "traced" not in json.dumps(sink.spans()), "the conversation id itself is never exported"
    assert seen, "the CLI was seen while it worked"
    for environ in seen.values():
        # agentd sets ANTHROPIC_* itself (the gateway's URL, a credential): no value may be the daemon's.
        shared = {k for k, v in environ.items() if daemon.env.get(k) == v and k not in INHERITABLE}
        assert shared == set(), f"daemon variables reached the CLI: {shared}"
        telemetry = {k for k in environ if k.startswith("OTEL_") or "TELEMETRY" in k}
        assert telemetry == OTEL_KEYS | {"DISABLE_TELEMETRY"}
        assert environ["OTEL_EXPORTER_OTLP_ENDPOINT"] == sink.url
        assert environ["OTEL_EXPORTER_OTLP_HEADERS"] == f"x-otlp-token={TOKEN}"


async def test_an_unreachable_collector_does_not_fail_the_task(tmp_path: Path, fake_model: FakeModel) -> None:
    toml = f'[telemetry]\nendpoint = "http://127.0.0.1:{free_port()}"\nexport_interval_ms = 300\n'
    ran = await Once(tmp_path, fake_model, toml=toml).run("--prompt", "nobody listens")
    assert ran.code == 0, ran.stderr
    assert ran.stdout.strip() == "echo: nobody listens"


def test_telemetry_is_off_unless_configured() -> None:
    settings = load_settings(None, {})
    assert not settings.telemetry.active
    assert settings.telemetry.cli_environment("chat") == {}
    assert not Telemetry.start(settings.telemetry).enabled


def test_the_otel_variables_map_to_the_section(tmp_path: Path) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-tenant=t1",
        "OTEL_SERVICE_NAME": "agentd-prod",
    }
    settings = load_settings(None, environ)
    t = settings.telemetry
    assert t.active and t.base_url == "https://otel.example:4318" and t.service_name == "agentd-prod"
    assert t.header_map() == {"authorization": "Bearer abc", "x-tenant": "t1"}
    assert "abc" not in json.dumps(settings.redacted()), "the headers are a secret"
    assert load_settings(None, {"CLAUDE_CODE_ENABLE_TELEMETRY": "1"}).telemetry.base_url == "http://localhost:4318"
    off = TelemetryConfig(endpoint="http://127.0.0.1:4318", enabled=False)
    assert not off.active and off.cli_environment("chat") == {}
    assert TelemetryConfig(endpoint="http://127.0.0.1:4318", cli=False).cli_environment("chat") == {}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[telemetry]\nendpoint = "localhost:4318"\n', "telemetry.endpoint"),
        ('[telemetry]\nprotocol = "grpc"\n', "telemetry.protocol"),
        ('[telemetry]\nheaders = "no-equals-sign"\n', "headers must be key=value pairs"),
        ("[telemetry]\nexport_interval_ms = 0\n", "telemetry.export_interval_ms"),
        ("[telemetry]\nendpont = 1\n", "telemetry.endpont: unknown key"),
    ],
)
def test_bad_telemetry_config_is_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path, {})
