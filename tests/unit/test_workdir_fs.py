"""Nothing the agent does inside its workdir makes the daemon read or write outside it (issue 17, item 1)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import procs, workdir_fs
from bot.core import Inbound
from bot.files import INBOX, OUTBOX, move_into_inbox, take_outbox
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel, ToolUse
from tests.integration.agent.test_security import needs_bwrap
from tests.support.helpers import wait_until

SECRET = "the daemon's secret"

# Swaps ``outbox`` and ``link`` (a symlink to a directory outside) atomically, as fast as it can,
# until killed: what a background job of the agent's Bash can do.  It prints once it has swapped.
SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
os.chdir(sys.argv[1])
first = True
while True:
    if libc.renameat2(AT_FDCWD, b"outbox", AT_FDCWD, b"link", RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    if first:
        print("swapping", flush=True)
        first = False
"""


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory the agent must never make the daemon touch, with a secret in it."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text(SECRET)
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


def staged_file(tmp_path: Path, name: str, text: str) -> Path:
    staging = tmp_path / "incoming"
    staging.mkdir(exist_ok=True)
    path = staging / name
    path.write_text(text)
    return path


def assert_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == SECRET


def test_inbox_replaced_by_a_link_is_not_followed(tmp_path: Path, workdir: Path, outside: Path) -> None:
    os.symlink(outside, workdir / INBOX)
    placed = move_into_inbox((staged_file(tmp_path, "x.pth", "import os"),), workdir)
    assert placed == ["inbox/x.pth"]
    assert_untouched(outside)
    inbox = workdir / INBOX
    assert not inbox.is_symlink() and (inbox / "x.pth").read_text() == "import os"
    (kept,) = workdir.glob(workdir_fs.REPLACED_PREFIX + "*")
    assert kept.is_symlink()  # the agent's link is kept, renamed, never followed


def test_inbox_replaced_by_a_file_is_renamed_away(tmp_path: Path, workdir: Path) -> None:
    (workdir / INBOX).write_text("mine")
    assert move_into_inbox((staged_file(tmp_path, "a.txt", "new"),), workdir) == ["inbox/a.txt"]
    (kept,) = workdir.glob(workdir_fs.REPLACED_PREFIX + "*")
    assert kept.read_text() == "mine" and (workdir / INBOX / "a.txt").read_text() == "new"


def test_inbox_link_named_like_the_file_is_not_written_through(tmp_path: Path, workdir: Path, outside: Path) -> None:
    (workdir / INBOX).mkdir()
    os.symlink(outside / "secret.txt", workdir / INBOX / "notes.txt")
    os.symlink(outside / "new.txt", workdir / INBOX / "notes-2.txt")  # dangling: would be created outside
    assert move_into_inbox((staged_file(tmp_path, "notes.txt", "hi"),), workdir) == ["inbox/notes-3.txt"]
    assert_untouched(outside)


def test_outbox_hard_link_to_an_outside_file_is_refused(tmp_path: Path, workdir: Path, outside: Path) -> None:
    (workdir / OUTBOX).mkdir()
    os.link(outside / "secret.txt", workdir / OUTBOX / "leak.txt")
    (workdir / OUTBOX / "fine.txt").write_text("ok")
    taken = take_outbox(workdir, tmp_path / "parking")
    assert [p.read_text() for p in taken] == ["ok"]
    assert_untouched(outside)


