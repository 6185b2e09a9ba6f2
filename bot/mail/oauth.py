"""OAuth2 access tokens for IMAP and SMTP (SASL XOAUTH2 / OAUTHBEARER), refreshed before they expire.

One plain RFC 6749 token endpoint serves both providers teams use:

* Microsoft 365, a shared mailbox: the client-credentials grant at
  ``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`` with scope
  ``https://outlook.office365.com/.default``;
* Google Workspace: the refresh-token grant at ``https://oauth2.googleapis.com/token``.

A token is cached per credential in this process, shared by the IDLE watcher, the mail tools and
SMTP, and fetched again a minute before it expires or as soon as a server refuses it. The client
secret and refresh token are daemon secrets like the IMAP password: the agent never sees them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from bot.config import EmailConfig

REFRESH_MARGIN_S = 60.0
MAX_TOKEN_ANSWER_BYTES = 64 * 1024


class TokenError(Exception):
    """No access token could be had: the line says why."""


@dataclass
class _Cached:
    token: str = ""
    expires: float = 0.0


_CACHE: dict[tuple[str, str, str], _Cached] = {}
_LOCKS: dict[tuple[str, str, str], asyncio.Lock] = {}


def _key(config: EmailConfig) -> tuple[str, str, str]:
    return (config.oauth_token_url or "", config.oauth_client_id or "", config.imap_user or "")


async def access_token(config: EmailConfig) -> str:
    """A valid access token for ``config``'s mailbox, from the cache or the token endpoint."""
    key = _key(config)
    cached = _CACHE.setdefault(key, _Cached())
    async with _LOCKS.setdefault(key, asyncio.Lock()):
        if cached.token and cached.expires - REFRESH_MARGIN_S > time.monotonic():
            return cached.token
        cached.token, lifetime = await _fetch(config)
        cached.expires = time.monotonic() + lifetime
        return cached.token


def refused(config: EmailConfig) -> None:
    """The server refused the cached token (revoked, expired early): fetch a new one next time."""
    _CACHE.pop(_key(config), None)


def _grant(config: EmailConfig) -> dict[str, str]:
    form = {"client_id": config.oauth_client_id or ""}
    if config.oauth_client_secret is not None:
        form["client_secret"] = config.oauth_client_secret.get_secret_value()
    if config.oauth_refresh_token is not None:
        form |= {"grant_type": "refresh_token", "refresh_token": config.oauth_refresh_token.get_secret_value()}
    else:
        form["grant_type"] = "client_credentials"
    if config.oauth_scope:
        form["scope"] = config.oauth_scope
    return form


async def _fetch(config: EmailConfig) -> tuple[str, float]:
    url = config.oauth_token_url or ""
    timeout = aiohttp.ClientTimeout(total=config.command_timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(url, data=_grant(config), ssl=config.tls_context()) as response,
        ):
            body = await response.content.read(MAX_TOKEN_ANSWER_BYTES)
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenError(f"the token endpoint {url} could not be reached: {exc or type(exc).__name__}") from None
    return _parse(url, status, body)


def _parse(url: str, status: int, body: bytes) -> tuple[str, float]:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise TokenError(f"the token endpoint {url} answered {status} without a JSON object")
    if status != 200 or not isinstance(answer.get("access_token"), str):
        reason = answer.get("error_description") or answer.get("error") or f"HTTP {status}"
        raise TokenError(f"the token endpoint {url} refused: {str(reason)[:200]}")
    lifetime = answer.get("expires_in", 3600)
    return answer["access_token"], float(lifetime) if isinstance(lifetime, int | float) else 3600.0


def xoauth2(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial response (before base64)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def oauthbearer(user: str, token: str) -> str:
    """The SASL OAUTHBEARER initial response (RFC 7628, before base64)."""
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01"
