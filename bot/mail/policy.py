"""Which mail may be answered: loop protection and the sender policy."""

from __future__ import annotations

import authres

from bot.config import EmailConfig
from bot.mail.parse import Mail

# Our own loop-detection header: every reply carries it; mail that carries it is never answered.
LOOP_HEADER = "X-Agentd-Loop"
_ROBOT_LOCAL_PARTS = ("mailer-daemon", "postmaster", "noreply", "no-reply", "donotreply", "do-not-reply")


def loop_reason(mail: Mail, own_addresses: frozenset[str]) -> str | None:
    """Why answering this mail could start a mail loop or answer a machine; None if it is a person's."""
    auto = _first(mail, "auto-submitted").lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    if any(value.strip() == "<>" for value in mail.header("return-path")):
        return "null Return-Path (a bounce)"
    if mail.content_type == "multipart/report":
        return "delivery status report"
    if _first(mail, "precedence").lower() in ("bulk", "list", "junk"):
        return f"Precedence: {_first(mail, 'precedence').lower()}"
    if mail.header("list-id") or mail.header("list-unsubscribe"):
        return "mailing list"
    if mail.header("x-autoreply") or mail.header("x-autorespond"):
        return "auto-reply header"
    local = mail.sender.partition("@")[0]
    if not mail.sender or local.startswith(_ROBOT_LOCAL_PARTS):
        return "robot sender"
    if mail.sender in own_addresses:
        return "own address"
    if mail.header(LOOP_HEADER.lower()):
        return "our loop header"
    return None


def sender_refusal(mail: Mail, config: EmailConfig) -> str | None:
    """Why the sender policy refuses this mail; None if it may be answered."""
    if config.allowed_senders and not sender_allowed(mail.sender, config.allowed_senders):
        return "sender not on the allowlist"
    if config.require_dmarc and not authenticated(mail, config.trusted_authserv_id or ""):
        return "no DMARC pass (or aligned DKIM) from the trusted authserv-id"
    return None


def sender_allowed(sender: str, allowed: list[str]) -> bool:
    """Entries are addresses (``a@b.c``) or domains (``b.c`` or ``@b.c``, subdomains included)."""
    domain = sender.rpartition("@")[2]
    for entry in (e.lower().strip() for e in allowed):
        if "@" in entry.lstrip("@"):
            if sender == entry:
                return True
        elif domain == entry.lstrip("@") or domain.endswith("." + entry.lstrip("@")):
            return True
    return False


def authenticated(mail: Mail, trusted_id: str) -> bool:
    """DMARC pass, or DKIM pass aligned with From, in the topmost Authentication-Results header.

    Only the topmost header is read, and only if our own MTA (``trusted_id``) added it: copies
    further down were added upstream, or by the sender, and prove nothing.
    """
    values = mail.header("authentication-results")
    if not values or not trusted_id:
        return False
    try:
        header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + values[0])
    except authres.AuthResError:
        return False
    if str(header.authserv_id).lower() != trusted_id.lower():
        return False
    from_domain = mail.sender.rpartition("@")[2]
    for result in header.results:
        if result.method == "dmarc" and result.result == "pass" and _property(result, "from") in ("", from_domain):
            return True  # a pass for another From domain (say a second From header) says nothing about this one
        if result.method == "dkim" and result.result == "pass" and _aligned(_property(result, "d"), from_domain):
            return True
    return False


def _property(result: authres.core.AuthenticationResult, name: str) -> str:
    """A ``header.<name>`` property of one result, lower case; empty if absent."""
    return next((str(p.value).lower() for p in result.properties if p.type == "header" and p.name == name), "")


def _aligned(signer: str, from_domain: str) -> bool:
    """Relaxed alignment: the same domain, or one a subdomain of the other."""
    if not signer or not from_domain:
        return False
    return signer == from_domain or from_domain.endswith("." + signer) or signer.endswith("." + from_domain)


def _first(mail: Mail, name: str) -> str:
    values = mail.header(name)
    return values[0].strip() if values else ""
