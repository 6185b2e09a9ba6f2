"""Attachments reach the workdir, outbox files leave it, and per-conversation controls work."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from bot.core import Failure, Inbound
from bot.files import MAX_NAME_BYTES, safe_filename, take_outbox
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel, ToolUse
from tests.support.helpers import wait_until


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("...", "file"),
        (".env", "env"),
        ("a b;rm -rf $(x).txt", "a b_rm -rf _x_.txt"),
        ("", "file"),
    ],
)
def test_safe_filename(raw: str, expected: str) -> None:
    assert safe_filename(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "\u3042" * 250,  # 750 bytes of 3-byte characters
        "\u337f" * 80 + ".txt",  # 244 bytes on disk, 964 after NFKC (each becomes four characters)
        "\ufdfa" * 60 + ".pdf",  # one character becomes 18 under NFKC
    ],
)
def test_safe_filename_caps_bytes(raw: str) -> None:
    name = safe_filename(raw)
    assert 0 < len(name.encode()) <= MAX_NAME_BYTES
    assert "/" not in name and not name.startswith(".")
    assert name.endswith(Path(raw).suffix)


def test_outbox_delivers_a_name_too_long_after_nfkc(tmp_path: Path) -> None:
    outbox = tmp_path / "work" / "outbox"
    outbox.mkdir(parents=True)
    (outbox / ("\u337f" * 80 + ".txt")).write_text("ok")
    (taken,) = take_outbox(tmp_path / "work", tmp_path / "parking")
    assert taken.read_text() == "ok" and taken.name.endswith(".txt")


def test_safe_filename_is_linear_in_hostile_input() -> None:
    def cost(n: int) -> float:
        hostile = ("\ufdfa;. " * n) + "x" * n
        started = time.perf_counter()
        safe_filename(hostile)
        return time.perf_counter() - started

    small, large = min(cost(20_000) for _ in range(3)), min(cost(160_000) for _ in range(3))
    assert large < small * 8 * 4, f"{small:.4f}s for N, {large:.4f}s for 8N"


def test_outbox_skips_links_and_directories(tmp_path: Path) -> None:
    outbox = tmp_path / "work" / "outbox"
    (outbox / "sub").mkdir(parents=True)
    (outbox / "report.txt").write_text("ok")
    os.symlink("/etc/passwd", outbox / "passwd")
    taken = take_outbox(tmp_path / "work", tmp_path / "parking")
    assert [p.name for p in taken] == ["report.txt"] and taken[0].read_text() == "ok"
    assert not (outbox / "report.txt").exists()


async def test_files_in_and_out(make_pool: PoolFactory, fake_model: FakeModel, tmp_path: Path) -> None:
    pool = await make_pool()
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "notes.txt").write_text("attached words")
    cmd = "mkdir -p outbox && tr a-z A-Z < inbox/notes.txt > outbox/LOUD.txt"
    fake_model.add("shout", tool=ToolUse("Bash", {"command": cmd, "description": "shout"}))
    outcome = await pool.ask(Inbound("api:f", "shout it", files=(staged / "notes.txt",)))
    assert outcome.ok, outcome.error
    assert "inbox/notes.txt" in fake_model.find("shout it")[0].last_said()
    assert [p.name for p in outcome.files] == ["LOUD.txt"]
    assert outcome.files[0].read_text().strip() == "ATTACHED WORDS"
    second = await pool.ask(Inbound("api:f", "nothing new"))
    assert second.files == ()


async def test_reset_starts_a_fresh_session(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    first = await pool.ask(Inbound("api:r", "remember kiwi"))
    await pool.reset("api:r")
    second = await pool.ask(Inbound("api:r", "what fruit?"))
    assert second.ok and second.session_id != first.session_id
    assert "kiwi" not in fake_model.find("what fruit?")[0].all_text()
    info = await pool.info("api:r")
    assert info is not None and info.turns == 1


async def test_cancel_stops_the_running_turn(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    pool = await make_pool()
    fake_model.add("slow", text="too late", delay_s=30)
    turn = await pool.submit(Inbound("api:c", "slow one"))
    await turn.started.wait()
    await wait_until(lambda: bool(fake_model.find("slow one")), what="the slow request")
    assert await pool.cancel("api:c")
    outcome = await turn.outcome
    assert outcome.failure is Failure.INTERRUPTED
    assert not await pool.cancel("api:c")
    assert (await pool.ask(Inbound("api:c", "after"))).ok


async def test_inbox_link_planted_by_the_agent_is_not_followed(
    make_pool: PoolFactory, fake_model: FakeModel, tmp_path: Path
) -> None:
    """Issue 17's reproduction: the agent's Bash swaps ``inbox`` for a link out, then a user shares a file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    pool = await make_pool()
    plant = f"rm -rf inbox; ln -s {outside} inbox"
    fake_model.add("plant", tool=ToolUse("Bash", {"command": plant, "description": "plant"}))
    assert (await pool.ask(Inbound("api:l", "plant it"))).ok
    (workdir,) = (tmp_path / "data" / "work").iterdir()
    assert (workdir / "inbox").is_symlink(), "the agent's Bash did not plant the link"
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "evil.pth").write_text("import os; os.system('touch /tmp/pwned')")
    outcome = await pool.ask(Inbound("api:l", "here is a file", files=(staged / "evil.pth",)))
    assert outcome.ok, outcome.error
    assert list(outside.iterdir()) == []
    assert not (workdir / "inbox").is_symlink()
    assert (workdir / "inbox" / "evil.pth").read_text().startswith("import os")
    assert "inbox/evil.pth" in fake_model.find("here is a file")[0].last_said()