def test_outbox_fifo_socket_and_device_are_refused_without_blocking(tmp_path: Path, workdir: Path) -> None:
    outbox = workdir / OUTBOX
    outbox.mkdir()
    os.mkfifo(outbox / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(outbox / "sock"))
    with listener:
        if os.geteuid() == 0:
            os.mknod(outbox / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        (outbox / "fine.txt").write_text("ok")
        taken = take_outbox(workdir, tmp_path / "parking")
    assert [p.name for p in taken] == ["fine.txt"]
    assert all(stat.S_ISREG(p.lstat().st_mode) for p in (tmp_path / "parking").rglob("*") if not p.is_dir())


def test_outbox_swapped_for_a_link_is_not_followed(tmp_path: Path, workdir: Path, outside: Path) -> None:
    """The agent swaps ``outbox`` with a link to ``outside`` atomically, over and over, while the daemon takes it."""
    (workdir / OUTBOX).mkdir()
    os.symlink(outside, workdir / "link")
    outbox_fd = os.open(workdir / OUTBOX, os.O_RDONLY | os.O_DIRECTORY)  # the real outbox, wherever its name is
    parking = tmp_path / "parking"
    with swapping(workdir):
        for round_ in range(400):
            _agent_writes(outbox_fd, f"agent-{round_}.txt")
            take_outbox(workdir, parking)
            assert (outside / "secret.txt").exists(), f"round {round_}: the secret was moved"
    os.close(outbox_fd)
    assert_untouched(outside)
    parked = [p.read_text() for p in parking.rglob("*.txt")]
    assert SECRET not in parked and parked, "nothing taken: the race never ran"


def _agent_writes(outbox_fd: int, name: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=outbox_fd)
    os.write(fd, b"agent")
    os.close(fd)


@contextlib.contextmanager
def swapping(workdir: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", SWAPPER, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "swapping\n"
        yield
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_remove_tree_deletes_nothing_a_link_points_to(tmp_path: Path, workdir: Path, outside: Path) -> None:
    (workdir / "sub" / "deeper").mkdir(parents=True)
    os.symlink(outside, workdir / "to_outside")
    os.symlink(outside, workdir / "sub" / "deeper" / "again")
    os.symlink(outside / "secret.txt", workdir / "sub" / "file_link")
    os.link(outside / "secret.txt", workdir / "sub" / "hard")
    workdir_fs.remove_tree(workdir)
    assert not workdir.exists()
    assert_untouched(outside)


def test_remove_tree_of_a_link_removes_only_the_link(tmp_path: Path, outside: Path) -> None:
    os.symlink(outside, tmp_path / "work")
    workdir_fs.remove_tree(tmp_path / "work")
    assert not (tmp_path / "work").is_symlink()
    assert_untouched(outside)


def test_outbox_gone_or_a_link_gives_nothing(tmp_path: Path, workdir: Path, outside: Path) -> None:
    assert take_outbox(workdir, tmp_path / "parking") == ()
    os.symlink(outside, workdir / OUTBOX)
    assert take_outbox(workdir, tmp_path / "parking") == ()
    assert_untouched(outside)


async def test_helper_socket_cleanup_removes_no_file_a_process_names(tmp_path: Path, outside: Path) -> None:
    """A descendant's argv (the agent's Bash too) can name any ``claude-http-*.sock``: only temp-dir sockets go."""
    planted = outside / "claude-http-1.sock"
    planted.write_text(SECRET)
    in_temp = Path(tempfile.gettempdir()) / f"claude-http-test-{uuid.uuid4().hex}.sock"
    in_temp.write_text(SECRET)
    args = [f"UNIX-LISTEN:{planted},fork", f"UNIX-LISTEN:{in_temp},fork"]
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", *args]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *sleeper])
    try:
        tree = procs.ProcessTree()
        await wait_until(lambda: (tree.remember(parent.pid), tree.pids)[1] != [], what="the child to start")
        await tree.sweep()
        assert planted.read_text() == SECRET and in_temp.read_text() == SECRET
    finally:
        parent.kill()
        parent.wait()
        in_temp.unlink()


@needs_bwrap
async def test_the_daemons_own_dirs_are_out_of_the_agents_reach(
    make_pool: PoolFactory, fake_model: FakeModel, tmp_path: Path
) -> None:
    """The daemon works by path only in dirs the agent cannot change: its Claude state, staging and parking."""
    pool = await make_pool(agent={"sandbox": True})
    assert (await pool.ask(Inbound("api:d", "hello"))).ok
    record = await pool.store.get("api:d")
    assert record is not None
    data = tmp_path / "data"
    state = Path(record.config_dir)
    targets = [state / "projects", state, data / "incoming", data / "sent", data / "work", data / "state"]
    # Built at run time from $PWD, so that no path outside the workdir appears in the command: the sandbox decides.
    relative = [str(t.relative_to(data)) for t in targets]
    command = 'ln -s / control; d=$(dirname "$(dirname "$PWD")"); ' + "; ".join(
        f'mkdir -p "$d/{r}"; ln -s / "$d/{r}/planted"' for r in relative
    )
    fake_model.add("escape", tool=ToolUse("Bash", {"command": command, "description": "escape"}))
    assert (await pool.ask(Inbound("api:d", "escape"))).ok
    assert (Path(record.workdir) / "control").is_symlink(), "the Bash call never ran"
    assert [t for t in targets if (t / "planted").is_symlink()] == []


@pytest.mark.parametrize("swap", ["link_outside", "hard_link_outside", "directory"])
def test_a_file_swapped_after_its_check_is_not_taken(tmp_path: Path, workdir: Path, outside: Path, swap: str) -> None:
    """The race's last window, made deterministic: the name changes between the check and the move."""
    outbox, parking = workdir / OUTBOX, tmp_path / "parking"
    outbox.mkdir()
    parking.mkdir()
    (outbox / "report.txt").write_text("checked")
    with workdir_fs.opened_dir(outbox) as outbox_fd, workdir_fs.opened_dir(parking) as parking_fd:
        opened = workdir_fs.open_regular(outbox_fd, "report.txt")
        (outbox / "report.txt").unlink()
        if swap == "link_outside":
            os.symlink(outside / "secret.txt", outbox / "report.txt")
        elif swap == "hard_link_outside":
            os.link(outside / "secret.txt", outbox / "report.txt")
        else:
            (outbox / "report.txt").mkdir()
            os.symlink(outside, outbox / "report.txt" / "inner")
        with pytest.raises(workdir_fs.Refused):
            workdir_fs.move_checked(outbox_fd, "report.txt", parking_fd, "report.txt", opened)
        os.close(opened)
    assert list(parking.iterdir()) == []
    assert_untouched(outside)


def test_a_hard_link_made_after_the_check_is_not_taken(tmp_path: Path, workdir: Path) -> None:
    outbox, parking = workdir / OUTBOX, tmp_path / "parking"
    outbox.mkdir()
    parking.mkdir()
    (outbox / "report.txt").write_text("checked")
    with workdir_fs.opened_dir(outbox) as outbox_fd, workdir_fs.opened_dir(parking) as parking_fd:
        opened = workdir_fs.open_regular(outbox_fd, "report.txt")
        os.link(outbox / "report.txt", workdir / "keeps-a-handle")  # a name the agent could write through later
        with pytest.raises(workdir_fs.Refused):
            workdir_fs.move_checked(outbox_fd, "report.txt", parking_fd, "report.txt", opened)
        os.close(opened)
    assert list(parking.iterdir()) == []
    assert (workdir / "keeps-a-handle").read_text() == "checked"


def test_across_file_systems_the_checked_content_is_copied(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        workdir = Path(other)
        (workdir / OUTBOX).mkdir()
        (workdir / OUTBOX / "report.txt").write_text("ok")
        (taken,) = take_outbox(workdir, tmp_path / "parking")
        assert taken.read_text() == "ok" and not (workdir / OUTBOX / "report.txt").exists()
