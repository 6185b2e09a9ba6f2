"""``agentd doctor``: every check against a good setup and a broken one, and the command as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from bot.app import doctor
from bot.app.doctor import Check, Finding, Mark
from bot.config import EmailConfig, Settings, SlackConfig, TriageConfig
from bot.probe import Caveat, ProbeFailed
from bot.slack.probe import MANIFEST_SCOPES
from tests.conftest import make_settings
from tests.fakes.mailserver import MailServer
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer, free_port
from tests.fakes.slack import FakeSlack
from tests.support import paths
from tests.support.daemon_proc import DaemonProcess
from tests.support.hostile import assert_linear
from tests.support.mail_harness import email_settings

ROOT = paths.ROOT
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


async def run(check: Check, settings: Settings, timeout_s: float = 10) -> Finding:
    return await doctor.run_check("x", check, settings, timeout_s)


def settings_for(tmp_path: Path, model: FakeModel, **sections: Any) -> Settings:
    return make_settings(tmp_path, model, **sections)


# -- the CLI binary -----------------------------------------------------------------------------


async def test_cli_bundled_binary_and_version(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_cli, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.OK, found
    assert re.search(r"\d+\.\d+\.\d+ \(Claude Code\)", found.detail)
    assert "bundled" in found.detail


async def test_cli_configured_path_missing(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_cli, settings_for(tmp_path, fake_model, agent={"cli_path": tmp_path / "claude"}))
    assert found.mark is Mark.FAIL
    assert "not found" in found.detail and "cli_path" in found.fix


async def test_cli_that_hangs_is_killed_at_the_deadline(tmp_path: Path, fake_model: FakeModel) -> None:
    hung = tmp_path / "claude"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    settings = settings_for(tmp_path, fake_model, agent={"cli_path": hung})
    found = await run(doctor.check_cli, settings, timeout_s=1)
    assert found.mark is Mark.FAIL
    assert "no answer" in found.detail  # and the leak check at session end finds no sleep left


# -- the model API ------------------------------------------------------------------------------


async def test_model_key_accepted(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.api_keys = {"sk-test-key"}
    found = await run(doctor.check_model, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.OK, found
    assert "accepted the key" in found.detail


async def test_model_wrong_key_is_refused(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.api_keys = {"sk-the-real-one"}
    found = await run(doctor.check_model, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.FAIL
    assert found.detail.startswith("the API key was refused")
    assert "ANTHROPIC_API_KEY" in found.fix
    assert "sk-test-key" not in found.line()


async def test_model_unreachable_and_no_key(tmp_path: Path, fake_model: FakeModel) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = await run(doctor.check_model, settings_for(tmp_path, fake_model, agent={"base_url": closed}))
    assert unreachable.mark is Mark.FAIL and "cannot reach" in unreachable.detail
    keyless = await run(doctor.check_model, settings_for(tmp_path, fake_model, agent={"api_key": None}))
    assert keyless.mark is Mark.FAIL and "no API key" in keyless.detail


def test_model_answers_other_than_ok_or_refused() -> None:
    """Busy or failing upstream: the key was not refused, so no ✖; an unknown model is one."""
    with pytest.raises(Caveat, match="529"):
        doctor._model_verdict(529, {"error": {"message": "overloaded"}}, "https://api", "m")
    with pytest.raises(ProbeFailed, match="404: model: nope"):
        doctor._model_verdict(404, {"error": {"message": "model: nope"}}, "https://api", "nope")
    with pytest.raises(ProbeFailed, match="400"):
        doctor._model_verdict(400, {"error": "not an object"}, "https://api", "m")


# -- Redis --------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: its config is changed."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def redis_settings(tmp_path: Path, model: FakeModel, url: str) -> Settings:
    return settings_for(tmp_path, model, store={"redis_url": url})


async def test_redis_durable(tmp_path: Path, fake_model: FakeModel, private_redis: RedisServer) -> None:
    found = await run(doctor.check_redis, redis_settings(tmp_path, fake_model, private_redis.url))
    assert found.mark is Mark.OK, found
    assert "appendonly yes, maxmemory-policy noeviction" in found.detail
    assert private_redis.password not in found.line()


async def test_redis_without_appendonly_or_noeviction(
    tmp_path: Path, fake_model: FakeModel, private_redis: RedisServer
) -> None:
    client = redis.from_url(private_redis.url)
    settings = redis_settings(tmp_path, fake_model, private_redis.url)
    try:
        await client.config_set("appendonly", "no")
        found = await run(doctor.check_redis, settings)
        assert found.mark is Mark.FAIL and "appendonly is 'no'" in found.detail
        # Not back to appendonly yes: that starts an AOF rewrite, which a quick SIGTERM then waits on.
        await client.config_set("maxmemory-policy", "allkeys-lru")
        found = await run(doctor.check_redis, settings)
        assert found.mark is Mark.FAIL and "maxmemory-policy is 'allkeys-lru'" in found.detail
        assert "noeviction" in found.fix
    finally:
        await client.aclose()


async def test_redis_down_or_wrong_password(tmp_path: Path, fake_model: FakeModel, private_redis: RedisServer) -> None:
    wrong = private_redis.url.replace(private_redis.password, "not-the-password")
    refused = await run(doctor.check_redis, redis_settings(tmp_path, fake_model, wrong))
    assert refused.mark is Mark.FAIL and "refused the password" in refused.detail
    private_redis.stop()
    down = await run(doctor.check_redis, redis_settings(tmp_path, fake_model, private_redis.url))
    assert down.mark is Mark.FAIL and "cannot connect to Redis" in down.detail
    assert private_redis.password not in down.line()
    private_redis.start()


async def test_redis_with_config_disabled_says_it_could_not_check(tmp_path: Path, fake_model: FakeModel) -> None:
    server = RedisServer(tmp_path / "redis", extra_args=("--rename-command", "CONFIG", ""))
    server.start()
    try:
        found = await run(doctor.check_redis, redis_settings(tmp_path, fake_model, server.url))
    finally:
        server.stop()
    assert found.mark is Mark.WARN
    assert "could not be checked" in found.detail


async def test_redis_not_configured_is_skipped(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_redis, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.SKIP


def test_redis_version_and_durability_rules() -> None:
    assert [doctor.redis_major(v) for v in ("7.0.15", "8.2.1", "6.2.14", "garbage", "")] == [7, 8, 6, 0, 0]
    assert doctor.durability_problems({"appendonly": "yes", "maxmemory-policy": "noeviction"}) == []
    assert len(doctor.durability_problems({})) == 2


# -- Slack --------------------------------------------------------------------------------------


def slack_settings(tmp_path: Path, model: FakeModel, slack: FakeSlack, **overrides: Any) -> Settings:
    values = {"bot_token": "xoxb-good", "app_token": "xapp-good", "api_url": slack.url, **overrides}
    return settings_for(tmp_path, model, slack=SlackConfig(**values))


async def test_slack_token_and_scopes(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack))
    assert found.mark is Mark.OK, found
    assert "Socket Mode" in found.detail
    assert [c.method for c in slack.calls] == ["auth.test", "apps.connections.open"]


async def test_slack_token_refused(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    slack.refused_tokens.add("xoxb-revoked")
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack, bot_token="xoxb-revoked"))
    assert found.mark is Mark.FAIL
    assert "refused the bot token (invalid_auth)" in found.detail and "SLACK_BOT_TOKEN" in found.fix
    assert "xoxb-revoked" not in found.line()


async def test_slack_app_token_refused(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack, app_token="xoxb-not-an-app"))
    assert found.mark is Mark.FAIL and "refused the app token" in found.detail


async def test_slack_missing_scope(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    slack.scopes = [scope for scope in MANIFEST_SCOPES if scope != "reactions:write"]
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack))
    assert found.mark is Mark.FAIL
    assert "lacks the scopes reactions:write" in found.detail and "manifest" in found.fix
    slack.scopes = None  # a proxy that drops the header: the scopes could not be checked
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack))
    assert found.mark is Mark.WARN and "scopes were not checked" in found.detail


async def test_slack_unreachable_and_unconfigured(tmp_path: Path, fake_model: FakeModel, slack: FakeSlack) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api/"
    found = await run(doctor.check_slack, slack_settings(tmp_path, fake_model, slack, api_url=closed))
    assert found.mark is Mark.FAIL and "cannot reach Slack" in found.detail
    assert (await run(doctor.check_slack, settings_for(tmp_path, fake_model))).mark is Mark.SKIP


def test_manifest_scopes_are_the_ones_checked() -> None:
    manifest = (ROOT / "deploy" / "slack-app-manifest.yaml").read_text().splitlines()
    start = manifest.index("    bot:") + 1
    scopes = set()
    for line in manifest[start:]:
        if not line.startswith("      - "):
            break
        scopes.add(line.removeprefix("      - ").split("#")[0].strip())
    assert scopes == MANIFEST_SCOPES


# -- IMAP and SMTP ------------------------------------------------------------------------------


def mail_settings(tmp_path: Path, model: FakeModel, server: MailServer, **overrides: Any) -> Settings:
    triage = TriageConfig(folders=overrides.pop("folders", []))
    email = EmailConfig(**email_settings(server, **overrides))
    return settings_for(tmp_path, model, email=email, triage=triage)


async def test_imap_login_mailbox_and_folders(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    found = await run(doctor.check_imap, mail_settings(tmp_path, fake_model, mail, folders=["Archive"]))
    assert found.mark is Mark.OK, found
    assert "logged in" in found.detail and "INBOX selected" in found.detail
    assert "Archive" in found.detail and "created on first use" in found.detail


async def test_imap_wrong_password(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    found = await run(doctor.check_imap, mail_settings(tmp_path, fake_model, mail, imap_password="wrong-pw-123"))
    assert found.mark is Mark.FAIL
    assert "refused the login of agent" in found.detail and "IMAP_PASSWORD" in found.fix
    assert "wrong-pw-123" not in found.line()


async def test_imap_missing_mailbox(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    found = await run(doctor.check_imap, mail_settings(tmp_path, fake_model, mail, mailbox="Support"))
    assert found.mark is Mark.FAIL
    assert "'Support' cannot be selected" in found.detail and "email.mailbox" in found.fix


async def test_imap_unreachable(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    found = await run(doctor.check_imap, mail_settings(tmp_path, fake_model, mail, imap_port=free_port()))
    assert found.mark is Mark.FAIL and "cannot connect to IMAP" in found.detail


async def test_smtp_connects(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    found = await run(doctor.check_smtp, mail_settings(tmp_path, fake_model, mail))
    assert found.mark is Mark.OK, found
    assert "no login" in found.detail
    assert mail.relay.sent == []  # nothing was sent


async def test_smtp_refused(tmp_path: Path, fake_model: FakeModel, mail: MailServer) -> None:
    closed = await run(doctor.check_smtp, mail_settings(tmp_path, fake_model, mail, smtp_port=free_port()))
    assert closed.mark is Mark.FAIL and "cannot connect to SMTP" in closed.detail
    no_auth = await run(doctor.check_smtp, mail_settings(tmp_path, fake_model, mail, smtp_user="agent"))
    assert no_auth.mark is Mark.FAIL and 'smtp_user = ""' in no_auth.fix


class _Accept:
    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        return "250 OK"


def _only_secret(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    good = isinstance(data, LoginPassword) and data.login == b"agent" and data.password == b"smtp-pw"
    return AuthResult(success=good, handled=False)


@pytest.fixture
def smtp_with_auth() -> Iterator[int]:
    port = free_port()
    controller = Controller(
        _Accept(), hostname="127.0.0.1", port=port, authenticator=_only_secret, auth_require_tls=False
    )
    controller.start()
    yield port
    controller.stop()


async def test_smtp_login(tmp_path: Path, fake_model: FakeModel, mail: MailServer, smtp_with_auth: int) -> None:
    def smtp(password: str) -> Settings:
        return mail_settings(
            tmp_path, fake_model, mail, smtp_port=smtp_with_auth, smtp_user="agent", smtp_password=password
        )

    good = await run(doctor.check_smtp, smtp("smtp-pw"))
    assert good.mark is Mark.OK and "logged in as agent" in good.detail
    wrong = await run(doctor.check_smtp, smtp("bad-smtp-pw"))
    assert wrong.mark is Mark.FAIL and "refused the login of agent" in wrong.detail
    assert "bad-smtp-pw" not in wrong.line()


async def test_mail_not_configured_is_skipped(tmp_path: Path, fake_model: FakeModel) -> None:
    settings = settings_for(tmp_path, fake_model)
    assert (await run(doctor.check_imap, settings)).mark is Mark.SKIP
    assert (await run(doctor.check_smtp, settings)).mark is Mark.SKIP


# -- the sandbox --------------------------------------------------------------------------------


@needs_bwrap
async def test_sandbox_usable(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_sandbox, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.OK, found


async def test_sandbox_without_bwrap(tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    found = await run(doctor.check_sandbox, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.FAIL
    assert "bwrap and socat not found" in found.detail and "apt-get install bubblewrap socat" in found.fix


async def test_sandbox_without_user_namespaces(
    tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bwrap that fails as it does where user namespaces are off."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bwrap").write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    (bin_dir / "bwrap").chmod(0o755)
    (bin_dir / "socat").symlink_to(shutil.which("true") or "/bin/true")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    found = await run(doctor.check_sandbox, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.FAIL
    assert "setting up uid map: Permission denied" in found.detail and "user namespaces" in found.fix


async def test_sandbox_off_is_skipped(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_sandbox, settings_for(tmp_path, fake_model, agent={"sandbox": False}))
    assert found.mark is Mark.SKIP


# -- data_dir -----------------------------------------------------------------------------------


async def test_data_dir_writable(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_data_dir, settings_for(tmp_path, fake_model))
    assert found.mark is Mark.OK, found
    assert "writable" in found.detail and "MiB free" in found.detail
    assert list((tmp_path / "data").iterdir()) == []  # the probe file is gone


async def test_data_dir_not_writable(tmp_path: Path, fake_model: FakeModel) -> None:
    """Under a regular file: no directory can be made there (a chmod would not stop root)."""
    (tmp_path / "file").write_text("")
    settings = settings_for(tmp_path, fake_model, store={"data_dir": tmp_path / "file" / "data"})
    found = await run(doctor.check_data_dir, settings)
    assert found.mark is Mark.FAIL
    assert "is not writable" in found.detail and "store.data_dir" in found.fix


def test_data_dir_low_disk(tmp_path: Path) -> None:
    huge = 1 << 40  # MiB: more than any disk has free
    with pytest.raises(ProbeFailed, match="under"):
        doctor.probe_data_dir(tmp_path, fail_mb=huge, warn_mb=huge)
    with pytest.raises(Caveat, match="under"):
        doctor.probe_data_dir(tmp_path, fail_mb=0, warn_mb=huge)


# -- listening ----------------------------------------------------------------------------------


async def test_listen_addresses_free(tmp_path: Path, fake_model: FakeModel) -> None:
    port, gateway_port = free_port(), free_port()
    settings = settings_for(
        tmp_path, fake_model, http={"listen": f"127.0.0.1:{port}"}, gateway={"listen": f"127.0.0.1:{gateway_port}"}
    )
    http, gateway = await run(doctor.check_http, settings), await run(doctor.check_gateway, settings)
    assert http.mark is Mark.OK and http.detail == f"127.0.0.1:{port} is free"
    assert gateway.mark is Mark.OK and gateway.detail == f"127.0.0.1:{gateway_port} is free"
    default = await run(doctor.check_gateway, settings_for(tmp_path, fake_model))
    assert default.mark is Mark.OK and "a free loopback port" in default.detail


async def test_listen_address_held_by_another_program(tmp_path: Path, fake_model: FakeModel) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = settings_for(
            tmp_path, fake_model, http={"listen": f"127.0.0.1:{port}"}, gateway={"listen": f"127.0.0.1:{port}"}
        )
        http, gateway = await run(doctor.check_http, settings, 2), await run(doctor.check_gateway, settings, 2)
    for found in (http, gateway):
        assert found.mark is Mark.FAIL
        assert "in use by another program" in found.detail and "free port" in found.fix


async def test_gateway_off_is_skipped(tmp_path: Path, fake_model: FakeModel) -> None:
    found = await run(doctor.check_gateway, settings_for(tmp_path, fake_model, agent={"gateway": False}))
    assert found.mark is Mark.SKIP


# -- the command --------------------------------------------------------------------------------


def doctor_command(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "doctor", "--config", str(config), "--timeout", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )


def marks(output: str) -> dict[str, str]:
    """check name -> its mark, from the printed lines."""
    return {line.split()[1]: line.split()[0] for line in output.splitlines() if line[:1] in "✔✖!-"}


def base_env(model: FakeModel, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return {**env, "ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "sk-doctor-key-0001", **extra}


async def test_command_beside_a_running_daemon(tmp_path: Path, fake_model: FakeModel) -> None:
    """All good, while agentd runs: its HTTP and gateway ports are recognised as agentd's own."""
    fake_model.api_keys = {"sk-doctor-key-0001"}
    gateway_port = free_port()
    no_slack = {"SLACK_BOT_TOKEN": "", "SLACK_APP_TOKEN": "", "SLACK_SIGNING_SECRET": ""}
    daemon = DaemonProcess(
        tmp_path,
        fake_model.url,
        extra_env={**no_slack, "ANTHROPIC_API_KEY": "sk-doctor-key-0001"},
        toml=f'[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n',
    )
    await daemon.start()
    try:
        result = await asyncio.to_thread(doctor_command, daemon.config, base_env(fake_model))
    finally:
        await daemon.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    found = marks(result.stdout)
    assert found == {
        "config": "✔",
        "cli": "✔",
        "model": "✔",
        "redis": "-",
        "slack": "-",
        "imap": "-",
        "smtp": "-",
        "sandbox": "✔" if shutil.which("bwrap") else "✖",
        "data_dir": "✔",
        "http": "✔",
        "gateway": "✔",
    }, result.stdout
    assert "held by a running agentd" in result.stdout
    assert len(result.stdout.splitlines()) == 11  # one line per check


