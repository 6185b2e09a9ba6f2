"""What a ``doctor`` probe raises when it finds a problem or a caveat; probes live beside the code they check."""

from __future__ import annotations

# Each doctor check's own deadline (``agentd doctor --timeout``).
DEFAULT_TIMEOUT_S = 10.0


class ProbeFailed(Exception):
    """A setup problem: what is wrong, and what the operator can do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


class Caveat(Exception):
    """The check passed, with something the operator should know (``!``, not a failure)."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix
