"""Fakes of the services agentd talks to: the model API, Slack, an OTLP collector, an OAuth2 server, mail."""

from aiohttp import web


async def serve_on_loopback(runner: web.AppRunner, host: str = "127.0.0.1") -> str:
    """Start ``runner`` on a free port of ``host`` (loopback, unless a container must reach it); its base URL."""
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://{host}:{port}"
