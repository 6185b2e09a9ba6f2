"""``agentd``: run the daemon, chat with it, list its sessions, show its config."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bot import daemon, logs
from bot.config import ConfigError, Settings, load_settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config or _env_config(), os.environ)
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log)
    try:
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, OSError) as exc:
        print(f"agentd: cannot reach the daemon at {_base_url(settings, args)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _env_config() -> Path | None:
    value = os.environ.get("AGENTD_CONFIG")
    return Path(value) if value else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentd", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: $AGENTD_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon")
    run.set_defaults(func=_run)
    chat = commands.add_parser("chat", help="talk to a conversation through a running daemon")
    chat.add_argument("conversation", nargs="?", default="terminal")
    chat.add_argument("--url", help="daemon base URL (default: from http.listen)")
    chat.set_defaults(func=_chat)
    sessions = commands.add_parser("sessions", help="list known conversations")
    sessions.add_argument("--url", help="daemon base URL (default: from http.listen)")
    sessions.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sessions.set_defaults(func=_sessions)
    config = commands.add_parser("config", help="print the effective config, secrets redacted")
    config.set_defaults(func=_config)
    for sub in (run, chat, sessions, config):
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config file")
    return parser


def _run(settings: Settings, args: argparse.Namespace) -> int:
    daemon.run(settings)
    return 0


def _config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(settings.redacted(), indent=2))
    return 0


def _base_url(settings: Settings, args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url).rstrip("/")
    host = settings.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.http.port}"


def _headers(settings: Settings) -> dict[str, str]:
    token = settings.http.api_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


def _sessions(settings: Settings, args: argparse.Namespace) -> int:
    rows = asyncio.run(_get_sessions(_base_url(settings, args), _headers(settings)))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_sessions(rows))
    return 0


async def _get_sessions(base: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{base}/v1/sessions") as response:
        body = await response.json()
        if response.status != 200:
            raise ConfigError(f"daemon answered {response.status}: {body.get('error')}")
        return list(body["sessions"])


def format_sessions(rows: list[dict[str, Any]]) -> str:
    columns = ["conversation_id", "session_id", "state", "pid", "rss_mb", "turns", "idle_s", "cost_usd"]
    titles = ["CONVERSATION", "SESSION", "STATE", "PID", "RSS MiB", "TURNS", "IDLE s", "COST $"]
    table = [titles] + [["-" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table)


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_chat_loop(_base_url(settings, args), _headers(settings), args.conversation))
    return 0


async def _chat_loop(base: str, headers: dict[str, str], conversation: str) -> None:
    url = f"{base}/v1/conversations/{conversation}/messages"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                return
            if line.strip():
                await _chat_turn(http, url, line)


async def _chat_turn(http: aiohttp.ClientSession, url: str, text: str) -> None:
    async with http.post(url, json={"text": text}, headers={"Accept": "text/event-stream"}) as response:
        if response.status != 200:
            body = await response.json()
            print(f"error: {body.get('error')}", file=sys.stderr)
            return
        print("agent> ", end="", flush=True)
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                _print_event(event, json.loads(line[6:]))


def _print_event(event: str, data: dict[str, Any]) -> None:
    if event == "delta":
        print(data["text"], end="", flush=True)
    elif event == "result":
        print(f"\n  [session {data['session_id']} · turn {data['turns']} · ${data['cost_usd']:.4f}]")
    elif event == "error":
        print(f"\nerror: {data.get('error')}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
