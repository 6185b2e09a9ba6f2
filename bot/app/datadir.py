"""One ``agentd run`` per data directory: its workdirs, transcripts and embedded store are this daemon's.

Two daemons on one data dir would spawn CLI processes in the same workdirs and resume the same
transcripts side by side (on the embedded store they would also share its file). Replicas each get
their own data dir and share one Redis. The lock is an ``flock`` on ``data_dir/agentd.lock``: it goes
with the process however it ends (SIGKILL too), and is not inherited by the CLI processes (CLOEXEC).
``agentd once`` does not take it: it runs beside a daemon, in a workdir of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "agentd.lock"


class DataDirInUse(Exception):
    """Another ``agentd run`` holds this data directory."""


@contextlib.contextmanager
def hold(data_dir: Path) -> Iterator[None]:
    """Holds ``data_dir`` for this daemon's life; raises ``DataDirInUse`` if another daemon holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(_in_use(data_dir, fd)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _in_use(data_dir: Path, fd: int) -> str:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
    by = f" (pid {holder})" if holder.isdigit() else ""
    return (
        f"data_dir {data_dir} is in use by another agentd run{by}: one daemon per data directory; "
        "replicas each need their own data_dir and share one Redis"
    )
