from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_settings
from tests.support import paths


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return path


def test_toml_then_env_then_conventional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[pool]\nmax_sessions = 7\nprewarm = 2\n[http]\nlisten = "0.0.0.0:9000"\n')
    monkeypatch.setenv("AGENTD_POOL__PREWARM", "3")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@redis:6379/0")
    monkeypatch.setenv("AGENTD_API_TOKEN", "tok-zz9")
    settings = load_settings(path, {"REDIS_URL": "redis://:pw@redis:6379/0", "AGENTD_API_TOKEN": "tok-zz9"})
    assert settings.pool.max_sessions == 7 and settings.pool.prewarm == 3
    assert settings.http.port == 9000 and not settings.http.is_loopback
    assert settings.store.redis_url is not None and settings.store.redis_url.get_secret_value().endswith("/0")
    redacted = str(settings.redacted())
    assert "pw@" not in redacted and "tok-zz9" not in redacted


def test_defaults_are_sensible() -> None:
    settings = load_settings(None, {})
    assert settings.pool.busy_policy == "queue" and settings.http.is_loopback
    assert settings.pool.hard_ceiling_mb == 2 * settings.pool.session_max_rss_mb
    assert settings.store.redis_url is None


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[pool]\nmax_sessions = -1\n", "pool.max_sessions"),
        ("[pool]\nmax_sesions = 3\n", "pool.max_sesions: unknown key"),
        ('[slak]\nbot_token = "xoxb-1"\n', "slak: unknown section"),
        ('[pool]\nbusy_policy = "drop"\n', "pool.busy_policy"),
        ('[http]\nlisten = "nowhere"\n', "http"),
        ("[pool]\nsession_max_rss_mb = 500\nhard_rss_mb = 400\n", "hard_rss_mb"),
        ("[pool\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(write(tmp_path, toml), {})


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nmax_sessions = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "--config", str(path), "run"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pool.max_sessions" in result.stderr


def test_config_command_redacts_secrets(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ANTHROPIC_API_KEY": "sk-very-secret", "AGENTD_API_TOKEN": "api-secret"}
    result = subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "config"], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret" not in result.stdout and "api-secret" not in result.stdout
    assert '"api_key": "**********"' in result.stdout


def test_example_config_is_valid_and_matches_defaults() -> None:
    example = paths.ROOT / "deploy" / "agentd.example.toml"
    assert load_settings(example, {}).redacted() == load_settings(None, {}).redacted()


JOB = '[[schedule]]\nid = "digest"\nevery = 60\nprompt = "digest"\n'


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[email]\nallowed_tools = ["Read"]\n', "allowed_tools moved to the profile: set tools in [profiles.email]"),
        ('[slack]\nask_tools = ["Bash"]\n', "ask_tools moved to the profile"),
        ('[slack]\nprofile = "nope"\n', "slack.profile: no profile named 'nope'"),
        (JOB + 'profile = "nope"\n', "schedule.digest.profile: no profile named 'nope'"),
        (JOB + JOB, "job ids must be unique"),
        (JOB + 'deliver_to = "slack:#ops"\n', "needs the Slack channel"),
        (JOB + 'deliver_to = "email:ops@example.com"\n', "needs the email channel"),
        (JOB + 'deliver_to = "pager:42"\n', "deliver_to must be"),
        ('[[schedule]]\nid = "x"\ncron = "0 8 * *"\nprompt = "p"\n', "cron must have 5 fields"),
        ('[[schedule]]\nid = "x"\ncron = "0 8 * * 1"\nevery = 5\nprompt = "p"\n', "exactly one of cron or every"),
        ('[[schedule]]\nid = "x"\ncron = "0 8 * * 1"\ntimezone = "Mars/Olympus"\nprompt = "p"\n', "unknown timezone"),
        ("[pool]\nprewarm = { nope = 1 }\n", "pool.prewarm.nope: no profile named 'nope'"),
        ("[pool]\nspare_pause_max_s = -1\n", "pool.spare_pause_max_s: Input should be greater than or equal to 0"),
        ('[profiles.triage]\nmcp = ["telepathy"]\n', "profiles.triage.mcp"),
        ('[agent]\nenv_passthrough = ["CLAUDE_CODE_USE_BEDROCK"]\n', "set agent.gateway = false to use Bedrock"),
        ('[gateway]\nlisten = "0.0.0.0:9000"\n', "loopback"),
    ],
)
def test_profile_and_schedule_mistakes_are_named(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write(tmp_path, toml), {})


def test_profiles_fall_back_to_the_agent_section(tmp_path: Path) -> None:
    toml = '[agent]\nmodel = "m1"\nmax_turns = 7\n[profiles.digest]\ntools = ["Read"]\nmodel = "m2"\n'
    settings = load_settings(write(tmp_path, toml), {})
    digest, chat, email = settings.profile("digest"), settings.profile("chat"), settings.profile("email")
    assert digest.tools == {"Read"} and digest.model == "m2" and digest.max_turns == 7
    assert chat.tools == {"Bash", "Read", "Write", "Edit", "Glob", "Grep"} and chat.model == "m1"
    assert email.tools == {"Read", "Glob", "Grep"} and email.mcp == ()
    assert settings.profile("triage").mcp == ("mail", "slack")
