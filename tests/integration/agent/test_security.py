"""The agent sees no daemon secrets, and one conversation cannot touch another's workdir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bot.core import Inbound
from bot.security import safe_name, scrub_environ
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel, ToolUse

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


def test_scrub_keeps_only_allowlisted_names() -> None:
    environ = {"PATH": "/bin", "LC_ALL": "C", "SLACK_BOT_TOKEN": "x", "REDIS_URL": "redis://:pw@h", "MY_VAR": "1"}
    dropped = scrub_environ(environ, extra=["MY_VAR"])
    assert environ == {"PATH": "/bin", "LC_ALL": "C", "MY_VAR": "1"}
    assert dropped == ["REDIS_URL", "SLACK_BOT_TOKEN"]


@pytest.mark.parametrize("key", ["../../etc/passwd", "slack:T1:C1:1700000000.000100", "/abs", "", "🙂" * 50])
def test_safe_name_never_escapes(key: str) -> None:
    name = safe_name(key)
    assert "/" not in name and ".." not in name and name == name.strip()
    assert len(name) <= 53


@needs_bwrap
async def test_conversations_cannot_read_or_write_each_other(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool(agent={"sandbox": True})
    fake_model.add("plant", tool=ToolUse("Bash", {"command": "echo TOP-SECRET-B > secret.txt", "description": "plant"}))
    assert (await pool.ask(Inbound("api:b", "plant the secret"))).ok
    record = await pool.store.get("api:b")
    assert record is not None
    b_dir = Path(record.workdir)
    assert (b_dir / "secret.txt").read_text().strip() == "TOP-SECRET-B"

    fake_model.add("bash read", tool=ToolUse("Bash", {"command": f"cat {b_dir}/secret.txt", "description": "r"}))
    fake_model.add("tool read", tool=ToolUse("Read", {"file_path": f"{b_dir}/secret.txt"}))
    fake_model.add(
        "bash write", tool=ToolUse("Bash", {"command": f"echo pwned > {b_dir}/pwned.txt", "description": "w"})
    )
    fake_model.add("tool write", tool=ToolUse("Write", {"file_path": f"{b_dir}/pwned2.txt", "content": "pwned"}))
    for attempt in ("bash read", "tool read", "bash write", "tool write"):
        assert (await pool.ask(Inbound("api:a", attempt))).ok
    assert "TOP-SECRET-B" not in fake_model.tool_results().replace("echo TOP-SECRET-B", "")
    assert sorted(p.name for p in b_dir.iterdir() if "pwned" in p.name) == []

    fake_model.add(
        "own write", tool=ToolUse("Bash", {"command": "echo mine > own.txt && cat own.txt", "description": "o"})
    )
    assert (await pool.ask(Inbound("api:a", "own write"))).ok
    assert "mine" in fake_model.tool_results()


async def test_user_text_reaches_the_model_verbatim(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists() else ""
    assert (await pool.ask(Inbound("api:v", "remember kiwi"))).ok
    cleared = await pool.ask(Inbound("api:v", "/clear"))
    assert cleared.reply == "echo: /clear", "a slash command in a message is text, not a command"
    mention = await pool.ask(Inbound("api:v", "@/etc/hostname what is in it?"))
    assert mention.reply == "echo: @/etc/hostname what is in it?"
    request = fake_model.find("@/etc/hostname")[-1]
    assert "remember kiwi" in request.all_text(), "nothing was cleared"
    assert not hostname or hostname not in request.all_text().replace("@/etc/hostname", ""), "no file was attached"
