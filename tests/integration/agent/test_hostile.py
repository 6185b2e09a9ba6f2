"""Worst-case inputs for the core's parsers and regexes on untrusted text (names, ids, tool inputs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bot.files import safe_filename
from bot.http import CONVERSATION_ID
from bot.reach import Reach
from bot.security import safe_name
from tests.support.hostile import assert_linear


def _reach(tmp_path: Path) -> Reach:
    workdir = tmp_path / "data" / "work" / "a"
    workdir.mkdir(parents=True)
    return Reach.of(workdir, tmp_path / "data", tmp_path / "home")


CASES: dict[str, tuple[Callable[[str], object], Callable[[int], str]]] = {
    "safe_name: long runs of unsafe characters": (safe_name, lambda n: "/.-_" * n + "a"),
    "safe_filename: alternating safe and unsafe": (safe_filename, lambda n: "a$" * n),
    "safe_filename: deep path": (safe_filename, lambda n: "a/" * n + "b"),
    "conversation id: almost valid": (CONVERSATION_ID.match, lambda n: "a" * n + "!"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_linear(case: str) -> None:
    function, make = CASES[case]
    assert_linear(function, make)


def test_path_check_is_linear_in_hostile_tool_input(tmp_path: Path) -> None:
    reach = _reach(tmp_path)
    cwd = str(reach.workdir)
    assert_linear(lambda key: reach.refusal("Tool", {key: "x"}, cwd), lambda n: "_path" * n + "x", n=5_000)
    assert_linear(lambda pattern: reach.refusal("Glob", {"pattern": pattern}, cwd), lambda n: "{a," * n, n=5_000)
    assert_linear(lambda path: reach.refusal("Read", {"file_path": path}, cwd), lambda n: "./" * n + "f", n=1_000)
