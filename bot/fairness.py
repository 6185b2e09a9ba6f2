"""Fair admission to a full pool: who a conversation belongs to, and who gets the next free room.

Pure functions over small values, so the policy is tested in milliseconds. The pool calls them
while it holds its room lock.

* A **tenant** is the party a cap applies to: a Slack user id, or for email the sender's *domain*
  (a From address is trivially spoofed, so one person could otherwise flood as a thousand senders).
  Trusted callers (the authenticated API, scheduled jobs) have no tenant and no cap.
* The next free room goes to the waiting conversation whose tenant has the fewest conversations in
  the pool (admitted or waiting), earliest arrival first among equals: a heavy user's backlog cannot
  starve a light user's single question.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Callers the daemon trusts: the API (behind its token) and the operator's own jobs.
TRUSTED_PREFIXES = ("api", "job:", "once")


def tenant_of(user: str) -> str | None:
    """The tenant a per-user cap counts ``user`` under, or None for a trusted or unknown caller."""
    if not user or user.startswith(TRUSTED_PREFIXES):
        return None
    if "@" in user:
        return "@" + user.rsplit("@", 1)[1].lower()
    return user


def is_domain(tenant: str | None) -> bool:
    """A mail sender's domain (many people share one, so it has a cap of its own)."""
    return tenant is not None and tenant.startswith("@")


@dataclass(frozen=True)
class Waiter:
    """A conversation waiting for room: its tenant and its arrival order."""

    tenant: str | None
    arrival: int


def next_waiter(waiting: Sequence[Waiter], admitted_tenants: Iterable[str | None]) -> Waiter | None:
    """The waiter that the next free room goes to: its tenant holds the fewest, admitted or waiting; then earliest."""
    if not waiting:
        return None
    # Trusted callers share one place in the order: uncapped, but not ahead of everyone.
    held = Counter(admitted_tenants)
    held.update(w.tenant for w in waiting)
    return min(waiting, key=lambda w: (held[w.tenant], w.arrival))


def over_cap(tenant: str | None, busy_tenants: Iterable[str | None], cap: int) -> bool:
    """Whether one more conversation for ``tenant`` exceeds ``cap`` (0: no cap) busy or waiting ones."""
    if tenant is None or cap == 0:
        return False
    return sum(1 for t in busy_tenants if t == tenant) >= cap
