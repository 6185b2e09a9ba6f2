"""``agentd doctor``: check a setup before (or beside) the daemon, one line per check.

Each check either passes (✔), fails with what to do about it (✖), passes with a caveat (!),
or is skipped because that part is not configured (-).  Checks run concurrently, each under its
own deadline, so one unreachable server cannot hang the command; the exit status is 1 if any
check failed.  Nothing is changed, except that ``data_dir`` is created if missing (as the daemon
would) to prove it writable.
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as redis
import structlog
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import logs
from bot.agent.binary import probe_cli
from bot.config import ConfigError, Settings, load_settings
from bot.mail import smtp
from bot.mail.probe import probe_imap
from bot.probe import Caveat, ProbeFailed
from bot.slack.probe import probe_slack

log = structlog.get_logger(__name__)

# Sessions keep transcripts and workdirs under data_dir: below these, turns start failing soon.
DISK_FAIL_MB = 512
DISK_WARN_MB = 2048
# Claude Code's own probe for usable user namespaces (the same arguments its sandbox check runs).
USERNS_PROBE = ("--unshare-user", "--unshare-net", "--dev-bind", "/", "/", "true")
APPARMOR_SWITCH = Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")


class Mark(Enum):
    OK = "✔"
    FAIL = "✖"
    WARN = "!"
    SKIP = "-"


@dataclass(frozen=True)
class Finding:
    name: str
    mark: Mark
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" — fix: {self.fix}" if self.fix else ""
        return printable(f"{self.mark.value} {self.name:<9} {self.detail}{fix}")


def printable(text: str) -> str:
    """One terminal line: servers' words (errors, banners) may carry newlines or escape sequences."""
    return "".join(c if c.isprintable() else " " for c in text)


class Skipped(Exception):
    """The part a check is about is not configured."""


Check = Callable[[Settings, float], Awaitable[str]]


# -- running ------------------------------------------------------------------------------------


def main(path: Path | None, environ: Mapping[str, str], timeout_s: float, out: TextIO = sys.stdout) -> int:
    """Print one line per check; 0 if none failed, else 1."""
    try:
        settings = load_settings(path, environ)
    except ConfigError as exc:
        fix = "correct the named key (agentd config prints what is in effect)"
        print(Finding("config", Mark.FAIL, str(exc), fix).line(), file=out)
        print("  the other checks need a valid config", file=out)
        return 1
    logs.configure(settings.log)
    source = path or "no config file (defaults and environment)"
    print(Finding("config", Mark.OK, f"{source}: valid").line(), file=out, flush=True)
    return asyncio.run(_report(settings, timeout_s, out))


async def _report(settings: Settings, timeout_s: float, out: TextIO) -> int:
    tasks = [asyncio.create_task(run_check(name, check, settings, timeout_s)) for name, check in CHECKS]
    failed = False
    for task in tasks:  # in a fixed order, each as soon as it is known
        finding = await task
        failed |= finding.mark is Mark.FAIL
        print(finding.line(), file=out, flush=True)
    return 1 if failed else 0


async def run_check(name: str, check: Check, settings: Settings, timeout_s: float) -> Finding:
    try:
        detail = await asyncio.wait_for(check(settings, timeout_s), timeout_s)
    except ProbeFailed as exc:
        return Finding(name, Mark.FAIL, exc.problem, exc.fix)
    except Caveat as exc:
        return Finding(name, Mark.WARN, exc.detail, exc.fix)
    except Skipped as exc:
        return Finding(name, Mark.SKIP, str(exc))
    except TimeoutError:
        return Finding(name, Mark.FAIL, f"no answer within {timeout_s:g} s", "check that it is up and reachable")
    except Exception as exc:  # task boundary: one broken check must not hide the others' results
        log.exception("doctor_check_failed", check=name)
        return Finding(name, Mark.FAIL, f"the check itself failed: {type(exc).__name__}: {exc}")
    return Finding(name, Mark.OK, detail)


# -- the CLI binary -----------------------------------------------------------------------------