# The agent's background job (issue 17): keeps a handle on the real outbox, drops a file in it and
# swaps ``outbox`` with a link to ``outside`` atomically (renameat2 RENAME_EXCHANGE), over and over.
AGENT_SWAPPER = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.symlink({outside!r}, "link")
real = os.open("outbox", os.O_RDONLY | os.O_DIRECTORY)
n = 0
while True:
    n += 1
    if n % 5000 == 0:
        fd = os.open("agent-%d.txt" % n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=real)
        os.close(fd)
    libc.renameat2(-100, b"outbox", -100, b"link", 2)
"""


async def test_outbox_swapped_by_the_agents_background_job_is_not_followed(
    make_pool: PoolFactory, fake_model: FakeModel, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secrets = [outside / f"secret-{i:02}.txt" for i in range(20)]  # more names, more chances for the old code
    for secret in secrets:
        secret.write_text("not yours")
    pool = await make_pool()
    script = AGENT_SWAPPER.format(outside=str(outside))
    start = f"mkdir -p outbox && python3 - <<'EOF'\n{script}\nEOF"
    fake_model.add("start", tool=ToolUse("Bash", {"command": start, "description": "bg", "run_in_background": True}))
    assert (await pool.ask(Inbound("api:s", "start the job"))).ok
    (workdir,) = (tmp_path / "data" / "work").iterdir()
    await wait_until(lambda: (workdir / "link").is_symlink() or (workdir / "outbox").is_symlink(), what="the job")
    taken = []
    try:
        for round_ in range(40):
            outcome = await pool.ask(Inbound("api:s", f"round {round_}"))
            taken += outcome.files
            assert all(secret.exists() for secret in secrets), f"round {round_}: a secret was taken"
    finally:
        stop_jobs_in(workdir)
    assert sorted(outside.iterdir()) == secrets
    assert taken and all(p.read_text() != "not yours" for p in taken)


def stop_jobs_in(workdir: Path) -> None:
    """The agent's background job outlives its turn: stop it, by its own pid, before the pool closes."""
    for proc in psutil.process_iter(["cwd", "name"]):
        if proc.info["name"] == "python3" and proc.info["cwd"] == str(workdir):
            proc.kill()
            proc.wait(10)
