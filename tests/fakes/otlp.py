"""A tiny OTLP/HTTP receiver: records every POST to /v1/metrics, /v1/logs and /v1/traces.

Bodies are kept raw; ``spans()`` decodes traces (protobuf, what the daemon's exporter sends, or JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fakes import serve_on_loopback

SIGNALS = ("metrics", "logs", "traces")


@dataclass(frozen=True)
class Export:
    signal: str
    content_type: str
    headers: dict[str, str]
    body: bytes

    def as_dict(self) -> dict[str, Any]:
        if "json" in self.content_type:
            return dict(json.loads(self.body))
        if self.signal == "traces":
            return MessageToDict(ExportTraceServiceRequest.FromString(self.body))
        return {}


@dataclass
class OtlpSink:
    exports: list[Export] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=16 << 20)
        for signal in SIGNALS:
            app.router.add_post(f"/v1/{signal}", self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.url = await serve_on_loopback(self._runner)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        signal = request.path.rsplit("/", 1)[1]
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.exports.append(Export(signal, request.content_type, headers, await request.read()))
        if "json" in request.content_type:
            return web.json_response({})
        return web.Response(body=b"", content_type="application/x-protobuf")

    def of(self, signal: str) -> list[Export]:
        return [e for e in self.exports if e.signal == signal]

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, each with its attributes flattened to ``{key: value}``."""
        found = []
        for export in self.of("traces"):
            for resource in export.as_dict().get("resourceSpans", []):
                for scope in resource.get("scopeSpans", []):
                    for span in scope.get("spans", []):
                        found.append({**span, "attributes": _attributes(span.get("attributes", []))})
        return found

    def resource_attributes(self, signal: str) -> list[dict[str, Any]]:
        """The resource attributes of every export of one signal (JSON exports only)."""
        found = []
        key = {"metrics": "resourceMetrics", "logs": "resourceLogs", "traces": "resourceSpans"}[signal]
        for export in self.of(signal):
            for resource in export.as_dict().get(key, []):
                found.append(_attributes(resource.get("resource", {}).get("attributes", [])))
        return found


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for item in items:
        value = item.get("value", {})
        flat[item["key"]] = next(iter(value.values()), None) if value else None
    return flat
