"""The email channel.  The only package that imports IMAP, SMTP and mail-parsing libraries."""

from bot.mail.channel import EmailChannel

__all__ = ["EmailChannel"]