async def check_cli(settings: Settings, timeout_s: float) -> str:
    binary = await probe_cli(settings.agent, timeout_s)
    return f"{binary.version} at {binary.path}{' (bundled with claude-agent-sdk)' if binary.bundled else ''}"


# -- the model API ------------------------------------------------------------------------------


async def check_model(settings: Settings, timeout_s: float) -> str:
    """A ``count_tokens`` request with the configured key (free); ``max_tokens: 1`` where it is not served."""
    agent = settings.agent
    other = {"CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "CLAUDE_CODE_USE_FOUNDRY"}
    if not agent.gateway and other & set(agent.env_passthrough):
        raise Skipped("Bedrock / Vertex / Foundry through env_passthrough: not checked")
    headers = _model_headers(settings)
    model = agent.model
    message = {"model": model, "messages": [{"role": "user", "content": "agentd doctor"}]}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            status, body = await _post(http, f"{agent.upstream}/v1/messages/count_tokens", message)
            if status in (404, 405):  # a proxy without count_tokens: the smallest real request instead
                status, body = await _post(http, f"{agent.upstream}/v1/messages", {**message, "max_tokens": 1})
    except (aiohttp.ClientError, OSError) as exc:
        raise ProbeFailed(
            f"cannot reach {agent.upstream}: {exc or type(exc).__name__}",
            "check agent.base_url (ANTHROPIC_BASE_URL) and the network path or proxy to it",
        ) from None
    return _model_verdict(status, body, agent.upstream, model)


def _model_headers(settings: Settings) -> dict[str, str]:
    """The credential the gateway would send upstream (the same precedence)."""
    agent = settings.agent
    headers = {"anthropic-version": "2023-06-01"}
    if agent.auth_token is not None:
        headers["authorization"] = f"Bearer {agent.auth_token.get_secret_value()}"
    elif agent.api_key is not None:
        headers["x-api-key"] = agent.api_key.get_secret_value()
    else:
        raise ProbeFailed("no API key configured", "set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN for a proxy)")
    return headers


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as response:
        return response.status, await _json_object(response)


async def _json_object(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The start of the body as a JSON object, or {}: an error body is small, anything else is not read whole."""
    try:
        parsed = json.loads(await response.content.read(_BODY_LIMIT))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


_BODY_LIMIT = 64 * 1024


def _model_verdict(status: int, body: dict[str, Any], upstream: str, model: str) -> str:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    said = str((error or {}).get("message", ""))[:200]
    if status == 200:
        return f"{upstream} accepted the key ({model})"
    if status == 401:
        raise ProbeFailed("the API key was refused (401)", "set ANTHROPIC_API_KEY to a valid key from the console")
    if status == 403:
        raise ProbeFailed(f"the key may not use this API (403: {said})", "check the key's workspace and permissions")
    if status == 404:
        raise ProbeFailed(f"not found (404: {said})", "check agent.model and agent.base_url")
    if status == 429 or status >= 500:
        raise Caveat(f"{upstream} is reachable but answered {status} ({said}): the key was not refused", "try again")
    raise ProbeFailed(f"{upstream} answered {status}: {said}", "check agent.model, agent.base_url and the key")


# -- Redis --------------------------------------------------------------------------------------


async def check_redis(settings: Settings, timeout_s: float) -> str:
    url = settings.store.redis_url
    if url is None:
        raise Skipped("not configured (REDIS_URL unset): the embedded SQLite store in data_dir is used")
    parts = urlsplit(url.get_secret_value())
    # Never the URL: it may hold the password.
    where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
    client = redis.from_url(url.get_secret_value(), socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return await _redis_state(client, where)
    except AuthenticationError:
        raise ProbeFailed(f"Redis at {where} refused the password", "check the password in REDIS_URL") from None
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise ProbeFailed(f"cannot connect to Redis at {where}: {exc}", "start Redis, or correct REDIS_URL") from None
    finally:
        await client.aclose()


async def _redis_state(client: redis.Redis, where: str) -> str:
    await client.ping()
    info = await client.info("server")
    version = str(info.get("redis_version", "0"))
    if redis_major(version) < 6:
        raise ProbeFailed(f"Redis {version} at {where}: agentd needs 6 or later", "upgrade Redis to 7")
    try:
        config = await client.config_get("appendonly", "maxmemory-policy")
    except ResponseError as exc:
        raise Caveat(
            f"Redis {version} at {where}; appendonly and maxmemory-policy could not be checked (CONFIG: {exc})",
            "make sure redis.conf has appendonly yes and maxmemory-policy noeviction",
        ) from None
    problems = durability_problems({str(k): str(v) for k, v in config.items()})
    if problems:
        raise ProbeFailed(f"Redis {version} at {where}: {'; '.join(problems)}", _DURABLE_FIX)
    if redis_major(version) < 7:
        raise Caveat(f"Redis {version} at {where} works, but agentd is tested and deployed with 7", "upgrade to 7")
    return f"Redis {version} at {where}, appendonly yes, maxmemory-policy noeviction"


_DURABLE_FIX = (
    "set appendonly yes and maxmemory-policy noeviction in redis.conf "
    "(or CONFIG SET both and CONFIG REWRITE): evicted or lost keys drop conversations and mail checkpoints"
)


def redis_major(version: str) -> int:
    major = version.partition(".")[0]
    return int(major) if major.isdigit() else 0


def durability_problems(config: Mapping[str, str]) -> list[str]:
    problems = []
    if config.get("appendonly") != "yes":
        problems.append(f"appendonly is {config.get('appendonly', 'unset')!r} (writes since the last save are lost)")
    if config.get("maxmemory-policy") != "noeviction":
        problems.append(f"maxmemory-policy is {config.get('maxmemory-policy', 'unset')!r} (keys may be evicted)")
    return problems


# -- Slack, IMAP, SMTP --------------------------------------------------------------------------


async def check_slack(settings: Settings, timeout_s: float) -> str:
    if not settings.slack.enabled:
        raise Skipped("not configured (SLACK_BOT_TOKEN unset)")
    return await probe_slack(settings.slack, timeout_s)


async def check_imap(settings: Settings, timeout_s: float) -> str:
    if not settings.email.enabled:
        raise Skipped("not configured (email.imap_host unset)")
    return await probe_imap(settings.email, settings.triage)


async def check_smtp(settings: Settings, timeout_s: float) -> str:
    if not settings.email.enabled:
        raise Skipped("not configured (email.imap_host unset)")
    return await smtp.probe(settings.email)


# -- the sandbox --------------------------------------------------------------------------------


async def check_sandbox(settings: Settings, timeout_s: float) -> str:
    if not _sandbox_wanted(settings):
        raise Skipped("off (agent.sandbox = false): Bash runs without bubblewrap")
    missing = [tool for tool in ("bwrap", "socat") if shutil.which(tool) is None]
    if missing:
        raise ProbeFailed(
            f"{' and '.join(missing)} not found on PATH: agentd run refuses to start a profile that offers Bash",
            "apt-get install bubblewrap socat (or set sandbox = false in the profile or [agent]: Bash unsandboxed)",
        )
    await _probe_user_namespaces(timeout_s)
    return "bwrap and socat found, user namespaces usable"


def _sandbox_wanted(settings: Settings) -> bool:
    """Unless switched off explicitly it is wanted: on ``auto``, a missing bwrap quietly means no sandbox."""
    return settings.agent.sandbox is not False or any(p.sandbox for p in settings.profiles.values())


async def _probe_user_namespaces(timeout_s: float) -> None:
    bwrap = shutil.which("bwrap") or "bwrap"
    process = await asyncio.create_subprocess_exec(
        bwrap, *USERNS_PROBE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        said = stderr.decode(errors="replace").strip().splitlines()
        raise ProbeFailed(
            f"bwrap cannot create a user namespace: {said[-1] if said else process.returncode}", _userns_fix()
        )


def _userns_fix() -> str:
    try:
        restricted = APPARMOR_SWITCH.read_text().strip() == "1"
    except OSError:
        restricted = False
    if restricted:
        return "AppArmor restricts user namespaces: sysctl kernel.apparmor_restrict_unprivileged_userns=0"
    return (
        "enable unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone=1); "
        "in a container, allow them in its seccomp profile"
    )


# -- data_dir -----------------------------------------------------------------------------------


async def check_data_dir(settings: Settings, timeout_s: float) -> str:
    return await asyncio.to_thread(probe_data_dir, settings.store.data_dir, DISK_FAIL_MB, DISK_WARN_MB)


def probe_data_dir(path: Path, fail_mb: int, warn_mb: int) -> str:
    """Writable (a file is created and removed in it), and free space above the thresholds."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".agentd-doctor-"):
            pass
    except OSError as exc:
        raise ProbeFailed(
            f"{path} is not writable: {exc.strerror or exc}",
            "create it and give the user agentd runs as write access, or set store.data_dir",
        ) from None
    free_mb = shutil.disk_usage(path).free // (1024 * 1024)
    detail = f"{path.resolve()} writable, {free_mb} MiB free"
    if free_mb < fail_mb:
        raise ProbeFailed(f"{detail} (under {fail_mb} MiB)", "free disk space or move store.data_dir")
    if free_mb < warn_mb:
        raise Caveat(f"{detail} (under {warn_mb} MiB)", "free disk space or move store.data_dir")
    return detail


# -- listening ----------------------------------------------------------------------------------


async def check_http(settings: Settings, timeout_s: float) -> str:
    http = settings.http
    return await _listenable("http.listen", http.host, http.port, timeout_s, _is_agentd_http)


async def check_gateway(settings: Settings, timeout_s: float) -> str:
    if not settings.agent.gateway:
        raise Skipped("off (agent.gateway = false): the CLIs call the model API with the real key")
    host, _, port = settings.gateway.listen.rpartition(":")
    if int(port) == 0:
        return f"{host.strip('[]')}: a free loopback port is picked at start"
    return await _listenable("gateway.listen", host.strip("[]"), int(port), timeout_s, _is_agentd_gateway)


Identify = Callable[[aiohttp.ClientSession, str], Awaitable[bool]]


async def _listenable(key: str, host: str, port: int, timeout_s: float, is_agentd: Identify) -> str:
    """Free to bind, or already held by a running agentd (doctor run beside the daemon); else ✖."""
    where = f"{host}:{port}"
    try:
        _bind(host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ProbeFailed(
                f"cannot listen on {where}: {exc.strerror}", f"set {key} to an address of this host"
            ) from None
    else:
        return f"{where} is free"
    if await _answers(host, port, timeout_s, is_agentd):
        return f"{where} is held by a running agentd, which answers as one"
    raise ProbeFailed(f"{where} is in use by another program", f"stop it, or set {key} to a free port")


def _bind(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        sock.bind((host, port))


async def _answers(host: str, port: int, timeout_s: float, is_agentd: Identify) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s / 2)) as http:
            return await is_agentd(http, base)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return False


async def _is_agentd_http(http: aiohttp.ClientSession, base: str) -> bool:
    async with http.get(f"{base}/healthz") as response:
        return response.status == 200 and await _json_object(response) == {"status": "ok"}


async def _is_agentd_gateway(http: aiohttp.ClientSession, base: str) -> bool:
    """The gateway refuses a credential it never issued with 401 "unknown credential"."""
    headers = {"x-api-key": "agentd-doctor-probe", "anthropic-version": "2023-06-01"}
    async with http.post(f"{base}/v1/messages", json={}, headers=headers) as response:
        error = (await _json_object(response)).get("error")
        return response.status == 401 and isinstance(error, dict) and error.get("message") == "unknown credential"


CHECKS: list[tuple[str, Check]] = [
    ("cli", check_cli),
    ("model", check_model),
    ("redis", check_redis),
    ("slack", check_slack),
    ("imap", check_imap),
    ("smtp", check_smtp),
    ("sandbox", check_sandbox),
    ("data_dir", check_data_dir),
    ("http", check_http),
    ("gateway", check_gateway),
]
