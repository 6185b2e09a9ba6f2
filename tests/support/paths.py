"""Where things are, for tests at any depth: the repository and the tests' own data."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
DATA = TESTS / "data"
ARTIFACTS = TESTS / "artifacts"
SUPPORT = TESTS / "support"
