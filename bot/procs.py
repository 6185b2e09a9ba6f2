"""Process-tree inspection for the agent subprocesses (psutil)."""

from __future__ import annotations

import contextlib

import psutil

MIB = 1024 * 1024


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
