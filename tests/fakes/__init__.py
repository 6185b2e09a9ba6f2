"""Fakes of the services agentd talks to: the model API, Slack, an OTLP collector, an OAuth2 server, mail."""

from aiohttp import web


async def serve_on_loopback(runner: web.AppRunner) -> str:
    """Start ``runner`` on a free loopback port and return its base URL."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://127.0.0.1:{port}"
