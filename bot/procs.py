"""Process-tree inspection and cleanup for the agent subprocesses (psutil)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import os
import stat
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from bot import workdir_fs

MIB = 1024 * 1024
_PR_SET_CHILD_SUBREAPER = 36
# The sandbox helper's listening socket: ``socat UNIX-LISTEN:<tmp>/claude-http-<id>.sock,... TCP:...``.
_SOCKET_ARG = "UNIX-LISTEN:"
_SOCKET_NAME = "claude-http-*.sock"
_SOCKET_DIR = Path(tempfile.gettempdir())
REAP_DEADLINE_S = 5.0


@dataclass(frozen=True)
class Snapshot:
    """Every process's parent and RSS, read in one pass over /proc.

    The pool samples all its CLI trees from one snapshot, taken in a thread: a per-tree
    ``children(recursive=True)`` reads all of /proc again for each tree, on the event loop.
    """

    children: Mapping[int, tuple[int, ...]]
    rss: Mapping[int, int]

    @classmethod
    def take(cls) -> Snapshot:
        children: dict[int, list[int]] = defaultdict(list)
        rss: dict[int, int] = {}
        for proc in psutil.process_iter(["ppid", "memory_info"]):
            info = proc.info
            if info["ppid"] is not None:
                children[info["ppid"]].append(proc.pid)
            if info["memory_info"] is not None:
                rss[proc.pid] = info["memory_info"].rss
        return cls({pid: tuple(kids) for pid, kids in children.items()}, rss)

    def descendants(self, pid: int) -> list[int]:
        found, todo = [], list(self.children.get(pid, ()))
        while todo:
            child = todo.pop()
            found.append(child)
            todo.extend(self.children.get(child, ()))
        return found

    def tree_rss_mb(self, pid: int) -> float | None:
        """As ``tree_rss_mb``; None if the process was gone when the snapshot was taken."""
        if pid not in self.rss:
            return None
        return sum(self.rss.get(member, 0) for member in [pid, *self.descendants(pid)]) / MIB


def tree_rss_mb(pid: int) -> float | None:
    """RSS of the process and all its descendants, in MiB; None if it is gone."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in members:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / MIB


def handle(pid: int) -> psutil.Process | None:
    """A handle that stays bound to this very process (start time), even after its pid is reused."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def still_running(proc: psutil.Process) -> bool:
    """True while the process runs; gone, reaped or a zombie counts as dead."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL the process and its descendants; used only for a runaway or at exit."""
    try:
        root = psutil.Process(pid)
        members = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def live_descendants(pid: int) -> list[int]:
    """Pids still alive below ``pid`` (zombies excluded); for leak checks."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for proc in children:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def child_with_env(key: str, value: str) -> psutil.Process | None:
    """This process's direct child started with ``key=value`` in its environment (a CLI the SDK has not named)."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return None
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.environ().get(key) == value:
                return child
    return None


class Pause:
    """A process tree stopped (SIGSTOP) and continued (SIGCONT), and how long it has been stopped in all.

    Unprivileged, a process cannot get its priority back after ``nice`` or ``SCHED_IDLE`` (RLIMIT_NICE is 0),
    but it may stop and continue its own children at will. The handles keep their start times, so a
    recycled pid is never signalled.
    """

    def __init__(self) -> None:
        self._members: list[psutil.Process] = []
        self._since: float | None = None
        self._before_s = 0.0

    @property
    def stopped(self) -> bool:
        return self._since is not None

    def stopped_s(self) -> float:
        return self._before_s + (time.monotonic() - self._since if self._since is not None else 0.0)

    def stop(self, root: psutil.Process | None) -> None:
        """The root first, so it starts nothing new, then what runs below it; None: a process not yet started."""
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)] if root is not None else []:
                with contextlib.suppress(psutil.Error):
                    proc.suspend()
                    self._members.append(proc)
        self._since = time.monotonic()

    def resume(self) -> None:
        for proc in self._members:
            with contextlib.suppress(psutil.Error):
                proc.resume()
        self._members.clear()
        self._before_s, self._since = self.stopped_s(), None


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux ``PR_SET_CHILD_SUBREAPER``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(
    own: set[int], names: frozenset[str] = frozenset({"claude", "socat"}), snapshot: Snapshot | None = None
) -> list[int]:
    """Reap zombies re-parented to us (we are a subreaper) that no tree remembered: a CLI's short-lived helpers.

    Only direct children named in ``names`` that are not one of our own CLI processes (``own``, which
    asyncio's child watcher reaps), and each by its own pid.
    """
    reaped: list[int] = []
    try:
        if snapshot is None:
            children = psutil.Process().children()
        else:
            children = [proc for pid in snapshot.children.get(os.getpid(), ()) if (proc := handle(pid)) is not None]
    except psutil.Error:
        return reaped
    for proc in children:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.pid in own or proc.status() != psutil.STATUS_ZOMBIE or proc.name() not in names:
                continue
            if os.waitpid(proc.pid, os.WNOHANG)[0] != 0:
                reaped.append(proc.pid)
    return reaped


