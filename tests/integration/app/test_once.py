"""``agentd once``: a real subprocess against the fake model; nothing it starts outlives it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.fakes.model import FakeModel, RecordedRequest, ToolUse
from tests.support import paths
from tests.support.helpers import wait_until

REAL_KEY = "sk-test-once-real-key"
ROOT = paths.ROOT


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def last_error(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


class Once:
    """``agentd once`` with a config in ``tmp``; the model is the fake one, through the gateway."""

    def __init__(self, tmp: Path, model: FakeModel, toml: str = "", env: dict[str, str] | None = None) -> None:
        self.data_dir = (tmp / "data").resolve()
        self.config = tmp / "agentd.toml"
        self.config.write_text(f'[store]\ndata_dir = "{self.data_dir}"\n[agent]\nmodel = "claude-sonnet-4-5"\n{toml}')
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": model.url,
            "ANTHROPIC_API_KEY": REAL_KEY,
            **(env or {}),
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *args: str, ignore_sigint: bool = False) -> asyncio.subprocess.Process:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.app.cli",
            "--config",
            str(self.config),
            "once",
            *args,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # As a shell starts a background job: SIGINT ignored, which exec passes on.
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        )
        return self.process

    async def run(self, *args: str, stdin: bytes | None = None, timeout: float = 90) -> Ran:
        process = await self.start(*args)
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin or b""), timeout)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return Ran(process.returncode, out.decode(), err.decode())


def clis_in(directory: Path) -> list[psutil.Process]:
    """Live claude and socat processes working in ``directory`` (a once's CLI and its helpers)."""
    found = []
    for proc in psutil.process_iter(["name", "cwd", "status"]):
        cwd = proc.info["cwd"]
        if proc.info["status"] == psutil.STATUS_ZOMBIE or cwd is None:
            continue
        if proc.info["name"] in ("claude", "socat") and Path(cwd).resolve().is_relative_to(directory.resolve()):
            found.append(proc)
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


async def test_text_and_json_output(tmp_path: Path, fake_model: FakeModel) -> None:
    once = Once(tmp_path, fake_model)
    ran = await once.run("--prompt", "hello batch")
    assert ran.code == 0, ran.stderr
    assert ran.stdout.strip() == "echo: hello batch"

    ran = await once.run("--prompt", "json please", "--output", "json")
    assert ran.code == 0, ran.stderr
    body = json.loads(ran.stdout)
    assert body["outcome"] == "ok" and body["result"] == "echo: json please" and body["error"] is None
    assert body["session_id"] and body["turns"] == 1 and body["duration_s"] > 0
    assert body["cost_usd"] > 0, "the gateway metered it"
    # The temp workdir and the session's Claude state are gone; no process stays.
    assert not Path(body["workdir"]).exists()
    assert list((once.data_dir / "state").iterdir()) == []
    assert clis_in(tmp_path) == []
    assert all(r.headers.get("x-api-key") == REAL_KEY for r in fake_model.requests), "through the gateway"


async def test_prompt_from_stdin(tmp_path: Path, fake_model: FakeModel) -> None:
    once = Once(tmp_path, fake_model)
    ran = await once.run(stdin=b"from a pipe\n")
    assert ran.code == 0, ran.stderr
    assert ran.stdout.strip() == "echo: from a pipe"
    ran = await once.run("--prompt", "-", stdin=b"dash means stdin")
    assert ran.stdout.strip() == "echo: dash means stdin"


async def test_a_budget_stop_fails_with_one_clear_line(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("spend", tool=ToolUse("Write", {"file_path": "spent.txt", "content": "x"}))
    once = Once(tmp_path, fake_model, toml="[budget]\nper_message_usd = 0.0005\n")
    ran = await once.run("--prompt", "spend it", "--output", "json")
    assert ran.code == 1, ran
    assert json.loads(ran.stdout)["outcome"] == "budget"
    assert ran.last_error.startswith("agentd: once failed (budget): the per message budget is used up")
    assert clis_in(tmp_path) == []


async def test_a_model_error_fails(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model.add("refused", status=400)
    ran = await Once(tmp_path, fake_model).run("--prompt", "refused please")
    assert ran.code == 1, ran
    assert ran.stdout.strip() == ""
    assert ran.last_error.startswith("agentd: once failed (agent_error):"), ran.stderr


async def test_bad_input_is_refused_clearly(tmp_path: Path, fake_model: FakeModel) -> None:
    once = Once(tmp_path, fake_model)
    for args, message in (
        (["--prompt", "x", "--profile", "nope"], "no profile named 'nope'"),
        (["--prompt", "x", "--cwd", str(tmp_path / "missing")], "not an existing directory"),
        (["--prompt", "x", "--cwd", str(once.data_dir.parent)], "may not be inside data_dir"),
        (["--prompt", "   "], "the prompt is empty"),
    ):
        (tmp_path / "data").mkdir(exist_ok=True)
        ran = await once.run(*args)
        assert ran.code == 2 and message in ran.last_error, (args, ran)
    assert fake_model.requests == []


async def test_an_unusable_data_dir_fails_in_one_line(tmp_path: Path, fake_model: FakeModel) -> None:
    (tmp_path / "a-file").write_text("")
    once = Once(tmp_path, fake_model)
    once.config.write_text(f'[store]\ndata_dir = "{tmp_path / "a-file" / "data"}"\n')
    ran = await once.run("--prompt", "x")
    assert ran.code == 1 and ran.last_error.startswith("agentd: once failed: "), ran
    assert "Not a directory" in ran.last_error


async def test_cwd_confines_the_agent_and_stays(tmp_path: Path, fake_model: FakeModel) -> None:
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-OUTSIDE")
    (project / "input.txt").write_text("inside the project")
    fake_model.add("peek", tool=ToolUse("Read", {"file_path": str(outside / "secret.txt")}))
    fake_model.add("write", tool=ToolUse("Write", {"file_path": "result.txt", "content": "done"}))
    once = Once(tmp_path, fake_model)
    ran = await once.run("--prompt", "peek outside", "--cwd", str(project))
    assert ran.code == 0, ran.stderr
    assert "TOP-SECRET-OUTSIDE" not in fake_model.tool_results()
    # Refused by the hook, or by the permission rules behind it: the CLI's own wording then.
    refusals = ("outside this conversation's working directory", "denied by your permission settings")
    assert any(text in fake_model.tool_results() for text in refusals), fake_model.tool_results()
    ran = await once.run("--prompt", "write a result", "--cwd", str(project))
    assert ran.code == 0, ran.stderr
    assert (project / "result.txt").read_text() == "done"
    assert (project / "input.txt").exists(), "--cwd is the caller's: never removed"


async def test_the_cli_gets_no_secret_and_nothing_stays(tmp_path: Path, fake_model: FakeModel) -> None:
    """The CLI's environment, read while it works: only the allowlist and agentd's own settings."""
    seen: dict[int, dict[str, str]] = {}

    def capture(request: RecordedRequest) -> None:
        for proc in clis_in(tmp_path):
            if proc.info["name"] == "claude":
                seen[proc.pid] = environ_of(proc.pid)

    fake_model.on_request = capture
    once = Once(tmp_path, fake_model, env={"SOME_DAEMON_SECRET": "daemon-secret-value"})
    ran = await once.run("--prompt", "who am i")
    assert ran.code == 0, ran.stderr
    assert seen, "the CLI was seen while it worked"
    for environ in seen.values():
        text = json.dumps(environ)
        assert REAL_KEY not in text and "daemon-secret-value" not in text
        assert environ["ANTHROPIC_API_KEY"].startswith("agentd-gw-")
        assert environ["ANTHROPIC_BASE_URL"] != fake_model.url
    assert clis_in(tmp_path) == [], "the CLI is gone when the command returns"


@pytest.mark.parametrize(
    ("signum", "ignored"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGINT ignored by the parent"],
)
async def test_ctrl_c_stops_the_task_and_its_process(
    tmp_path: Path, fake_model: FakeModel, signum: int, ignored: bool
) -> None:
    fake_model.add("slow", text="too late", delay_s=60)
    once = Once(tmp_path, fake_model)
    process = await once.start("--prompt", "slow work", ignore_sigint=ignored)
    assert process.stdin is not None
    process.stdin.close()
    await wait_until(lambda: bool(fake_model.find("slow work")), timeout=60, what="the turn to reach the model")
    process.send_signal(signum)
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:  # reap it here, so its pipes do not leak into (and fail) a later test
        process.kill()
        await process.communicate()
        raise
    assert process.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "agentd: once: interrupted"
    assert clis_in(tmp_path) == []


async def test_the_temp_workdir_goes_without_following_the_agents_links(tmp_path: Path, fake_model: FakeModel) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    plant = f"ln -s {outside} out; mkdir -p d && ln -s {outside} d/deeper; ln -s {outside}/secret.txt f; ls -l"
    fake_model.add("plant", tool=ToolUse("Bash", {"command": plant, "description": "plant"}))
    once = Once(tmp_path, fake_model)
    ran = await once.run("--prompt", "plant links", "--output", "json")
    assert ran.code == 0, ran.stderr
    assert f"out -> {outside}" in fake_model.tool_results(), "the links were planted"
    assert not Path(json.loads(ran.stdout)["workdir"]).exists()
    assert [p.name for p in outside.iterdir()] == ["secret.txt"] and (outside / "secret.txt").read_text() == "keep me"
