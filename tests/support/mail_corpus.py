"""The mail corpus in tests/data/mail-corpus (other projects' fixtures, labelled by reading each) and its figures."""

from __future__ import annotations

from dataclasses import dataclass

from bot.mail import policy
from bot.mail.parse import Mail, parse
from tests.support import paths

CORPUS = paths.DATA / "mail-corpus"
OWN = frozenset({"agent@agent.example.org"})


@dataclass(frozen=True)
class Sample:
    name: str
    machine: bool
    mail: Mail

    @property
    def reason(self) -> str | None:
        """Why the intake would not answer it (the channel's own check); None means answered."""
        return policy.loop_reason(self.mail, OWN)


@dataclass(frozen=True)
class Figures:
    machine_ignored: int
    machine_total: int
    human_answered: int
    human_total: int

    def lines(self) -> str:
        return (
            f"machine mail ignored: {self.machine_ignored}/{self.machine_total}"
            f" ({100 * self.machine_ignored / self.machine_total:.0f} %)\n"
            f"human mail answered:  {self.human_answered}/{self.human_total}"
            f" ({100 * self.human_answered / self.human_total:.0f} %)"
        )


def labels() -> dict[str, bool]:
    """File name -> True for machine mail, from labels.tsv."""
    found = {}
    for line in (CORPUS / "labels.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, label, _why = line.split("\t")
            found[name] = label == "machine"
    return found


def samples() -> list[Sample]:
    return [
        Sample(name, machine, parse((CORPUS / name).read_bytes(), 10, 10_000_000))
        for name, machine in sorted(labels().items())
    ]


def figures(found: list[Sample]) -> Figures:
    machines = [s for s in found if s.machine]
    humans = [s for s in found if not s.machine]
    return Figures(
        sum(s.reason is not None for s in machines),
        len(machines),
        sum(s.reason is None for s in humans),
        len(humans),
    )
