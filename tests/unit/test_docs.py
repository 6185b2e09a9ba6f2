"""The docs stay true to the code: every config key is documented and listed, and every link lands.

The key tables are read from ``docs/configuration.md`` and the per-concern pages: a table whose
first header cell ends in ``key``. The header names the section (``| `[agent]` key | ...``), or the
keys are qualified (``store.redis_url``). A first cell may hold several keys, and ``.x`` is a
sibling of the key before it (``telemetry.endpoint``, ``.protocol``). A table's name segment such
as ``NAME`` or ``"<prefix>"`` stands for any name.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from bot.config import ConfigError, Settings, load_settings
from tests.support import paths

DOCS = paths.ROOT / "docs"
KEY_PAGES = ["configuration.md", "slack.md", "email.md", "jobs.md", "gateway.md", "telemetry.md"]
EXAMPLE = paths.ROOT / "deploy" / "agentd.example.toml"
# Fields kept only to refuse an old key with a message saying where it went (not keys to set).
MOVED = {"slack.ask_tools": "ask_tools moved to the profile", "email.allowed_tools": "allowed_tools moved"}
ANY = "*"

Tree = dict[str, "Tree"]


def _model_of(annotation: object) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _tree(model: type[BaseModel], top: bool = False) -> Tree:
    """The keys a TOML file can set, as nested names; ``*`` where a table's name is free."""
    tree: Tree = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if (sub := _model_of(annotation)) is not None:
            tree[name] = _tree(sub)
        elif origin is dict and (sub := _model_of(args[1])) is not None:
            tree[name] = {ANY: _tree(sub)}  # [profiles.NAME], [gateway.prices."PREFIX"]
        elif top and origin is list and (sub := _model_of(args[0])) is not None:
            tree[name] = {ANY: _tree(sub)}  # [[schedule]]; a list of tables inside a section is one key
        elif origin not in (typing.Union, types.UnionType) or not any(map(_model_of, args)):
            tree[name] = {}
        else:
            raise AssertionError(f"{name}: teach this test the shape {annotation}")
    return tree


TREE = _tree(Settings, top=True)


def _leaves(tree: Tree, prefix: str = "") -> Iterator[str]:
    for name, sub in tree.items():
        yield from _leaves(sub, f"{prefix}{name}.") if sub else [prefix + name]


SETTINGS_KEYS = set(_leaves(TREE)) - set(MOVED)


def _segments(key: str) -> list[str]:
    return re.findall(r'"[^"]*"|[^.]+', key)


def _resolve(key: str) -> str | None:
    """The settings key a documented one names (free names as ``*``), or None if there is none."""
    node, out = TREE, list[str]()
    for segment in _segments(key):
        name = segment if segment in node else ANY if ANY in node else None
        if name is None:
            return None
        node = node[name]
        out.append(name)
    return ".".join(out) if not node else None


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _outside_fences(text: str) -> Iterator[str]:
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield line


def _tables(text: str) -> Iterator[list[list[str]]]:
    table: list[list[str]] = []
    for line in [*_outside_fences(text), ""]:
        if line.startswith("|"):
            table.append(_cells(line))
        elif table:
            yield table
            table = []


def _section(brackets: str, name: str) -> str:
    """A table header's key prefix: ``[[schedule]]`` is one element of the list, any one."""
    return f"{name}.{ANY}" if brackets == "[[" else name


def documented_keys(page: str) -> Iterator[tuple[str, str]]:
    """(as written, qualified) for every key in the page's key tables."""
    for header, _rule, *rows in _tables((DOCS / page).read_text()):
        if not header[0].endswith("key"):
            continue
        section = re.search(r"(\[\[?)([^\]\[]+)\]", header[0])
        prefix = _section(section[1], section[2]) + "." if section else ""
        for row in rows:
            previous = ""
            for written in re.findall(r"`([^`]+)`", row[0]):
                key = previous.rsplit(".", 1)[0] + written if written.startswith(".") else prefix + written
                previous = key
                yield written, key


def test_every_setting_is_documented_and_every_documented_key_exists() -> None:
    documented: dict[str, str] = {}
    unknown = []
    for page in KEY_PAGES:
        for written, key in documented_keys(page):
            resolved = _resolve(key)
            if resolved is None:
                unknown.append(f"{page}: `{written}` ({key})")
            else:
                documented[resolved] = page
    missing = sorted(SETTINGS_KEYS - set(documented))
    assert (unknown, missing) == ([], []), f"unknown to bot/config.py: {unknown}; not documented: {missing}"


def _example_sections() -> dict[str, list[str]]:
    """The example's lines by section, commented-out sections (``# [profiles.chat]``) included."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"#?\s*(\[\[?)([^\]\[]+)\]\]?\s*(#.*)?$", line)
        if header:
            current = _section(header[1], header[2])
            sections.setdefault(current, [])
        else:
            sections[current].append(line)
    return sections


def test_example_config_lists_every_key_and_only_known_ones() -> None:
    listed, unknown = set(), []
    for section, lines in _example_sections().items():
        text = "\n".join(lines)
        for line in lines:
            if (assignment := re.match(r"#?\s*([a-z_]+)\s*=", line)) and _resolve(f"{section}.{assignment[1]}") is None:
                unknown.append(f"[{section}] {assignment[1]}")
        # A key is listed when its section names it: set, commented out, or said where it comes from.
        for name in set(re.findall(r"\b[a-z][a-z_]*\b", text)):
            if section and (resolved := _resolve(f"{section}.{name}")) is not None:
                listed.add(resolved)
    missing = sorted(SETTINGS_KEYS - listed)
    assert (unknown, missing) == ([], []), f"unknown to bot/config.py: {unknown}; not in the example: {missing}"
    assert tomllib.loads(EXAMPLE.read_text())  # and it is TOML (test_config checks it matches the defaults)


@pytest.mark.parametrize("key", sorted(MOVED))
def test_moved_keys_are_refused_and_documented(tmp_path: Path, key: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "agentd.toml"
    path.write_text(f'[{section}]\n{name} = ["Read"]\n')
    with pytest.raises(ConfigError, match=MOVED[key]):
        load_settings(path, {})
    assert f"`{key}`" in (DOCS / "configuration.md").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _outside_fences(path.read_text()):
        if heading := re.match(r"#{1,6} (.+)", line):
            slug = _slug(heading[1])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")  # GitHub numbers repeated headings
    return found


def links(path: Path) -> Iterator[str]:
    for line in _outside_fences(path.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):
                yield target


PAGES = [paths.ROOT / "README.md", paths.ROOT / "deploy" / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(paths.ROOT)))
def test_every_relative_link_lands(page: Path) -> None:
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


def test_the_readme_names_the_test_command_ci_runs() -> None:
    readme = (paths.ROOT / "README.md").read_text()
    assert re.search(r"^bash tests/run +#", readme, re.M)
    assert "exec bash tests/run" in (paths.ROOT / ".ci" / "run").read_text()


def test_slugs_follow_github() -> None:
    assert _slug("One-shot tasks: `agentd once`") == "one-shot-tasks-agentd-once"
    assert _slug("`[store]`, `[http]`, `[log]`") == "store-http-log"
    assert _slug("Dependencies, and why") == "dependencies-and-why"