async def test_command_on_a_broken_setup(tmp_path: Path, fake_model: FakeModel) -> None:
    """A wrong key, an unwritable data_dir and a Redis that is down: ✖ lines, exit 1, no secret printed."""
    fake_model.api_keys = {"sk-the-real-one"}
    (tmp_path / "file").write_text("")
    config = tmp_path / "agentd.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "file" / "data"}"\n')
    redis_url = f"redis://:redis-secret-0002@127.0.0.1:{free_port()}/0"
    result = await asyncio.to_thread(doctor_command, config, base_env(fake_model, REDIS_URL=redis_url))
    assert result.returncode == 1, result.stdout + result.stderr
    found = marks(result.stdout)
    assert found["model"] == found["data_dir"] == found["redis"] == "✖", result.stdout
    assert found["config"] == found["cli"] == "✔"
    assert "the API key was refused" in result.stdout and "— fix: " in result.stdout
    for secret in ("sk-doctor-key-0001", "redis-secret-0002"):
        assert secret not in result.stdout + result.stderr


async def test_command_with_an_invalid_config(tmp_path: Path, fake_model: FakeModel) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text("[pool]\nmax_sessions = 0\n")
    result = await asyncio.to_thread(doctor_command, config, base_env(fake_model))
    assert result.returncode == 1
    assert result.stdout.startswith("✖ config    invalid config: pool.max_sessions:")
    assert "Traceback" not in result.stderr


