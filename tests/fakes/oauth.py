"""A local OAuth2 authorization server: a token endpoint (RFC 6749) and token introspection (RFC 7662).

Dovecot's ``oauth2`` passdb asks ``/introspect`` whether a token is active; agentd gets its tokens
from ``/token`` with the refresh-token or client-credentials grant. Tokens expire after
``lifetime_s`` and can be revoked, so a test sees a refresh and a refusal exactly as a provider
would make them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes import serve_on_loopback

CLIENT_ID = "agentd-test"
CLIENT_SECRET = "client-secret"
REFRESH_TOKEN = "refresh-1"


@dataclass
class OAuthServer:
    user: str = "agent"
    lifetime_s: float = 3600.0
    issued: list[str] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    introspected: list[str] = field(default_factory=list)
    refresh_valid: bool = True  # False: the refresh token was revoked, every grant is refused
    refused_grants: int = 0
    _expiry: dict[str, float] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/introspect", self._introspect)
        self._runner = web.AppRunner(app)
        self.url = await serve_on_loopback(self._runner)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def expire_all(self) -> None:
        for token in self._expiry:
            self._expiry[token] = 0.0

    def revoke_all(self) -> None:
        self.revoked.update(self._expiry)

    def active(self, token: str) -> bool:
        self.introspected.append(token)
        return token in self._expiry and token not in self.revoked and self._expiry[token] > time.monotonic()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = str(form.get("grant_type"))
        if grant == "refresh_token" and (form.get("refresh_token") != REFRESH_TOKEN or not self.refresh_valid):
            self.refused_grants += 1
            return web.json_response(
                {"error": "invalid_grant", "error_description": "refresh token revoked"}, status=400
            )
        if grant not in ("refresh_token", "client_credentials"):
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"access-{next(self._numbers)}"
        self._expiry[token] = time.monotonic() + self.lifetime_s
        self.issued.append(token)
        self.grants.append(grant)
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": int(self.lifetime_s)})

    async def _introspect(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self.active(str(form.get("token", ""))):
            return web.json_response({"active": False})
        return web.json_response({"active": True, "username": self.user})
