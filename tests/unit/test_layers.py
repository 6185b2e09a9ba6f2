"""The code's shape, kept: one owner per protocol library, channels speak only to the core's interfaces.

Read from the source with ``ast``, so a violation names the module and the import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest

from tests.support import paths

BOT = paths.ROOT / "bot"

# Each protocol library has one owner (a package or module prefix).
OWNERS = {
    "claude_agent_sdk": ("bot.agent",),
    "slack_bolt": ("bot.slack",),
    "slack_sdk": ("bot.slack",),
    "aioimaplib": ("bot.mail",),
    "aiosmtplib": ("bot.mail.smtp",),
}
# What a channel may use of agentd: the core's values and interfaces, and small helpers. Never the
# engine (pool, agent, gateway, http) nor the entry points (app): those are handed over by ``bot.app``.
CHANNELS = ("bot.slack", "bot.mail", "bot.jobs")
CHANNEL_MAY_IMPORT = (
    "bot.core",
    "bot.config",
    "bot.metrics",
    "bot.files",
    "bot.workdir_fs",
    "bot.lanes",
    "bot.probe",
    "bot.cron",
    "bot.store.keys",
)
# ``from bot.store import keys`` names the package itself, which is allowed only as that exact name.
CHANNEL_MAY_NAME = ("bot.store",)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(BOT.rglob("*.py")):
        name = ".".join(path.relative_to(paths.ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(), str(path))


def imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bot":
                yield from (f"bot.{alias.name}" for alias in node.names)
            else:
                yield node.module


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


ALL = list(modules())


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_protocol_library_has_one_owner(library: str) -> None:
    strays = [
        f"{module} imports {imported}"
        for module, tree in ALL
        for imported in imports(tree)
        if within(imported, (library,)) and not within(module, OWNERS[library])
    ]
    assert not strays, strays


def test_channels_import_only_the_core_their_own_package_and_small_helpers() -> None:
    strays = [
        f"{module} imports {imported}"
        for module, tree in ALL
        if within(module, CHANNELS)
        for imported in imports(tree)
        if imported.startswith("bot")
        and not within(imported, CHANNEL_MAY_IMPORT)
        and imported not in CHANNEL_MAY_NAME
        and not within(imported, (".".join(module.split(".")[:2]),))
    ]
    assert not strays, strays


def test_only_the_entry_points_import_the_entry_points() -> None:
    strays = [
        f"{module} imports {imported}"
        for module, tree in ALL
        if not within(module, ("bot.app",))
        for imported in imports(tree)
        if within(imported, ("bot.app",))
    ]
    assert not strays, strays