# -- deadlines and hostile answers --------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_a_silent_server_fails_each_check_at_its_deadline(
    tmp_path: Path, fake_model: FakeModel, mail: MailServer, silent_port: int
) -> None:
    silent = f"127.0.0.1:{silent_port}"
    settings = settings_for(
        tmp_path,
        fake_model,
        agent={"base_url": f"http://{silent}"},
        store={"redis_url": f"redis://{silent}/0"},
        email=EmailConfig(**email_settings(mail, imap_port=silent_port, smtp_port=silent_port)),
        slack=SlackConfig(bot_token="xoxb-good", app_token="xapp-good", api_url=f"http://{silent}/api/"),
    )
    checks = [doctor.check_model, doctor.check_redis, doctor.check_imap, doctor.check_smtp, doctor.check_slack]
    loop = asyncio.get_running_loop()
    started = loop.time()
    found = await asyncio.gather(*(run(check, settings, timeout_s=1) for check in checks))
    assert all(f.mark is Mark.FAIL for f in found), found
    assert loop.time() - started < 8  # each one gave up near its deadline


def test_printed_lines_carry_no_control_characters() -> None:
    hostile = Finding("imap", Mark.FAIL, "login refused: \x1b]0;pwned\x07\r\nNO\x1b[2J", "fix\n")
    line = hostile.line()
    assert "\x1b" not in line and "\n" not in line and "\r" not in line and "\x07" not in line
    assert line.startswith("✖ imap      login refused:")
    assert_linear(doctor.printable, lambda n: "\x1b[" * n)


async def test_a_port_held_by_a_stranger_answering_json_is_not_agentd(tmp_path: Path, fake_model: FakeModel) -> None:
    """The listen check tells agentd's gateway from another HTTP server, whatever that one answers."""

    async def stranger(request: web.Request) -> web.Response:
        return web.json_response(["not", "an", "object"], status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stranger)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        settings = settings_for(
            tmp_path, fake_model, http={"listen": f"127.0.0.1:{port}"}, gateway={"listen": f"127.0.0.1:{port}"}
        )
        http, gateway = await run(doctor.check_http, settings), await run(doctor.check_gateway, settings)
    finally:
        await runner.cleanup()
    assert http.mark is gateway.mark is Mark.FAIL
    assert "in use by another program" in gateway.detail
