"""Secrets leave the daemon's process environment before anything can read it.

``/proc/<pid>/environ`` shows the environment a process was *started* with, whatever it later
removes from ``os.environ``; an unsandboxed Bash of the same user reads it. So ``agentd run`` and
``agentd once`` re-execute themselves once, at start, with the secret variables moved onto an
inherited memory file (``memfd``): the new image reads them from that descriptor, closes it, and
builds its config from them; its own start-up environment holds none. Not running as root, it
also marks itself non-dumpable, so its children cannot read its memory or its ``/proc`` entries.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import MutableMapping

from bot.config import CONVENTIONAL_VARIABLES

HANDOVER_VARIABLE = "AGENTD_SECRETS_FD"
_PR_SET_DUMPABLE = 4


def _secret_names(environ: MutableMapping[str, str]) -> list[str]:
    """Everything the config may read from the environment: the conventional names and ``AGENTD_*``."""
    return sorted(n for n in environ if n in CONVENTIONAL_VARIABLES or n.startswith("AGENTD_"))


def take_handed_over(environ: MutableMapping[str, str]) -> bool:
    """In the re-executed image: put the handed-over variables into ``environ``; False if there were none."""
    fd_text = environ.pop(HANDOVER_VARIABLE, None)
    if fd_text is None:
        return False
    with os.fdopen(int(fd_text), "rb") as handed:
        environ.update(json.loads(handed.read()))
    _not_dumpable()
    return True


def reexec_without_secrets(environ: MutableMapping[str, str]) -> None:
    """Re-execute this command with its secret variables on a descriptor; returns only if there are none."""
    moved = {name: environ[name] for name in _secret_names(environ)}
    if not moved:
        _not_dumpable()
        return
    fd = os.memfd_create("agentd-secrets", 0)  # no MFD_CLOEXEC: the new image inherits it
    with os.fdopen(os.dup(fd), "wb") as out:
        out.write(json.dumps(moved).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    clean = {k: v for k, v in environ.items() if k not in moved}
    clean[HANDOVER_VARIABLE] = str(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], clean)


def _not_dumpable() -> None:
    # Root reads any process's memory anyway; for another user this keeps the daemon's own children out.
    if os.geteuid() != 0 and ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        # Fail closed: a daemon whose children could read its memory must not start.
        raise OSError(
            ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed: the daemon would be readable by its agents"
        )
