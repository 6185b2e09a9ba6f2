"""OAuth2 for the inbox: a real Dovecot validating tokens against a local authorization server.

Dovecot's ``oauth2`` passdb introspects every token agentd presents (XOAUTH2 or OAUTHBEARER); the
fake server issues, expires and revokes them. Covered: a good token, an expired one (refreshed, no
mail lost), a revoked refresh token (a clear error, and the watcher keeps retrying until it is good).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiosmtplib
import pytest

from bot.config import EmailConfig, TriageConfig
from bot.mail import oauth, smtp
from bot.mail.mailbox import ImapError, Mailbox
from bot.mail.probe import probe_imap
from bot.probe import ProbeFailed
from tests.fakes.mailserver import DOMAIN, MailServer, message
from tests.fakes.model import FakeModel
from tests.fakes.oauth import CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, OAuthServer
from tests.support.helpers import wait_until
from tests.support.mail_harness import AGENT, email_settings, running, wait_replies


@pytest.fixture
async def issuer() -> AsyncIterator[OAuthServer]:
    server = OAuthServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def oauth_mail(issuer: OAuthServer) -> Iterator[MailServer]:
    server = MailServer(oauth=issuer)
    server.start()
    yield server
    server.stop()


def oauth_settings(issuer: OAuthServer, auth: str = "xoauth2") -> dict[str, Any]:
    return {
        "auth": auth,
        "imap_password": None,
        "oauth_token_url": f"{issuer.url}/token",
        "oauth_client_id": CLIENT_ID,
        "oauth_client_secret": CLIENT_SECRET,
        "oauth_refresh_token": REFRESH_TOKEN,
    }


@pytest.fixture(autouse=True)
def no_cached_tokens() -> Iterator[None]:
    oauth._CACHE.clear()
    yield
    oauth._CACHE.clear()


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
async def test_a_good_token_logs_in(issuer: OAuthServer, oauth_mail: MailServer, auth: str) -> None:
    box = Mailbox(EmailConfig(**email_settings(oauth_mail, **oauth_settings(issuer, auth))))
    try:
        await box.connect()
        await box.select("INBOX")
    finally:
        await box.close()
    assert issuer.grants == ["refresh_token"] and issuer.introspected == issuer.issued


async def test_a_refused_token_is_a_clear_error_not_a_hang(issuer: OAuthServer, oauth_mail: MailServer) -> None:
    config = EmailConfig(**email_settings(oauth_mail, **oauth_settings(issuer)))
    await oauth.access_token(config)
    issuer.revoke_all()
    box = Mailbox(config)
    try:
        with pytest.raises(ImapError, match="login refused"):
            await box.connect()
    finally:
        await box.close()
    assert await oauth.access_token(config) == issuer.issued[-1] != issuer.issued[0]  # refused: fetched anew


async def test_the_inbox_is_answered_across_an_expired_and_a_revoked_token(
    tmp_path: Any, fake_model: FakeModel, issuer: OAuthServer, oauth_mail: MailServer
) -> None:
    settings = oauth_settings(issuer)
    async with running(tmp_path, fake_model, oauth_mail, email=settings):
        oauth_mail.deliver(message("first", "Question one."))
        await wait_replies(oauth_mail, 1)
        # Expired: Dovecot refuses the cached token at the next login; a new one is fetched.
        issuer.expire_all()
        await asyncio.to_thread(oauth_mail.kick)
        oauth_mail.deliver(message("second", "Question two, sent while the token had expired."))
        await wait_replies(oauth_mail, 2, timeout=60)
        assert len(issuer.issued) >= 2
        # Revoked refresh token: every grant is refused; the watcher keeps trying, nothing is lost.
        issuer.refresh_valid = False
        issuer.revoke_all()
        await asyncio.to_thread(oauth_mail.kick)
        oauth_mail.deliver(message("third", "Question three, sent while access was revoked."))
        await wait_until(lambda: issuer.refused_grants >= 2, timeout=60, what="the watcher retrying the grant")
        issuer.refresh_valid = True
        await wait_replies(oauth_mail, 3, timeout=60)


async def test_smtp_sends_with_xoauth2_and_drops_a_refused_token(issuer: OAuthServer, oauth_mail: MailServer) -> None:
    config = EmailConfig(**email_settings(oauth_mail, **oauth_settings(issuer), smtp_user=None))
    raw = message("hello", "Sent with a token.", sender=AGENT).as_bytes()
    await smtp.send(config, raw, AGENT, f"alice@{DOMAIN}")
    assert oauth_mail.relay.sent and issuer.introspected == issuer.issued
    issuer.revoke_all()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await smtp.send(config, raw, AGENT, f"alice@{DOMAIN}")
    await smtp.send(config, raw, AGENT, f"alice@{DOMAIN}")  # a new token, fetched after the refusal
    assert len(issuer.issued) == 2 and len(oauth_mail.relay.sent) == 2


async def test_doctor_names_the_mechanism_and_whether_a_token_could_be_had(
    issuer: OAuthServer, oauth_mail: MailServer, mail: MailServer
) -> None:
    good = EmailConfig(**email_settings(oauth_mail, **oauth_settings(issuer)))
    assert "with XOAUTH2 (a token from" in await probe_imap(good, TriageConfig())
    oauth._CACHE.clear()
    issuer.refresh_valid = False
    with pytest.raises(ProbeFailed, match=r"no OAuth2 token: .*refresh token revoked") as refused:
        await probe_imap(good, TriageConfig())
    assert "EMAIL_OAUTH_REFRESH_TOKEN" in refused.value.fix
    not_offered = EmailConfig(**email_settings(mail, **oauth_settings(issuer)))
    with pytest.raises(ProbeFailed, match="does not offer AUTH=XOAUTH2"):
        await probe_imap(not_offered, TriageConfig())
