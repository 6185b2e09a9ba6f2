"""A real mail server for tests: Dovecot (IMAP + LMTP) in a temp dir, and an aiosmtpd hop that delivers over LMTP.

Users ``agent`` (the inbox agentd watches), ``alice``, ``bob`` and ``eve`` (people) exist, all with
password ``secret``.  Whatever is sent through the SMTP hop is delivered to the
recipients' mailboxes and also kept in ``sent`` for inspection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import email.utils
import grp
import imaplib
import os
import pwd
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.fakes.oauth import OAuthServer
from tests.fakes.redis_server import free_port

DOMAIN = "example.test"
PASSWORD = "secret"
USERS = ("agent", "alice", "bob", "eve")

CONFIG = """
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_username_format = %Ln
mail_location = maildir:{root}/mail/%u/Maildir
mail_uid = {uid}
mail_gid = {gid}
default_internal_user = {user}
default_login_user = {login_user}
default_internal_group = {group}
imap_idle_notify_interval = 1 secs
{oauth_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Ln {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
  }}
}}
service anvil {{
  chroot =
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


# Dovecot asks the token's issuer whether it is active (RFC 7662) and whose it is.
OAUTH_PASSDB = """passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf
}}
"""
OAUTH_CONF = """introspection_mode = post
introspection_url = {url}/introspect
username_attribute = username
active_attribute = active
active_value = true
"""


class Relay:
    """aiosmtpd handler: keep a copy, then deliver to Dovecot over LMTP."""

    def __init__(self, lmtp_socket: Path) -> None:
        self.lmtp_socket = lmtp_socket
        self.sent: list[tuple[list[str], bytes]] = []
        self.refused: set[str] = set()  # recipients refused at RCPT TO with 550, as an MTA refuses unknown users

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.refused:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        recipients = list(envelope.rcpt_tos)
        self.sent.append((recipients, raw))
        try:
            await asyncio.to_thread(self._deliver, str(envelope.mail_from), recipients, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return f"{code} {text.decode(errors='replace')}"
        return "250 OK"

    def _deliver(self, sender: str, recipients: list[str], raw: bytes) -> None:
        with smtplib.LMTP(str(self.lmtp_socket)) as lmtp:
            lmtp.sendmail(sender, recipients, raw)


class OAuthRelay(Relay):
    """The SMTP hop, taking XOAUTH2 with tokens the issuer still calls active."""

    def __init__(self, lmtp_socket: Path, active: Callable[[str], bool]) -> None:
        super().__init__(lmtp_socket)
        self.active = active

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        fields = dict(part.split("=", 1) for part in base64.b64decode(args[1]).decode().split("\x01") if "=" in part)
        token = fields.get("auth", "").removeprefix("Bearer ")
        return AuthResult(success=self.active(token), handled=False, auth_data=fields.get("user"))


class MailServer:
    def __init__(self, tls: bool = False, oauth: OAuthServer | None = None) -> None:
        # IMAP (Dovecot's oauth2 passdb) and the SMTP hop also take XOAUTH2 tokens this issuer calls active.
        self.oauth_url = oauth.url if oauth is not None else None
        # Dovecot's unprivileged processes must reach their sockets: a world-traversable dir of our own.
        self.root = Path(tempfile.mkdtemp(prefix="agentd-mail-"))
        self.root.chmod(0o755)
        self.imap_port = free_port()
        self.smtp_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        lmtp = self.root / "run" / "lmtp"
        self.relay = Relay(lmtp) if oauth is None else OAuthRelay(lmtp, oauth.active)
        self.tls = tls
        self.imaps_port = free_port() if tls else 0
        self.cert = self.root / "cert.pem"
        self._smtp: Controller | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._write_config()
        self._start_dovecot()
        # With TLS the hop offers STARTTLS (not required, so the tests' own plain submissions still work).
        tls: dict[str, Any] = {"tls_context": self._server_context()} if self.tls else {}
        if self.oauth_url is not None:
            tls["auth_require_tls"] = False
        self._smtp = Controller(self.relay, hostname="127.0.0.1", port=self.smtp_port, data_size_limit=64 << 20, **tls)
        self._smtp.start()

    def stop(self) -> None:
        if self._smtp is not None:
            self._smtp.stop()
            self._smtp = None
        self._stop_dovecot()
        shutil.rmtree(self.root, ignore_errors=True)

    def kick(self, user: str = "agent") -> None:
        """Disconnect every IMAP session of ``user``, as a server restart or failover does."""
        subprocess.run(
            ["doveadm", "-c", str(self.root / "dovecot.conf"), "kick", user], check=True, capture_output=True
        )

    def restart_dovecot(self) -> None:
        self._stop_dovecot()
        self._start_dovecot()

    def _write_config(self) -> None:
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in USERS))
        ids = _service_users()
        os.chown(self.root / "mail", int(ids["uid"]), int(ids["gid"]))
        ssl_settings = "ssl = no"
        if self.tls:
            self._make_certificate()
            ssl_settings = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.root / 'key.pem'}"
        mechanisms, oauth_passdb = "plain login", ""
        if self.oauth_url is not None:
            mechanisms, oauth_passdb = "plain login xoauth2 oauthbearer", OAUTH_PASSDB.format(root=self.root)
            (self.root / "oauth2.conf").write_text(OAUTH_CONF.format(url=self.oauth_url))
        text = CONFIG.format(
            root=self.root,
            imap_port=self.imap_port,
            imaps_port=self.imaps_port,
            ssl=ssl_settings,
            mechanisms=mechanisms,
            oauth_passdb=oauth_passdb,
            **ids,
        )
        (self.root / "dovecot.conf").write_text(text)

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1; tests trust it through ``email.tls_ca_file``."""
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(self.root / "key.pem"),
                "-out",
                str(self.cert),
            ],
            check=True,
            capture_output=True,
        )
        (self.root / "key.pem").chmod(0o644)

    def _server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.root / "key.pem")
        return context

    def _start_dovecot(self) -> None:
        self.process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.root / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.log()[-2000:]}")
            with contextlib.suppress(OSError, imaplib.IMAP4.error), imaplib.IMAP4("127.0.0.1", self.imap_port) as probe:
                probe.logout()
                return
            time.sleep(0.05)
        raise TimeoutError("dovecot did not accept connections")

    def _stop_dovecot(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- mail --------------------------------------------------------------------

    def deliver(self, raw: bytes | EmailMessage, to: str = f"agent@{DOMAIN}", sender: str = f"alice@{DOMAIN}") -> None:
        """Send through the SMTP hop, as a person's mail client would."""
        # CRLF line ends: the SMTP hop reads lines up to CRLF, and a bare LF body is one over-long line.
        data = raw.as_bytes(policy=email.policy.SMTP) if isinstance(raw, EmailMessage) else raw
        with smtplib.SMTP("127.0.0.1", self.smtp_port) as smtp:
            smtp.sendmail(sender, [to], data)

    def mailbox(self, user: str = "alice", folder: str = "INBOX") -> list[EmailMessage]:
        """Every message in a user's folder, oldest first (read with the stdlib IMAP client)."""
        with imaplib.IMAP4("127.0.0.1", self.imap_port) as imap:
            imap.login(user, PASSWORD)
            status, _ = imap.select(folder, readonly=True)
            if status != "OK":
                return []
            _, data = imap.uid("SEARCH", "ALL")
            messages = []
            for uid in data[0].split():
                _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[])")
                raw = next(part[1] for part in fetched if isinstance(part, tuple))
                messages.append(email.message_from_bytes(raw, policy=email.policy.default))
            return messages  # type: ignore[return-value]

    def flags(self, user: str = "agent", folder: str = "INBOX") -> list[str]:
        with imaplib.IMAP4("127.0.0.1", self.imap_port) as imap:
            imap.login(user, PASSWORD)
            imap.select(folder, readonly=True)
            _, data = imap.fetch("1:*", "(FLAGS)")
            return [d.decode() for d in data if isinstance(d, bytes)]

    def wipe_mailbox(self, user: str = "agent") -> None:
        """Remove the Maildir: Dovecot recreates it with a new UIDVALIDITY."""
        shutil.rmtree(self.root / "mail" / user, ignore_errors=True)


def _service_users() -> dict[str, str]:
    """Dovecot's login and internal processes refuse to run as root: use the package's users then."""
    if os.getuid() == 0:
        # ... and Dovecot refuses uid 0 for mail: mailboxes belong to "nobody".
        nobody = pwd.getpwnam("nobody")
        ids = {"uid": str(nobody.pw_uid), "gid": str(nobody.pw_gid)}
        return {"user": "dovecot", "login_user": "dovenull", "group": "dovecot", **ids}
    me = pwd.getpwuid(os.getuid()).pw_name
    ids = {"uid": str(os.getuid()), "gid": str(os.getgid())}
    return {"user": me, "login_user": me, "group": grp.getgrgid(os.getgid()).gr_name, **ids}


def message(subject: str, body: str, sender: str = f"alice@{DOMAIN}", **headers: Any) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"agent@{DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = headers.pop("message_id", None) or email.utils.make_msgid(domain=DOMAIN)
    msg["Date"] = email.utils.formatdate()
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg
