"""Files crossing the agent's workdir boundary: attachments in, ``outbox/`` out.

Names come from strangers (Slack uploads, email attachments) and from the
agent, so every name is reduced to a plain basename and every file the daemon
picks up must be a regular file, never a link the agent planted.
"""

from __future__ import annotations

import os
import re
import unicodedata
import uuid
from pathlib import Path

import structlog
from pathvalidate import sanitize_filename

from bot import workdir_fs

INBOX = "inbox"
OUTBOX = "outbox"
MAX_OUTBOX_FILES = 20
# Below the usual 255-byte limit, leaving room for ``unique_path``'s ``-N`` suffix.
MAX_NAME_BYTES = 200
MAX_SUFFIX_BYTES = 16
log = structlog.get_logger(__name__)
_UNSAFE = re.compile(r"[^\w.\- ]+")


def safe_filename(name: str, fallback: str = "file") -> str:
    """A basename with no path, control or shell-special characters; never empty, dot-only or hidden.

    At most ``MAX_NAME_BYTES`` bytes of UTF-8 (file systems limit bytes, and NFKC can multiply them),
    keeping a short extension.
    """
    base = unicodedata.normalize("NFKC", name).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" ._")
    return _cap_bytes(cleaned).strip(" ._") or fallback


def _cap_bytes(name: str) -> str:
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    stem, suffix = Path(name).stem, Path(name).suffix
    if len(suffix.encode()) > MAX_SUFFIX_BYTES:
        stem, suffix = name, ""
    # pathvalidate truncates by encoded bytes and never splits a character.
    return sanitize_filename(stem, max_len=MAX_NAME_BYTES - len(suffix.encode())) + suffix


def unique_path(directory: Path, name: str) -> Path:
    """``directory/name``, or ``name-2``, ``name-3``... when taken."""
    candidate = directory / name
    stem, suffix = Path(name).stem, Path(name).suffix
    counter = 2
    while candidate.exists():
        candidate = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def move_into_inbox(files: tuple[Path, ...], workdir: Path) -> list[str]:
    """Move staged attachments into ``workdir/inbox``; return their paths relative to the workdir.

    Written through directory handles (``bot.workdir_fs``): an ``inbox`` the agent replaced with a
    link or a file is renamed away and recreated, and each file is created anew (``O_EXCL``), so the
    user's content lands in the workdir and nowhere else.
    """
    placed = []
    with workdir_fs.opened_dir(workdir) as workdir_fd, workdir_fs.own_subdir(workdir_fd, INBOX) as inbox_fd:
        for source in files:
            target_fd, name = workdir_fs.create_file(inbox_fd, safe_filename(source.name))
            try:
                with source.open("rb") as staged:  # staged by the daemon under data_dir, out of the agent's reach
                    workdir_fs.copy_fd(staged.fileno(), target_fd)
            finally:
                os.close(target_fd)
            source.unlink()
            placed.append(f"{INBOX}/{name}")
    return placed


def take_outbox(workdir: Path, parking: Path) -> tuple[Path, ...]:
    """Move the regular files the agent left in ``outbox/`` out of its reach, so a later turn cannot swap them.

    Every step is relative to the outbox's handle and each file's own handle (``bot.workdir_fs``):
    a link, FIFO, socket, device, hard link or file on another device is refused and left, and
    swapping ``outbox`` or a file in it for a link mid-way moves nothing from outside.
    """
    if not workdir.is_dir():  # not made yet (a launcher that never ran a CLI there): nothing to take
        return ()
    with workdir_fs.opened_dir(workdir) as workdir_fd, workdir_fs.existing_subdir(workdir_fd, OUTBOX) as outbox_fd:
        if outbox_fd is None:
            return ()
        names = workdir_fs.list_regular(outbox_fd)[:MAX_OUTBOX_FILES]
        if not names:
            return ()
        batch = parking / uuid.uuid4().hex[:12]
        batch.mkdir(parents=True)
        with workdir_fs.opened_dir(batch) as batch_fd:
            taken = [_take_one(outbox_fd, name, batch, batch_fd) for name in names]
        if not any(taken):
            batch.rmdir()
        return tuple(path for path in taken if path is not None)


def _take_one(outbox_fd: int, name: str, batch: Path, batch_fd: int) -> Path | None:
    try:
        source_fd = workdir_fs.open_regular(outbox_fd, name)
    except OSError as exc:  # Refused; ELOOP: swapped for a link since listed; ENXIO: a socket; gone
        log.warning("outbox_file_refused", name=safe_filename(name), reason=exc.strerror)
        return None
    target = unique_path(batch, safe_filename(name))  # batch is the daemon's: no one else names files there
    try:
        workdir_fs.move_checked(outbox_fd, name, batch_fd, target.name, source_fd)
    except OSError as exc:
        log.warning("outbox_file_refused", name=safe_filename(name), reason=exc.strerror)
        return None
    finally:
        os.close(source_fd)
    return target


def attachment_note(placed: list[str]) -> str:
    return "\n\n[Files attached to this message, saved in your working directory: " + ", ".join(placed) + "]"
