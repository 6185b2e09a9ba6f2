"""The agent reads and writes only its own workdir: every file tool x every escape, against a real `agentd run`.

The daemon runs as an operator runs it (subprocess, sandbox on, a config file, a home with dotfiles).
Each escape is one message whose fake-model answer is a tool call; the call must come back refused, and
no secret's content may reach any request the model received.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from bot.reach import Reach
from bot.security import safe_name
from tests.fakes.model import FakeModel, ToolUse
from tests.support.daemon_proc import DaemonProcess

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("socat") is None, reason="bubblewrap and socat not installed"
)
TOOLS = ["Bash", "Read", "Write", "Edit", "Glob", "Grep", "NotebookEdit"]


@dataclass(frozen=True)
class Secret:
    """A file whose content must never reach the model: ``MARK <token> value``."""

    path: Path
    token: str
    content: str

    @classmethod
    def plant(cls, path: Path) -> Secret:
        token = secrets.token_hex(12)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"MARK {token} value\n")
        return cls(path, token, path.read_text())


@dataclass
class World:
    daemon: DaemonProcess
    model: FakeModel
    tmp: Path
    workdir: Path
    secrets: dict[str, Secret]


@pytest.fixture
async def world(tmp_path: Path, fake_model: FakeModel) -> AsyncIterator[World]:
    home, data = tmp_path / "home", tmp_path / "data"
    planted = {
        "outside": Secret.plant(tmp_path / "outside" / "secret.txt"),
        "home": Secret.plant(home / ".ssh" / "id_rsa"),
        "netrc": Secret.plant(home / ".netrc"),
        "operator": Secret.plant(tmp_path / "operator" / "secret.txt"),
        "other": Secret.plant(data / "work" / safe_name("api:b") / "secret.txt"),
    }
    config_token = secrets.token_hex(12)
    toml = (
        f'sandbox = true\nallowed_tools = {json.dumps(TOOLS)}\ndeny_read = ["{tmp_path / "operator"}"]\n'
        f"# MARK {config_token} value: the config file itself is a secret\n"
    )
    daemon = DaemonProcess(tmp_path, fake_model.url, extra_env={"HOME": str(home)}, toml=toml)
    planted["config"] = Secret(daemon.config, config_token, daemon.config.read_text())
    await daemon.start()
    try:
        assert (await daemon.ask("a", "hello"))["reply"] == "echo: hello"
        workdir = data / "work" / safe_name("api:a")
        (workdir / "own.txt").write_text("my own words\n")
        (workdir / "link").symlink_to(planted["outside"].path)
        (workdir / "linkdir").symlink_to(planted["outside"].path.parent)
        yield World(daemon, fake_model, tmp_path, workdir, planted)
    finally:
        daemon.kill()


def escapes(w: World) -> list[tuple[str, ToolUse]]:
    """(name, tool call) for every file tool x every way out of the workdir."""
    s = {name: str(secret.path) for name, secret in w.secrets.items()}
    other = f"../{safe_name('api:b')}/secret.txt"
    rows: list[tuple[str, ToolUse]] = []
    reads = {
        "absolute": s["outside"],
        "dotdot": other,
        "symlink": "link",
        "symlink dir": "linkdir/secret.txt",
        "tilde": "~/.ssh/id_rsa",
        "netrc": "~/.netrc",
        "config": s["config"],
        "other workdir": s["other"],
        "deny_read": s["operator"],
    }
    for how, path in reads.items():
        rows.append((f"Read {how}", ToolUse("Read", {"file_path": path})))
        rows.append((f"Edit {how}", ToolUse("Edit", {"file_path": path, "old_string": "value", "new_string": "PWN"})))
        rows.append((f"Write {how}", ToolUse("Write", {"file_path": path, "content": "PWNED"})))
        rows.append((f"Bash cat {how}", ToolUse("Bash", {"command": f"cat {path}", "description": "read"})))
    rows.append(("Write new file in tmp", ToolUse("Write", {"file_path": str(w.tmp / "planted.py"), "content": "x"})))
    rows.append(("Write ~/.bashrc", ToolUse("Write", {"file_path": "~/.bashrc", "content": "PWNED"})))
    notebook = {"notebook_path": s["outside"], "new_source": "PWNED", "cell_id": "0"}
    rows.append(("NotebookEdit absolute", ToolUse("NotebookEdit", notebook)))
    for root in (str(w.tmp), "..", "~", str(w.tmp / "data")):
        rows.append(
            (f"Grep rooted at {root}", ToolUse("Grep", {"pattern": "MARK", "path": root, "output_mode": "content"}))
        )
        rows.append((f"Glob rooted at {root}", ToolUse("Glob", {"pattern": "**/*", "path": root})))
    rows.append(("Glob absolute pattern", ToolUse("Glob", {"pattern": f"{w.tmp}/**/*.txt"})))
    rows.append(("Glob dotdot pattern", ToolUse("Glob", {"pattern": "../../**/secret.txt"})))
    rows.append(("Grep absolute glob", ToolUse("Grep", {"pattern": "MARK", "glob": f"{w.tmp}/**"})))
    rows.append(("Grep dotdot glob", ToolUse("Grep", {"pattern": "MARK", "glob": "../**/*.txt"})))
    return rows


async def call(w: World, tool: ToolUse) -> dict[str, Any]:
    """Send one message whose answer is ``tool``; return the tool_result the CLI sent back."""
    trigger = f"attempt-{secrets.token_hex(6)}"
    w.model.add(trigger, tool=tool, once=True)
    before = len(w.model.requests)
    body = await w.daemon.ask("a", trigger)
    assert "error" not in body, body
    results = [
        block
        for request in w.model.requests[before:]
        for block in request.last_user_blocks()
        if block.get("type") == "tool_result"
    ]
    assert len(results) == 1, f"{tool}: expected one tool result, got {results}"
    return results[0]


def leaked(w: World) -> list[str]:
    everything = json.dumps([r.body for r in w.model.requests])
    return [name for name, secret in w.secrets.items() if secret.token in everything]


@needs_sandbox
async def test_every_file_tool_and_bash_stay_in_the_workdir(world: World) -> None:
    w = world
    offered = {tool["name"] for tool in w.model.turn_requests()[0].body["tools"]}
    assert offered == set(TOOLS), "the model is offered exactly the allowed tools"
    failures = []
    for name, tool in escapes(w):
        result = await call(w, tool)
        text = json.dumps(result.get("content"))
        refused = result.get("is_error") or "denied" in text.lower() or "no such file" in text.lower()
        if not refused or leaked(w):
            failures.append(f"{name}: refused={bool(refused)} leaked={leaked(w)} result={text[:200]}")
    assert not failures, "escapes:\n" + "\n".join(failures)
    for secret in w.secrets.values():
        assert secret.path.read_text() == secret.content, f"{secret.path} was changed"
    assert not (w.tmp / "planted.py").exists()
    # The sandbox may leave an empty decoy .bashrc in home (a bind-mount point); never our content.
    bashrc = w.tmp / "home" / ".bashrc"
    assert not bashrc.exists() or "PWNED" not in bashrc.read_text()


@needs_sandbox
async def test_the_workdir_itself_stays_usable(world: World) -> None:
    w = world
    allowed = [
        ToolUse("Read", {"file_path": "own.txt"}),
        ToolUse("Read", {"file_path": str(w.workdir / "own.txt")}),
        ToolUse("Write", {"file_path": "new.txt", "content": "fresh"}),
        ToolUse("Edit", {"file_path": "new.txt", "old_string": "fresh", "new_string": "edited"}),
        ToolUse("Grep", {"pattern": "own words", "output_mode": "content"}),
        ToolUse("Glob", {"pattern": "**/*.txt"}),
        ToolUse("Bash", {"command": "cat own.txt new.txt && ls /usr/bin | grep -c . ", "description": "own"}),
    ]
    for tool in allowed:
        result = await call(w, tool)
        assert not result.get("is_error"), (tool, result)
    assert (w.workdir / "new.txt").read_text() == "edited"
    assert "my own words" in w.model.tool_results() and "edited" in w.model.tool_results()


# -- the path check itself, without a CLI ------------------------------------------------------


@pytest.fixture
def reach(tmp_path: Path) -> Reach:
    data = tmp_path / "data"
    workdir = data / "work" / "a"
    workdir.mkdir(parents=True)
    (workdir / "inside.txt").write_text("ok")
    (workdir / "out").symlink_to(tmp_path)
    return Reach.of(workdir, data, tmp_path / "home", [tmp_path / "agentd.toml"])


@pytest.mark.parametrize(
    ("tool", "tool_input", "allowed"),
    [
        ("Read", {"file_path": "inside.txt"}, True),
        ("Read", {"file_path": "./sub/../inside.txt"}, True),
        ("Write", {"file_path": "sub/new.txt", "content": ""}, True),
        ("Read", {"file_path": "../b/x"}, False),
        ("Read", {"file_path": "out/agentd.toml"}, False),
        ("Read", {"file_path": "~/.ssh/id_rsa"}, False),
        ("Read", {"file_path": "/etc/passwd"}, False),
        ("Read", {"file_path": 7}, False),
        ("Read", {"file_path": ["inside.txt", "/etc/passwd"]}, False),
        ("Edit", {"file_path": "/tmp/x", "old_string": "a", "new_string": "b"}, False),
        ("NotebookEdit", {"notebook_path": "/tmp/x.ipynb", "new_source": ""}, False),
        ("FutureTool", {"target_path": "/etc/passwd"}, False),
        ("FutureTool", {"dir": "../.."}, False),
        ("FutureTool", {"note": "/etc/passwd is just text here"}, True),
        ("Grep", {"pattern": "/etc/passwd"}, True),
        ("Grep", {"pattern": "x", "path": ".."}, False),
        ("Grep", {"pattern": "x", "glob": "*.py"}, True),
        ("Grep", {"pattern": "x", "glob": "/etc/*"}, False),
        ("Grep", {"pattern": "x", "glob": "{*.py,../../**}"}, False),
        ("Glob", {"pattern": "**/*.txt"}, True),
        ("Glob", {"pattern": "~/**"}, False),
        ("Glob", {"pattern": "sub/../../**"}, False),
        ("Glob", {"pattern": "C:/Windows"}, False),
        ("Bash", {"command": "cat /etc/passwd"}, True),  # the sandbox's business, not the hook's
    ],
)
def test_path_check(reach: Reach, tool: str, tool_input: dict[str, Any], allowed: bool) -> None:
    assert (reach.refusal(tool, tool_input, str(reach.workdir)) is None) is allowed


def test_search_without_root_uses_the_cwd(reach: Reach) -> None:
    assert reach.refusal("Grep", {"pattern": "x"}, str(reach.workdir)) is None
    assert reach.refusal("Grep", {"pattern": "x"}, str(reach.data_dir)) is not None


def test_sandbox_reads_are_an_allowlist(reach: Reach, tmp_path: Path) -> None:
    fs = reach.sandbox_filesystem()
    denied = set(fs["denyRead"])
    assert fs["allowRead"] == [str(reach.workdir)]
    assert {str(reach.data_dir), str(tmp_path / "agentd.toml"), "/etc/shadow"} <= denied
    tops = {str(p) for p in Path("/").iterdir() if p.is_dir() and not p.is_symlink()}
    assert all(
        t in denied
        or t in {"/usr", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys", "/tmp"}
        or t.startswith("/lib")
        or Path(os.path.expanduser("~")).is_relative_to(t)
        for t in tops
    )
    rules = reach.permission_rules()
    assert f"Read(/{tmp_path / 'agentd.toml'})" in rules
    assert not any(reach.workdir.is_relative_to(r[6:-4]) for r in rules if r.endswith("/**)"))


async def test_a_crowded_temp_dir_still_lets_the_agent_start(
    make_pool: Any, fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Every entry of /tmp is denied one by one; thousands of them once overflowed the one
    # command-line argument the settings were passed in ("argument list too long").
    import tempfile

    from bot.core import Inbound

    crowd = [Path(tempfile.mkstemp(prefix="agentd-crowd-" + "x" * 40 + "-")[1]) for _ in range(3000)]
    try:
        pool = await make_pool()
        outcome = await pool.ask(Inbound("api:crowd", "hello in a crowd"))
        assert outcome.ok, outcome.error
    finally:
        for path in crowd:
            path.unlink(missing_ok=True)


@needs_sandbox
async def test_sandboxed_bash_cannot_reach_the_gateway_or_the_api_on_loopback(world: World) -> None:
    w = world
    gateway = urlsplit(cli_environ(w)["ANTHROPIC_BASE_URL"])
    ports = {"gateway": gateway.port, "api": w.daemon.port}
    for port in ports.values():  # both listen: a refusal below is the sandbox's doing
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
    probe = " ; ".join(
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo OPEN-{name} || echo SHUT-{name}"
        for name, port in ports.items()
    )
    result = json.dumps(await call(w, ToolUse("Bash", {"command": probe, "description": "probe loopback"})))
    assert "SHUT-gateway" in result and "SHUT-api" in result, result
    assert "OPEN-" not in result, result


def cli_environ(w: World) -> dict[str, str]:
    """The environment of the daemon's CLI process (the one serving conversation ``api:a``)."""
    assert w.daemon.process is not None
    for proc in psutil.Process(w.daemon.process.pid).children(recursive=True):
        if proc.name() == "claude":
            return dict(proc.environ())
    raise AssertionError("no CLI process")
