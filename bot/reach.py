"""What an agent may touch: its own workdir for file tools, a read allowlist for sandboxed Bash.

Pure functions over paths, shared by the launcher (``bot.agent``) and the tests.

* **File tools** (Read, Write, Edit, Glob, Grep, NotebookEdit, and any tool
  with a path argument) are allowed only paths whose *real* path (symlinks,
  ``..`` and ``~`` resolved, relative paths taken from the tool's cwd) lies in
  the conversation's workdir.  Glob patterns and Grep's ``glob`` filter may not
  be absolute, start at ``~`` or climb with ``..``.  Deny by default: a path
  argument the check cannot read is refused.
* **Bash** runs in Claude Code's bubblewrap sandbox.  The CLI ignores a deny of
  ``/`` itself, so the allowlist is built from the top-level directories: every
  one except the system directories below is unreadable, and so are the config
  file, ``data_dir``, the daemon's home and ``agent.deny_read``; the workdir is
  re-allowed on top.
* **Permission rules** (``Read(...)``/``Edit(...)`` deny) repeat the same for
  the CLI's own checks, so one bug in the hook does not open the door.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Top-level directories Bash may read: programs, libraries, their configuration, devices, its own /proc.
SYSTEM_READ_DIRS = frozenset(
    {"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/dev", "/proc", "/sys", "/tmp"}
)
# Secrets inside those system directories.
# Left out of the Edit deny rules, which the CLI merges into the sandbox's write denials: Bash needs its
# private temp dir and /dev/null, and the kernel's own trees are not writable anyway.
WRITE_RULE_EXEMPT = frozenset({"/tmp", "/dev", "/proc", "/sys"})
SYSTEM_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d", "/etc/ssh", "/etc/ssl/private")
# Tools whose arguments are commands, questions or plans, not paths: their confinement is elsewhere
# (Bash: the sandbox) or they touch no file.
NO_PATH_TOOLS = frozenset({"Bash", "BashOutput", "KillShell", "KillBash", "TodoWrite", "AskUserQuestion"})
SEARCH_TOOLS = frozenset({"Glob", "Grep"})
TEMP_ROOT = Path(tempfile.gettempdir())
# Keys that hold a path in today's tools; any other key that looks like one is checked too (future tools).
_PATH_KEY = re.compile(r"(?:^|_)(?:path|paths|file|files|dir|directory|root|cwd)$", re.IGNORECASE)
_PATTERN_KEYS = {"Glob": ("pattern",), "Grep": ("glob",)}


@dataclass(frozen=True)
class Reach:
    """One conversation's boundary."""

    workdir: Path  # resolved
    data_dir: Path  # resolved
    home: Path  # resolved; its entries (dotfiles) are never readable
    protected: tuple[Path, ...] = ()  # never readable: the config file, agent.deny_read

    @classmethod
    def of(cls, workdir: Path, data_dir: Path, home: Path, protected: Iterable[Path] = ()) -> Reach:
        return cls(
            workdir=_real(workdir),
            data_dir=_real(data_dir),
            home=_real(home),
            protected=tuple(dict.fromkeys(_absolute(p) for p in protected)),
        )

    def refusal(self, tool: str, tool_input: Mapping[str, Any], cwd: str | None) -> str | None:
        """Why this call may not run, or None.  Every path argument must resolve inside the workdir."""
        if tool in NO_PATH_TOOLS:
            return None
        base = _real(Path(cwd)) if cwd else self.workdir
        paths = list(_path_arguments(tool_input))
        if tool in SEARCH_TOOLS and not paths:
            paths = [str(base)]  # a search without a root searches the cwd
        for raw in paths:
            if not isinstance(raw, str) or not self.inside(raw, base):
                return f"{raw!s:.200} is outside this conversation's working directory"
        for key in _PATTERN_KEYS.get(tool, ()):
            pattern = tool_input.get(key)
            if pattern is not None and not _confined_pattern(pattern):
                return f"the {key} {pattern!s:.200} reaches outside this conversation's working directory"
        return None

    def inside(self, raw: str, base: Path) -> bool:
        target = Path(os.path.expanduser(raw))
        resolved = _real(target if target.is_absolute() else base / target)
        return resolved.is_relative_to(self.workdir)

    # -- what the CLI enforces itself -------------------------------------------------

    def unreadable(self) -> list[Path]:
        """Paths sandboxed Bash may not read (the workdir is re-allowed on top)."""
        denied: list[Path] = []
        for top in _top_level_dirs():
            keep = [k for k in self._mount_points() if k.is_relative_to(top)]
            if str(top) in SYSTEM_READ_DIRS and top != TEMP_ROOT:
                continue
            # The CLI ignores a deny of the temp root, and needs home and its own temp dir mountable
            # (it plants decoy dotfiles there): deny everything beside the way down to those instead.
            denied += _around(top, keep) if keep else [top]
        if self.home != Path("/"):
            denied += [p for p in _children(self.home) if not _covers(p, [self.workdir])]
        return _dedupe([*denied, self.data_dir, *self.protected, *map(Path, SYSTEM_SECRETS)])

    def _mount_points(self) -> list[Path]:
        """Directories the sandbox itself must reach: home, the CLI's own temp dir, the workdir."""
        return [self.home, TEMP_ROOT / f"claude-{os.getuid()}", self.workdir]

    def sandbox_filesystem(self) -> dict[str, list[str]]:
        return {"denyRead": [str(p) for p in self.unreadable()], "allowRead": [str(self.workdir)]}

    def permission_rules(self) -> list[str]:
        """``Read``/``Edit`` deny rules for everything outside the workdir that no rule can re-open.

        Deny rules beat allow rules, so a rule may not cover an ancestor of the workdir: such
        ancestors (data_dir, the top-level directory holding it) are left to the hook and the sandbox.
        """
        mine = [self.workdir]
        unreadable = [p for p in [*self.unreadable(), *_children(self.data_dir)] if not _covers(p, mine)]
        unwritable = [p for p in _top_level_dirs() if str(p) not in WRITE_RULE_EXEMPT and not _covers(p, mine)]
        rules = [f"Read({_rule_path(p)})" for p in _dedupe(unreadable)]
        return rules + [f"Edit({_rule_path(p)})" for p in _dedupe([*unwritable, *unreadable])]


