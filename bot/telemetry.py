"""The daemon's own OpenTelemetry: one span per turn, exported over OTLP/HTTP to ``[telemetry].endpoint``.

Off unless ``[telemetry]`` is active: then no SDK is imported, no exporter built, no thread started.
The tracer provider is this object's own, never the process-global one, so nothing else in the
process (a library's instrumentation) starts exporting because agentd does.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import structlog

from bot.config import TelemetryConfig
from bot.core import Outcome

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger(__name__)

SPAN_NAME = "agentd.turn"
# One export, retries included: an unreachable collector delays shutdown (and `once`) by at most this.
EXPORT_TIMEOUT_S = 3.0
FLUSH_TIMEOUT_MS = int(EXPORT_TIMEOUT_S * 1000)


def conversation_hash(conversation_id: str) -> str:
    """A stable pseudonym: spans can be grouped by conversation without naming it (a mail address, a channel)."""
    return hashlib.sha256(conversation_id.encode()).hexdigest()[:16]


class Telemetry:
    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider

    @classmethod
    def start(cls, config: TelemetryConfig) -> Telemetry:
        if not config.active:
            return cls(None)
        # Imported here: without telemetry the SDK is not even loaded.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = OTLPSpanExporter(
            endpoint=f"{config.base_url}/v1/traces", headers=config.header_map(), timeout=EXPORT_TIMEOUT_S
        )
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=config.export_interval_ms))
        log.info("telemetry_on", endpoint=config.base_url, cli=config.cli)
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def record_turn(self, outcome: Outcome, profile: str, channel: str, started_ns: int) -> None:
        """One finished turn as a span from ``started_ns`` (``time.time_ns()``) to now."""
        if self._provider is None:
            return
        tracer = self._provider.get_tracer("agentd")
        span = tracer.start_span(SPAN_NAME, start_time=started_ns)
        span.set_attributes(
            {
                "agentd.conversation_hash": conversation_hash(outcome.conversation_id),
                "agentd.profile": profile,
                "agentd.channel": channel,
                "agentd.outcome": str(outcome.failure or "ok"),
                "agentd.cost_usd": outcome.cost_usd,
                "agentd.turns": outcome.turns,
            }
        )
        if outcome.failure is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, str(outcome.failure)))
        span.end(end_time=time.time_ns())

    def close(self) -> None:
        """Export what is buffered and stop the export thread (blocking: run it in a thread)."""
        if self._provider is not None:
            self._provider.force_flush(FLUSH_TIMEOUT_MS)
            self._provider.shutdown()
            self._provider = None


DISABLED = Telemetry(None)