class ProcessTree:
    """The descendants seen below one CLI process while it lived, to clean up after it dies.

    ``psutil.Process`` remembers each member's start time, so a kill never hits a recycled pid.
    """

    def __init__(self) -> None:
        self._members: dict[int, psutil.Process] = {}
        self._sockets: set[Path] = set()

    @property
    def pids(self) -> list[int]:
        return sorted(self._members)

    def remember(self, pid: int, snapshot: Snapshot | None = None) -> None:
        """Add the descendants ``pid`` has now (or had in ``snapshot``) to the members."""
        if snapshot is None:
            try:
                descendants = [child.pid for child in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                return
        else:
            descendants = snapshot.descendants(pid)
        self._forget_finished()
        for child in descendants:
            if child not in self._members and (proc := handle(child)) is not None:
                self._members[child] = proc
                self._sockets.update(_helper_sockets(proc))

    def _forget_finished(self) -> None:
        """Members gone for good (exited and reaped by their parent) need no cleanup; keep the set small."""
        self._members = {pid: proc for pid, proc in self._members.items() if _running(proc)}
        self._sockets = {socket for socket in self._sockets if socket.exists()}

    def kill_survivors(self) -> list[int]:
        killed = []
        for proc in self._members.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    killed.append(proc.pid)
        return killed

    async def sweep(self) -> list[int]:
        """Kill the members still alive, reap those re-parented to us, remove helper sockets left behind."""
        killed = self.kill_survivors()
        deadline = time.monotonic() + REAP_DEADLINE_S
        waiting = list(self._members.values())
        while waiting and time.monotonic() < deadline:
            waiting = [proc for proc in waiting if not _reaped(proc)]
            if waiting:
                await asyncio.sleep(0.02)
        for socket in self._sockets:
            _remove_socket(socket)
        self._members.clear()
        return killed


def _running(proc: psutil.Process) -> bool:
    """Still there, zombies included: a zombie re-parented to us still needs reaping."""
    try:
        return proc.is_running()
    except psutil.Error:
        return False


def _reaped(proc: psutil.Process) -> bool:
    """True once ``proc`` is gone; reaps it if it is our (re-parented) zombie, by its own pid only."""
    try:
        if not proc.is_running():
            return True
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return True
    try:
        # Only this pid: waitpid(-1) would steal exit statuses from asyncio's child watcher.
        reaped, _ = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        return True  # a zombie of someone else's: its parent reaps it
    return reaped != 0


def _helper_sockets(proc: psutil.Process) -> list[Path]:
    try:
        args = proc.cmdline()
    except psutil.Error:
        return []
    paths = [Path(arg.removeprefix(_SOCKET_ARG).split(",", 1)[0]) for arg in args if arg.startswith(_SOCKET_ARG)]
    # Any descendant's argv can name a path (the agent's Bash runs there too): only the temp dir's
    # own sockets are the helper's, so the daemon never removes a file the agent points it at.
    return [p for p in paths if fnmatch.fnmatch(p.name, _SOCKET_NAME) and p.parent == _SOCKET_DIR]


def _remove_socket(path: Path) -> None:
    """Unlink ``path`` (a name directly in the temp dir) only if it is a socket; no link is followed."""
    with contextlib.suppress(OSError), workdir_fs.opened_dir(_SOCKET_DIR) as temp_fd:
        if stat.S_ISSOCK(os.stat(path.name, dir_fd=temp_fd, follow_symlinks=False).st_mode):
            os.unlink(path.name, dir_fd=temp_fd)


# Every CLI carries its daemon's identity; the CLI's helpers (socat, bwrap) inherit it.
OWNER_ENV = "AGENTD_OWNER"
LEFTOVER_KILL_DEADLINE_S = 5.0


def owner_env(data_dir: Path) -> dict[str, str]:
    """``AGENTD_OWNER=<pid>:<start time>:<data_dir>`` for the CLI: who started it, so a restart can tell leftovers."""
    me = psutil.Process()
    return {OWNER_ENV: f"{me.pid}:{me.create_time():.2f}:{data_dir.resolve()}"}


def sweep_leftovers(data_dir: Path) -> list[tuple[int, str]]:
    """Kill what a dead daemon of this data dir left behind (CLIs the parent-death signal missed, their helpers).

    A process is a leftover when its owner mark names this data dir and a daemon that no longer runs: the pid
    and start time together, so a recycled pid is no owner, and a live daemon's processes are never touched.
    Returns (pid, name) of those killed.
    """
    mine = str(data_dir.resolve())
    doomed = [proc for proc in psutil.process_iter() if _left_by_dead_owner(proc, mine)]
    killed = []
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            name = proc.name()
            proc.kill()
            killed.append((proc.pid, name))
    psutil.wait_procs(doomed, timeout=LEFTOVER_KILL_DEADLINE_S)
    return killed


def _left_by_dead_owner(proc: psutil.Process, data_dir: str) -> bool:
    try:
        mark = proc.environ().get(OWNER_ENV)
    except psutil.Error:  # another user's process, or gone
        return False
    if mark is None:
        return False
    pid, _, rest = mark.partition(":")
    started, _, where = rest.partition(":")
    if where != data_dir or not pid.isdigit():
        return False
    return not _is_running(int(pid), started)


def _is_running(pid: int, started: str) -> bool:
    try:
        return f"{psutil.Process(pid).create_time():.2f}" == started
    except psutil.Error:
        return False
