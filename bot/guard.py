"""Checks on requests before any handler or parser sees them: who may send them, and what shape bodies have.

* Browsers: without an API token, a page on another site could drive the API (a simple cross-site POST)
  or read its answers (DNS rebinding). So without a token only loopback names and the listen address are
  accepted as ``Host``, and a foreign ``Origin`` is refused.
* Bodies: a JSON body nested deeper than ``MAX_JSON_DEPTH`` is refused by a linear scan before any
  (recursive) parser runs, so a nesting bomb is a 400, never a ``RecursionError``.
* Sign-in: a token bucket per client address keeps the form from being a password oracle.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field

# Slack's deepest real payloads (Block Kit inside views) stay far below this.
MAX_JSON_DEPTH = 64
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if brackets outside JSON strings nest deeper than ``limit`` (one pass, no recursion)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def form_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """The same for a urlencoded form, whose fields may carry JSON (Slack's ``payload=``)."""
    fields = urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)
    return any(json_depth_exceeds(value.encode("utf-8", "surrogateescape"), limit) for _, value in fields)


def host_name(host: str) -> str:
    """``Host`` without its port: ``[::1]:8080`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_hosts(listen_host: str) -> frozenset[str]:
    listen = listen_host.lower()
    bracketed = f"[{listen}]" if ":" in listen else listen
    return LOOPBACK_NAMES | {bracketed}


def origin_host(origin: str) -> str | None:
    """The host of an ``Origin`` header, or None for ``null`` and anything that is not http(s)."""
    parsed = urllib.parse.urlsplit(origin.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return host_name(parsed.netloc)


@dataclass
class SignInLimiter:
    """A token bucket per client address: ``burst`` attempts at once, then one per ``refill_s``."""

    burst: int = 5
    refill_s: float = 10.0
    max_clients: int = 10_000  # memory stays bounded however many addresses try
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, client: str) -> float:
        """0 if this attempt may go ahead (and it is counted), else the seconds until one may."""
        now = time.monotonic()
        tokens, stamp = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - stamp) / self.refill_s)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) * self.refill_s
        if client not in self._buckets and len(self._buckets) >= self.max_clients:
            self._buckets.pop(next(iter(self._buckets)))
        self._buckets[client] = (tokens - 1, now)
        return 0.0