def _path_arguments(tool_input: Mapping[str, Any]) -> Iterable[object]:
    for key, value in tool_input.items():
        if not _PATH_KEY.search(key):
            continue
        if isinstance(value, list | tuple):
            yield from value
        elif value is not None:
            yield value


def _confined_pattern(pattern: object) -> bool:
    if not isinstance(pattern, str):
        return False
    text = pattern.strip()
    if text.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", text):
        return False
    # Brace alternatives ({a,../b}) and path separators both split segments.
    return ".." not in re.split(r"[/\\{},]", text)


def _rule_path(path: Path) -> str:
    # Claude Code permission rules: "//abs" is an absolute path; a directory covers its subtree with "/**".
    suffix = "/**" if path.is_dir() else ""
    return "/" + str(path) + suffix


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _absolute(path: Path) -> Path:
    return _real(Path(os.path.expanduser(str(path))))


def _top_level_dirs() -> list[Path]:
    return [p for p in _children(Path("/")) if p.is_dir() and not p.is_symlink()]


def _around(top: Path, keep: list[Path]) -> list[Path]:
    """Every entry below ``top`` that is not on the way down to one of ``keep`` (nor inside one)."""
    found: list[Path] = []
    for directory in _ways_down(top, keep):
        found += [p for p in _children(directory) if not _covers(p, keep)]
    return found


def _covers(path: Path, keep: Iterable[Path]) -> bool:
    """Would denying ``path`` deny a kept path?  The CLI denies a link's target too, so compare real paths."""
    real = _real(path)
    return any(k.is_relative_to(path) or k.is_relative_to(real) or real.is_relative_to(k) for k in keep)


def _ways_down(top: Path, keep: list[Path]) -> list[Path]:
    """``top`` and every directory between it and the kept paths (the kept paths themselves excluded)."""
    ways = {top}
    for path in keep:
        ways.update(p for p in path.parents if p.is_relative_to(top))
    return sorted(ways - set(keep))


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))
