"""``agentd doctor``'s IMAP check: log in, select the watched mailbox, and look for the folders the config names."""

from __future__ import annotations

import aioimaplib

from bot.config import EmailConfig, TriageConfig
from bot.mail.mailbox import ImapError, Mailbox, quote
from bot.probe import ProbeFailed


async def probe_imap(config: EmailConfig, triage: TriageConfig) -> str:
    """What the watcher does first (connect, log in, select), then STATUS of each folder the config names."""
    box = Mailbox(config)
    where = f"{config.imap_host}:{config.imap_port or ('993' if config.imap_security == 'tls' else '143')}"
    try:
        await _login(box, config, where)
        try:
            await box.select(config.mailbox)
        except ImapError as exc:
            raise ProbeFailed(
                f"the mailbox {config.mailbox!r} cannot be selected: {exc}",
                f"create {config.mailbox!r} on the server or set email.mailbox to an existing folder",
            ) from None
        missing = [folder for folder in _named_folders(config, triage) if not await _exists(box, folder)]
    finally:
        await box.close()
    later = f"; {', '.join(missing)} not there yet (created on first use)" if missing else ""
    how = "" if config.auth == "password" else f" with {config.auth.upper()} (a token from {config.oauth_token_url})"
    return f"logged in to {where} as {config.imap_user}{how}, {config.mailbox} selected{later}"


async def _login(box: Mailbox, config: EmailConfig, where: str) -> None:
    try:
        await box.connect()
    except ImapError as exc:
        if str(exc).startswith("login refused"):
            raise ProbeFailed(f"IMAP refused the login of {config.imap_user} ({exc})", _login_fix(config)) from None
        if str(exc).startswith(("no OAuth2 token", "the server does not offer")):
            raise ProbeFailed(f"IMAP at {where}: {exc}", _login_fix(config)) from None
        raise ProbeFailed(f"IMAP at {where}: {exc}", _CONNECT_FIX) from None
    except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
        raise ProbeFailed(f"cannot connect to IMAP at {where}: {exc or type(exc).__name__}", _CONNECT_FIX) from None


def _login_fix(config: EmailConfig) -> str:
    if config.auth == "password":
        return "check email.imap_user and IMAP_PASSWORD"
    return (
        "check email.auth (the mechanisms the server offers), email.oauth_token_url, oauth_client_id,"
        " EMAIL_OAUTH_CLIENT_SECRET and EMAIL_OAUTH_REFRESH_TOKEN, and that the app may use IMAP"
    )


_CONNECT_FIX = "check email.imap_host, imap_port and imap_security (tls: 993, starttls/plain: 143), and tls_ca_file"


def _named_folders(config: EmailConfig, triage: TriageConfig) -> list[str]:
    """Folders agentd moves or saves mail to; it creates each one the first time it needs it."""
    named = [config.processed_folder, config.refused_folder, *triage.folders, triage.drafts_folder]
    return list(dict.fromkeys(folder for folder in named if folder))


async def _exists(box: Mailbox, folder: str) -> bool:
    response = await box.command(box.client.status(quote(folder), "(MESSAGES)"))
    return bool(response.result == "OK")
