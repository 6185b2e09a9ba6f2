"""The daemon's file operations inside an agent's workdir, all relative to directory handles.

The agent controls every name below its workdir and can change any of them at any moment (a
symlink, a hard link, a FIFO, an atomic ``renameat2(RENAME_EXCHANGE)`` of a directory with a link).
So the daemon never resolves a path below the workdir: it opens the workdir once, each child
directory with ``O_NOFOLLOW|O_DIRECTORY`` relative to its parent's descriptor, and each file with
``O_NOFOLLOW`` relative to its directory's descriptor, then checks what it opened (``fstat``), not
a name it might re-resolve.  Nothing the agent does inside its workdir makes the daemon read or
write outside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the agent planted returns at once instead of waiting for a writer.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODE = 0o644
DIR_MODE = 0o755
# A link or a file planted where the daemon expects its directory is kept under this prefix.
REPLACED_PREFIX = ".replaced-"
# What opening a name with ``DIR_FLAGS`` says when it is a symlink (ELOOP) or a file (ENOTDIR).
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)


class Refused(OSError):
    """An entry the daemon will not touch: a link, not a regular file, another device, more than one name."""


@contextlib.contextmanager
def opened_dir(path: Path | str, dir_fd: int | None = None) -> Iterator[int]:
    """A directory handle; ``path``'s last component may not be a link (``O_NOFOLLOW``)."""
    fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_subdir(parent_fd: int, name: str) -> Iterator[int]:
    """``name`` below ``parent_fd`` as a real directory on the parent's device, created when missing.

    When the agent left something else there (a link, a file), it is renamed away, never followed,
    and a fresh directory takes its place: the agent keeps what it made, the daemon writes only
    where it means to.  Replaced once more during that, it is refused (the ``OSError`` propagates).
    """
    try:
        fd = _make_and_open(parent_fd, name)
    except OSError as exc:
        if exc.errno not in _NOT_A_DIR:
            raise
        os.rename(name, REPLACED_PREFIX + uuid.uuid4().hex[:8], src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        fd = _make_and_open(parent_fd, name)
    try:
        _same_device(fd, parent_fd, name)
        yield fd
    finally:
        os.close(fd)


def _make_and_open(parent_fd: int, name: str) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


@contextlib.contextmanager
def existing_subdir(parent_fd: int, name: str) -> Iterator[int | None]:
    """``name`` below ``parent_fd`` if it is a real directory on the parent's device, else None."""
    fd = _open_existing(parent_fd, name)
    if fd is None:
        yield None
        return
    try:
        _same_device(fd, parent_fd, name)
        yield fd
    finally:
        os.close(fd)


def _open_existing(parent_fd: int, name: str) -> int | None:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _NOT_A_DIR:
            return None
        raise


def _same_device(fd: int, parent_fd: int, name: str) -> None:
    if os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev:
        raise Refused(errno.EXDEV, "on another device than its workdir", name)


def create_file(dir_fd: int, name: str) -> tuple[int, str]:
    """A new file ``name`` (or ``name-2``, ``name-3``...) below ``dir_fd``, never an existing entry or link."""
    stem, suffix = _split(name)
    counter = 1
    while True:
        candidate = name if counter == 1 else f"{stem}-{counter}{suffix}"
        try:
            return os.open(candidate, CREATE_FLAGS, FILE_MODE, dir_fd=dir_fd), candidate
        except FileExistsError:
            counter += 1


def _split(name: str) -> tuple[str, str]:
    path = Path(name)
    return path.stem, path.suffix


def list_regular(dir_fd: int) -> list[str]:
    """Names below ``dir_fd`` that are regular files right now (links not followed), sorted."""
    with os.scandir(dir_fd) as entries:
        return sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))


def open_regular(dir_fd: int, name: str) -> int:
    """A read handle on ``name``, refused unless what was opened is a regular file with one name on ``dir_fd``'s device.

    A hard link to a file outside has two names (or another device), a FIFO or socket is no regular
    file; the check is on the open handle, so a swap after it changes nothing that is read.
    """
    # Checked before opening too, so a device node is never opened at all (an open can have effects).
    if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise Refused(errno.EINVAL, "not a regular file", name)
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise Refused(errno.EINVAL, "not a regular file", name)
        if found.st_dev != os.fstat(dir_fd).st_dev:
            raise Refused(errno.EXDEV, "on another device than its directory", name)
        if found.st_nlink != 1:
            raise Refused(errno.EMLINK, "a hard link (more than one name)", name)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_fd(source: int, target: int) -> None:
    with open(source, "rb", closefd=False) as reading, open(target, "wb", closefd=False) as writing:
        shutil.copyfileobj(reading, writing)


def move_checked(src_fd: int, name: str, dst_fd: int, new_name: str, opened: int) -> None:
    """Rename ``name`` to ``new_name`` (a fresh name in a daemon-only directory), then make sure it moved ``opened``.

    The rename is relative to both handles and moves the entry itself, never a link's target.  If
    the agent swapped the name between ``open_regular`` and the rename, what arrived is not the file
    that was checked: it is removed from the daemon's directory again (only that name; a link's
    target is untouched) and refused.  Across file systems the checked handle's content is copied.
    """
    try:
        os.rename(name, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_out(src_fd, name, dst_fd, new_name, opened)
        return
    moved, checked = os.stat(new_name, dir_fd=dst_fd, follow_symlinks=False), os.fstat(opened)
    if (moved.st_dev, moved.st_ino) == (checked.st_dev, checked.st_ino) and moved.st_nlink == 1:
        return
    _discard(dst_fd, new_name)
    raise Refused(errno.EBUSY, "replaced while it was being taken", name)


def _copy_out(src_fd: int, name: str, dst_fd: int, new_name: str, opened: int) -> None:
    target = os.open(new_name, CREATE_FLAGS, FILE_MODE, dir_fd=dst_fd)
    try:
        copy_fd(opened, target)
    finally:
        os.close(target)
    unlink_if_same(src_fd, name, opened)


def _discard(dir_fd: int, name: str) -> None:
    if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based: enters no link (see ``remove_tree``)
    else:
        os.unlink(name, dir_fd=dir_fd)


def unlink_if_same(dir_fd: int, name: str, opened: int) -> None:
    """Remove ``name`` only while it is still the file ``opened`` (the agent may have swapped it since)."""
    with contextlib.suppress(FileNotFoundError):
        now, then = os.stat(name, dir_fd=dir_fd, follow_symlinks=False), os.fstat(opened)
        if (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino):
            os.unlink(name, dir_fd=dir_fd)


def remove_tree(path: Path) -> None:
    """Delete a directory tree the agent had, following no link inside it (or at ``path`` itself).

    ``shutil.rmtree`` walks by descriptors on Linux (``avoids_symlink_attacks``), checks that each
    directory it opens is the one it listed, and unlinks links instead of entering them; it is
    called relative to the parent's handle so the tree's own name is not re-resolved from the root.
    Without that guarantee it refuses to run rather than fall back to a path walk.
    """
    if not shutil.rmtree.avoids_symlink_attacks:
        raise Refused(errno.ENOTSUP, "this platform's rmtree can follow links", str(path))
    with contextlib.suppress(FileNotFoundError), opened_dir(path.parent) as parent_fd:
        if stat.S_ISLNK(os.stat(path.name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            os.unlink(path.name, dir_fd=parent_fd)
            return
        shutil.rmtree(path.name, dir_fd=parent_fd)
