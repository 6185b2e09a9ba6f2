"""``agentd``: run the daemon, chat with it, list its sessions, show its config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.probe import DEFAULT_TIMEOUT_S

# Only what parsing the command line needs is imported here. The config (pydantic), the HTTP client
# and the engine (the SDK, Slack, IMAP, the scheduler) come with the commands that use them, so
# `--help` starts at once and the commands that only talk HTTP to a daemon load no engine.
if TYPE_CHECKING:
    import aiohttp

    from bot.agent.transcripts import Transcripts
    from bot.app.once import OnceRequest, OnceResult
    from bot.config import Settings


class CommandFailed(Exception):
    """The command cannot be done as given (a missing argument, the daemon's refusal): one line, exit 2."""


class DaemonUnreachable(OSError):
    """The daemon could not be reached (refused, reset, timed out), whichever HTTP client found it."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bot.app import handover

    if args.command in ("run", "once") and argv is None and not handover.take_handed_over(os.environ):
        handover.reexec_without_secrets(os.environ)  # returns only when there are no secrets to move
    if args.command == "doctor":  # an invalid config is one of its findings, not a stop
        from bot.app import doctor

        return doctor.main(args.config or _env_config(), os.environ, args.timeout)
    from bot import logs
    from bot.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config or _env_config(), os.environ)
    except ConfigError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log)
    try:
        return int(args.func(settings, args))
    except (ConfigError, CommandFailed) as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # DaemonUnreachable, urllib's URLError and the socket errors are all OSErrors
        print(f"agentd: cannot reach the daemon at {_base_url(settings, args)}: {_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _reason(exc: OSError) -> object:
    return getattr(exc, "reason", None) or exc


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
    sessions = commands.add_parser(
        "sessions", help="list known conversations; import: copy the local transcripts into Redis"
    )
    sessions.add_argument("action", nargs="?", choices=["list", "import"], default="list")
    sessions.add_argument("--url", help="daemon base URL (default: from http.listen)")
    sessions.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sessions.set_defaults(func=_sessions)
    config = commands.add_parser("config", help="print the effective config, secrets redacted")
    config.set_defaults(func=_config)
    jobs = _jobs_parser(commands)
    usage = commands.add_parser("usage", help="metered model cost, by conversation, user, profile, channel or day")
    usage.add_argument("--by", choices=["conversation", "user", "profile", "channel", "day"], default="conversation")
    usage.add_argument("--url", help="daemon base URL (default: from http.listen)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=_usage)
    check = commands.add_parser("doctor", help="check the setup: config, CLI, model API, Redis, channels, sandbox")
    check.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per check")
    once = _once_parser(commands)
    for sub in (run, chat, sessions, config, jobs, usage, check, once):
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config file")
    return parser


def _jobs_parser(commands: Any) -> argparse.ArgumentParser:
    jobs = commands.add_parser("jobs", help="scheduled jobs: list, or run / pause / resume / history ID")
    jobs.add_argument("action", nargs="?", choices=["list", "run", "pause", "resume", "history"], default="list")
    jobs.add_argument("job_id", nargs="?", help="the job's id (all but list)")
    jobs.add_argument("--url", help="daemon base URL (default: from http.listen)")
    jobs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    jobs.set_defaults(func=_jobs)
    return jobs  # type: ignore[no-any-return]


def _once_parser(commands: Any) -> argparse.ArgumentParser:
    once = commands.add_parser(
        "once", help="run one task on a fresh agent process and print its result (nothing stays running)"
    )
    once.add_argument("--profile", default="chat", help="the profile the task runs as (default: chat)")
    once.add_argument("--prompt", help="the task; absent or '-': read it from stdin")
    once.add_argument("--cwd", type=Path, help="the agent's working directory (default: a temp dir, removed after)")
    once.add_argument("--output", choices=["text", "json"], default="text", help="text, or one JSON object")
    once.set_defaults(func=_once)
    return once  # type: ignore[no-any-return]


def _once(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from bot import logs
    from bot.app.once import OnceRequest
    from bot.security import scrub_environ

    _refuse_without_sandbox(settings)
    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if not prompt.strip():
        raise CommandFailed("once: the prompt is empty (give --prompt TEXT or write it to stdin)")
    if settings.log.level == "info":
        # The result goes to stdout and a failure is one line on stderr: routine logs would bury it.
        logs.configure(settings.log.model_copy(update={"level": "warning"}))
    # As for `agentd run`: no secret of this process's environment may reach the CLI.
    scrub_environ(os.environ, settings.agent.env_passthrough)
    request = OnceRequest(profile=args.profile, prompt=prompt, cwd=args.cwd)
    try:
        result = asyncio.run(_once_main(settings, request))
    except OSError as exc:  # data_dir not writable, the gateway's port taken: not "cannot reach the daemon"
        print(f"agentd: once failed: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print("agentd: once: interrupted", file=sys.stderr)
        return 130
    if args.output == "json":
        print(json.dumps(dataclasses.asdict(result)))
    elif result.ok:
        print(result.result)
    if not result.ok:
        print(f"agentd: once failed ({result.outcome}): {result.error}", file=sys.stderr)
        return 1
    return 0


async def _once_main(settings: Settings, request: OnceRequest) -> OnceResult | None:
    """The task, or None when SIGINT or SIGTERM stopped it (the CLI and gateway are closed by then)."""
    import asyncio
    import signal

    task = asyncio.current_task()
    assert task is not None
    # SIGINT too, explicitly: a parent that ignores it (a shell's background job, a supervisor) passes the
    # ignore on through exec, and asyncio's own Ctrl-C handling then never sees it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    try:
        from bot.app.once import run_once

        return await run_once(settings, request)
    except asyncio.CancelledError:
        return None


def _run(settings: Settings, args: argparse.Namespace) -> int:
    _refuse_without_sandbox(settings)
    from bot.app import daemon
    from bot.app.datadir import DataDirInUse
    from bot.fleet.name import ReplicaNameTaken

    try:
        daemon.run(settings)
    except (DataDirInUse, ReplicaNameTaken) as exc:
        raise CommandFailed(str(exc)) from None
    return 0


def _refuse_without_sandbox(settings: Settings) -> None:
    if refusal := settings.sandbox_refusal():
        raise CommandFailed(refusal)


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
    if args.action == "import":
        return _import_transcripts(settings)
    rows = list(_call(_base_url(settings, args), _headers(settings), "GET", "/v1/sessions")["sessions"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_sessions(rows))
    return 0


def _import_transcripts(settings: Settings) -> int:
    """Backfill: every transcript under data_dir goes to the Redis mirror (idempotent)."""
    store = settings.store
    if store.redis_url is None:
        raise CommandFailed("sessions import copies transcripts into Redis: set store.redis_url (REDIS_URL)")
    import asyncio

    from bot.agent.transcripts import Transcripts
    from bot.core import StoreError

    transcripts = Transcripts.from_url(store.redis_url.get_secret_value(), store.transcript_retention_days)
    try:
        imported = asyncio.run(_import_all(transcripts, store.data_dir.resolve()))
    except StoreError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return 1
    print(f"imported {len(imported)} transcripts from {store.data_dir.resolve()}")
    return 0


async def _import_all(transcripts: Transcripts, data_dir: Path) -> list[str]:
    try:
        return await transcripts.import_data_dir(data_dir)
    finally:
        await transcripts.close()


SESSION_COLUMNS = {
    "conversation_id": "CONVERSATION",
    "session_id": "SESSION",
    "state": "STATE",
    "pid": "PID",
    "rss_mb": "RSS MiB",
    "turns": "TURNS",
    "idle_s": "IDLE s",
    "cost_usd": "COST $",
}


def format_sessions(rows: list[dict[str, Any]]) -> str:
    return format_table(rows, SESSION_COLUMNS)


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    body = _call(_base_url(settings, args), _headers(settings), "GET", f"/v1/usage?by={args.by}")
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        rows = [{"key": key, "usd": f"{usd:.6f}"} for key, usd in body["usage_usd"].items()]
        print(format_table(rows, {"key": args.by.upper(), "usd": "COST $"}))
    return 0


def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    if args.action != "list" and not args.job_id:
        raise CommandFailed(f"jobs {args.action} needs a job id")
    base, headers = _base_url(settings, args), _headers(settings)
    if args.action == "list":
        body = _call(base, headers, "GET", "/v1/jobs")
        print(json.dumps(body, indent=2) if args.json else format_table(body["jobs"], JOB_COLUMNS))
    elif args.action == "history":
        body = _call(base, headers, "GET", f"/v1/jobs/{args.job_id}/runs")
        print(json.dumps(body, indent=2) if args.json else format_table(body["runs"], RUN_COLUMNS))
    else:
        body = _call(base, headers, "POST", f"/v1/jobs/{args.job_id}/{args.action}")
        print(json.dumps(body, indent=2) if args.json else _job_line(args.action, args.job_id, body))
        if args.action == "run" and body["run"]["status"] != "ok":
            return 1
    return 0


JOB_COLUMNS = {
    "id": "ID",
    "schedule": "SCHEDULE",
    "timezone": "TZ",
    "next_fire_time": "NEXT",
    "last_status": "LAST",
    "paused": "PAUSED",
    "deliver_to": "DELIVER TO",
}
RUN_COLUMNS = {
    "fire_time": "FIRE TIME",
    "status": "STATUS",
    "cost_usd": "COST $",
    "delivered_to": "DELIVERED TO",
    "error": "ERROR",
}


def _job_line(action: str, job_id: str, body: dict[str, Any]) -> str:
    if action != "run":
        return f"{job_id}: {'paused' if body['paused'] else 'resumed'}"
    run = body["run"]
    detail = f" ({run['error']})" if run.get("error") else ""
    return f"{job_id}: {run['status']}{detail} · ${run['cost_usd']:.4f}"


def _call(base: str, headers: dict[str, str], method: str, path: str) -> dict[str, Any]:
    """One request to the daemon's API, its JSON body; a refusal is CommandFailed with the daemon's reason.

    The stdlib's client, not aiohttp: these commands make one request, and aiohttp alone costs more start-up
    than the rest of the command. No timeout: a manual job run lasts as long as its turn.
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:  # the operator's own daemon URL
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        raise CommandFailed(f"daemon answered {exc.code}: {_error_of(exc.read())}") from exc


def _error_of(body: bytes) -> object:
    try:
        return json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


def format_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    table = [list(columns.values())] + [["-" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table)


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import aiohttp

    try:
        asyncio.run(_chat_loop(_base_url(settings, args), _headers(settings), args.conversation))
    except aiohttp.ClientError as exc:
        raise DaemonUnreachable(str(exc)) from exc
    return 0


async def _chat_loop(base: str, headers: dict[str, str], conversation: str) -> None:
    import asyncio

    import aiohttp

    url = f"{base}/v1/conversations/{conversation}/messages"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    # Prompts are for a person at a terminal; piped input gets only the agent's answers, one per line.
    interactive = sys.stdin.isatty()
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> " if interactive else "")
            except EOFError:
                return
            if line.strip():
                await _chat_turn(http, url, line, interactive)


async def _chat_turn(http: aiohttp.ClientSession, url: str, text: str, interactive: bool = True) -> None:
    async with http.post(url, json={"text": text}, headers={"Accept": "text/event-stream"}) as response:
        if response.status != 200:
            body = await response.json()
            print(f"error: {body.get('error')}", file=sys.stderr)
            return
        if interactive:
            print("agent> ", end="", flush=True)
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                _print_event(event, json.loads(line[6:]), interactive)


def _print_event(event: str, data: dict[str, Any], interactive: bool = True) -> None:
    if event == "delta":
        print(data["text"], end="", flush=True)
    elif event == "result" and interactive:
        print(f"\n  [session {data['session_id']} · turn {data['turns']} · ${data['cost_usd']:.4f}]")
    elif event == "result":
        print()  # each answer on its own line
    elif event == "error":
        print(f"\nerror: {data.get('error')}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
