"""Sending one reply over SMTP, and telling a refusal that will never change from one worth retrying."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import aiosmtplib

from bot.config import EmailConfig
from bot.mail import oauth
from bot.probe import ProbeFailed

_DEFAULT_PORTS = {"tls": 465, "starttls": 587, "plain": 25}


class SendError(Exception):
    """The SMTP server did not take the reply for every recipient."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# What ``send`` raises when the server did not take the mail: callers catch these, never aiosmtplib's names.
SEND_FAILURES: tuple[type[Exception], ...] = (SendError, aiosmtplib.SMTPException, OSError)


async def send(config: EmailConfig, raw: bytes, sender: str, to: str) -> None:
    """Hand ``raw`` to the SMTP server for ``to``; raises one of ``SEND_FAILURES`` if it is not taken."""
    try:
        errors, _ = await aiosmtplib.send(
            raw,
            sender=sender,
            recipients=[to],
            hostname=config.smtp_host or config.imap_host,
            port=config.smtp_port or _DEFAULT_PORTS[config.smtp_security],
            use_tls=config.smtp_security == "tls",
            start_tls=config.smtp_security == "starttls",
            tls_context=config.tls_context() if config.smtp_security != "plain" else None,
            timeout=config.command_timeout_s,
            **_credentials(config),
        )
    except aiosmtplib.SMTPAuthenticationError:
        _token_refused(config)
        raise
    except oauth.TokenError as exc:
        raise aiosmtplib.SMTPException(f"no OAuth2 token for SMTP: {exc}") from None
    if errors:
        code = min(response.code for response in errors.values())
        raise SendError(f"recipients refused: {errors}", code)


def permanent(exc: Exception) -> bool:
    """A 5xx answer will not change on retry (an unknown recipient): record it instead of retrying.

    When every recipient is refused, aiosmtplib raises one error per recipient, wrapped: permanent
    only if each of them is.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(_permanent_code(refused.code) for refused in exc.recipients)
    if isinstance(exc, SendError | aiosmtplib.SMTPResponseException):
        return _permanent_code(exc.code)
    return False


def _permanent_code(code: int) -> bool:
    return 500 <= code < 600


def _user(config: EmailConfig) -> str | None:
    """``smtp_user`` unset: the IMAP login; set to "": no SMTP authentication."""
    user = config.imap_user if config.smtp_user is None else config.smtp_user
    return user or None


def _credentials(config: EmailConfig) -> dict[str, Any]:
    """aiosmtplib's login arguments: a password, an OAuth2 token source (XOAUTH2), or none."""
    user = _user(config)
    if user is None:
        return {}
    if config.auth == "password":
        return {"username": user, "password": _password(config)}
    return {"username": user, "oauth_token_generator": functools.partial(oauth.access_token, config)}


def _token_refused(config: EmailConfig) -> None:
    if config.auth != "password":
        oauth.refused(config)  # revoked or expired early: the next attempt fetches a new token


def _password(config: EmailConfig) -> str | None:
    secret = config.smtp_password or config.imap_password
    return secret.get_secret_value() if secret else None


async def probe(config: EmailConfig) -> str:
    """``agentd doctor``'s SMTP check: connect (with TLS or STARTTLS as configured) and log in; send nothing."""
    host = config.smtp_host or config.imap_host
    port = config.smtp_port or _DEFAULT_PORTS[config.smtp_security]
    user = _user(config)
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        use_tls=config.smtp_security == "tls",
        start_tls=config.smtp_security == "starttls",
        tls_context=config.tls_context() if config.smtp_security != "plain" else None,
        timeout=config.command_timeout_s,
    )
    where = f"{host}:{port}"
    try:
        await _connect(client, where)
        if user:
            await _login(client, config, user, where)
    finally:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
    login = f"logged in as {user}" if user else "no login (smtp_user is empty)"
    return f"{where} ({config.smtp_security}), {login}"


async def _connect(client: aiosmtplib.SMTP, where: str) -> None:
    try:
        await client.connect()
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise ProbeFailed(
            f"cannot connect to SMTP at {where}: {exc}",
            "check email.smtp_host, smtp_port and smtp_security (tls: 465, starttls: 587)",
        ) from None


async def _login(client: aiosmtplib.SMTP, config: EmailConfig, user: str, where: str) -> None:
    try:
        if config.auth == "password":
            await client.login(user, _password(config) or "")
        else:
            await client.auth_xoauth2(user, await oauth.access_token(config))
    except oauth.TokenError as exc:
        raise ProbeFailed(
            f"no OAuth2 token for SMTP: {exc}", "check email.oauth_token_url and its credentials"
        ) from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        _token_refused(config)
        raise ProbeFailed(
            f"SMTP refused the login of {user} ({exc.code} {exc.message})", "check email.smtp_user and SMTP_PASSWORD"
        ) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise ProbeFailed(
            f"SMTP at {where} did not log {user} in: {exc}",
            'use smtp_security tls or starttls, or set email.smtp_user = "" if the server takes mail without a login',
        ) from None
