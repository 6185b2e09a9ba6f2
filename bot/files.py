"""Files crossing the agent's workdir boundary: attachments in, ``outbox/`` out.

Names come from strangers (Slack uploads, email attachments) and from the
agent, so every name is reduced to a plain basename and every file the daemon
picks up must be a regular file, never a link the agent planted.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
import uuid
from pathlib import Path

from pathvalidate import sanitize_filename

INBOX = "inbox"
OUTBOX = "outbox"
MAX_OUTBOX_FILES = 20
# Below the usual 255-byte limit, leaving room for ``unique_path``'s ``-N`` suffix.
MAX_NAME_BYTES = 200
MAX_SUFFIX_BYTES = 16
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
    """Move staged attachments into ``workdir/inbox``; return their paths relative to the workdir."""
    inbox = workdir / INBOX
    inbox.mkdir(parents=True, exist_ok=True)
    placed = []
    for source in files:
        target = unique_path(inbox, safe_filename(source.name))
        shutil.move(source, target)
        placed.append(str(target.relative_to(workdir)))
    return placed


def take_outbox(workdir: Path, parking: Path) -> tuple[Path, ...]:
    """Move the regular files the agent left in ``outbox/`` out of its reach, so a later turn cannot swap them."""
    outbox = workdir / OUTBOX
    if not outbox.is_dir() or outbox.is_symlink():
        return ()
    found = sorted(p for p in outbox.iterdir() if p.is_file() and not p.is_symlink())[:MAX_OUTBOX_FILES]
    if not found:
        return ()
    batch = parking / uuid.uuid4().hex[:12]
    batch.mkdir(parents=True)
    moved = []
    for path in found:
        target = unique_path(batch, safe_filename(path.name))
        shutil.move(path, target)
        moved.append(target)
    return tuple(moved)


def attachment_note(placed: list[str]) -> str:
    return "\n\n[Files attached to this message, saved in your working directory: " + ", ".join(placed) + "]"
