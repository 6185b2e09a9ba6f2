"""Environment allowlisting and safe names: what untrusted input may never shape."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, MutableMapping

# Variables the daemon (and so the agent it spawns) may keep. Everything else,
# tokens included, is dropped from the process environment once the config has
# been read: the SDK merges os.environ under ClaudeAgentOptions.env, so the
# only sure way to keep secrets from the CLI is for the daemon not to hold them.
INHERITABLE = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
_LOCALE = re.compile(r"^LC_[A-Z]+$")
_UNSAFE = re.compile(r"[^a-z0-9]+")


def is_inheritable(name: str, extra: Iterable[str] = ()) -> bool:
    return name in INHERITABLE or bool(_LOCALE.match(name)) or name in set(extra)


def scrub_environ(environ: MutableMapping[str, str], extra: Iterable[str] = ()) -> list[str]:
    """Drop every variable not on the allowlist; return the dropped names (never values)."""
    keep = set(extra)
    dropped = sorted(n for n in environ if not is_inheritable(n, keep))
    for name in dropped:
        del environ[name]
    return dropped


def safe_name(key: str, length: int = 40) -> str:
    """A filesystem-safe, collision-resistant name for an untrusted key."""
    slug = _UNSAFE.sub("-", key.lower()).strip("-")[:length] or "x"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{slug}-{digest}"
