"""``agentd doctor``'s Slack check: the tokens are accepted and the bot token holds every scope agentd uses."""

from __future__ import annotations

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import SlackConfig
from bot.probe import Caveat, ProbeFailed

# The bot scopes deploy/slack-app-manifest.yaml asks for (a test keeps the two in step).
MANIFEST_SCOPES = frozenset(
    {
        "app_mentions:read",
        "assistant:write",
        "channels:history",
        "groups:history",
        "im:history",
        "mpim:history",
        "chat:write",
        "reactions:write",
        "files:read",
        "files:write",
        "users:read",
    }
)
_REFUSED = {"invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive"}
_REINSTALL = "add them to the app (deploy/slack-app-manifest.yaml lists them) and reinstall it to the workspace"


async def probe_slack(config: SlackConfig, timeout_s: float) -> str:
    """``auth.test`` with the bot token, its granted scopes against the manifest's, and the app token if set."""
    assert config.bot_token is not None
    client = AsyncWebClient(
        token=config.bot_token.get_secret_value(),
        base_url=config.api_url or AsyncWebClient.BASE_URL,
        timeout=max(1, int(timeout_s)),
    )
    try:
        identity = await client.auth_test()
        if config.app_token is not None:
            await client.apps_connections_open(app_token=config.app_token.get_secret_value())
    except SlackApiError as exc:
        raise _refused(exc) from None
    except (SlackClientError, aiohttp.ClientError, OSError) as exc:
        raise ProbeFailed(
            f"cannot reach Slack: {exc}", "check the network path to slack.com (or slack.api_url)"
        ) from None
    mode = "Socket Mode" if config.app_token is not None else "HTTP Events"
    who = f"bot {identity.get('user')} in team {identity.get('team_id')}"
    header = identity.headers.get("x-oauth-scopes")
    if header is None:  # Slack always sends it; a proxy in between may not
        raise Caveat(f"{who}, {mode}; Slack sent no x-oauth-scopes, so the scopes were not checked")
    missing = sorted(MANIFEST_SCOPES - {s.strip() for s in str(header).split(",")})
    if missing:
        raise ProbeFailed(f"the bot token lacks the scopes {', '.join(missing)}", _REINSTALL)
    return f"{who}, all {len(MANIFEST_SCOPES)} scopes, {mode}"


def _refused(exc: SlackApiError) -> ProbeFailed:
    error = str(exc.response.get("error", "unknown_error"))
    method = str(exc.response.api_url).rstrip("/").rpartition("/")[2]
    if method == "apps.connections.open":
        return ProbeFailed(
            f"Slack refused the app token ({error})",
            "set SLACK_APP_TOKEN to an app-level token (xapp-...) with the connections:write scope",
        )
    if error in _REFUSED:
        return ProbeFailed(
            f"Slack refused the bot token ({error})",
            "set SLACK_BOT_TOKEN to the app's Bot User OAuth Token (xoxb-...) from OAuth & Permissions",
        )
    return ProbeFailed(f"auth.test failed: {error}", "check SLACK_BOT_TOKEN and the app's installation")
