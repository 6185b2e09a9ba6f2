"""Run a command under a Docker-format seccomp profile, loaded as runc loads it for an x86-64 container with
no capabilities (deploy/compose.yaml and deploy/k8s/ drop them all).

    /usr/bin/python3 tests/support/seccomp_run.py COMMAND [ARG...] < PROFILE

Runs on Debian's Python with python3-seccomp (libseccomp's own bindings), not in the project's venv.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import seccomp  # type: ignore[import-not-found]

ARCH = "amd64"  # Docker's name for x86-64 in "arches"
CAPS: frozenset[str] = frozenset()
OPS = {"SCMP_CMP_EQ": seccomp.EQ, "SCMP_CMP_GT": seccomp.GT, "SCMP_CMP_LT": seccomp.LT, "SCMP_CMP_MASKED_EQ": None}


def kernel_at_least(version: str) -> bool:
    running = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    return running >= tuple(int(part) for part in version.split(".")[:2])


def applies(rule: dict[str, Any]) -> bool:
    includes, excludes = rule.get("includes", {}), rule.get("excludes", {})
    if "arches" in includes and ARCH not in includes["arches"]:
        return False
    if not set(includes.get("caps", [])) <= CAPS:
        return False
    if "minKernel" in includes and not kernel_at_least(includes["minKernel"]):
        return False
    return ARCH not in excludes.get("arches", []) and not set(excludes.get("caps", [])) & CAPS


def condition(arg: dict[str, Any]) -> Any:
    if arg["op"] == "SCMP_CMP_MASKED_EQ":
        return seccomp.Arg(arg["index"], seccomp.MASKED_EQ, arg["value"], arg.get("valueTwo", 0))
    return seccomp.Arg(arg["index"], OPS[arg["op"]], arg["value"])


def argument_sets(args: list[dict[str, Any]]) -> list[list[Any]]:
    """Conditions on distinct arguments must all hold; several on one argument are alternatives (as in runc)."""
    indexes = [arg["index"] for arg in args]
    if len(set(indexes)) == len(indexes):
        return [[condition(arg) for arg in args]]
    return [[condition(arg)] for arg in args]


def build(profile: dict[str, Any]) -> Any:
    default_errno = profile.get("defaultErrnoRet", 1)
    syscall_filter = seccomp.SyscallFilter(defaction=seccomp.ERRNO(default_errno))
    for rule in profile["syscalls"]:
        if not applies(rule):
            continue
        action = seccomp.ALLOW
        if rule["action"] == "SCMP_ACT_ERRNO":
            action = seccomp.ERRNO(rule.get("errnoRet", default_errno))
        for name in rule["names"]:
            for conditions in argument_sets(rule.get("args", [])):
                try:
                    syscall_filter.add_rule(action, name, *conditions)
                except (RuntimeError, ValueError):
                    continue  # a syscall this libseccomp or architecture does not know: runc skips it too
    return syscall_filter


def main() -> None:
    build(json.load(sys.stdin)).load()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
