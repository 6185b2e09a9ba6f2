"""Files of a Slack thread: attachments downloaded into the daemon's staging area, the agent's outbox uploaded.

Downloads land in ``<data_dir>/incoming/<batch>``, a directory only the daemon writes; the engine moves
them into the workdir's inbox through its own directory handles (``bot.files``, ``bot.workdir_fs``).
The bot token is sent only to Slack's hosts, and no redirect is followed.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import SlackConfig
from bot.core import Outcome
from bot.files import safe_filename, unique_path
from bot.slack.events import SlackMessage
from bot.slack.reply import SLACK_ERRORS, Thread

log = structlog.get_logger(__name__)

DOWNLOAD_CHUNK = 64 * 1024


class FileRefused(Exception):
    """An attachment that is too large, of a refused type, or cannot be fetched; the message is the reason."""


class SlackFiles:
    """A message's attachments in (checked, then downloaded whole or not at all); a turn's files out."""

    def __init__(self, config: SlackConfig, client: AsyncWebClient, token: str, staging: Path) -> None:
        self._config, self._client, self._token, self._staging = config, client, token, staging

    async def download(self, message: SlackMessage) -> tuple[Path, ...]:
        if not message.files:
            return ()
        if len(message.files) > self._config.max_files:
            raise FileRefused(f"That is {len(message.files)} files; I take at most {self._config.max_files}.")
        for file in message.files:
            self._check(file)
        batch = self._staging / uuid.uuid4().hex
        batch.mkdir(parents=True)
        return tuple([await self._download(file, batch) for file in message.files])

    async def upload(self, thread: Thread, outcome: Outcome) -> None:
        if not outcome.files:
            return
        uploads = [{"file": str(path), "filename": path.name, "title": path.name} for path in outcome.files]
        try:
            await self._client.files_upload_v2(file_uploads=uploads, channel=thread.channel, thread_ts=thread.thread_ts)
        except SLACK_ERRORS as exc:
            log.error("slack_upload_failed", files=[p.name for p in outcome.files], error=str(exc)[:200])
            await thread.post(f":warning: I made {len(uploads)} file(s) but could not upload them ({exc}).")

    def _check(self, file: dict[str, Any]) -> None:
        name = str(file.get("name") or "file")
        mimetype = str(file.get("mimetype") or "application/octet-stream")
        if not any(mimetype.startswith(prefix) for prefix in self._config.file_types):
            raise FileRefused(f"The file {safe_filename(name)!r} is of type {mimetype}, which I don't accept.")
        size = file.get("size")
        if isinstance(size, int) and size > self._max_bytes:
            raise FileRefused(
                f"The file {safe_filename(name)!r} is {size / 1e6:.1f} MB; the limit is {self._config.max_file_mb} MB."
            )

    @property
    def _max_bytes(self) -> int:
        return int(self._config.max_file_mb * 1_000_000)

    async def _download(self, file: dict[str, Any], batch: Path) -> Path:
        name = safe_filename(str(file.get("name") or "file"))
        url = str(file.get("url_private_download") or file.get("url_private") or "")
        if not self._is_slack_url(url):
            raise FileRefused(f"The file {name!r} has no Slack download address.")
        target = unique_path(batch, name)
        session = await self._http_session()
        headers = {"Authorization": f"Bearer {self._token}"}
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise FileRefused(f"Slack did not hand over the file {name!r} (HTTP {response.status}).")
            await self._save(response, target, name)
        return target

    async def _save(self, response: aiohttp.ClientResponse, target: Path, name: str) -> None:
        written = 0
        with target.open("wb") as out:
            async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                written += len(chunk)
                if written > self._max_bytes:
                    raise FileRefused(f"The file {name!r} is larger than {self._config.max_file_mb} MB.")
                out.write(chunk)

    def _is_slack_url(self, url: str) -> bool:
        """The bot token goes only to Slack's own hosts (or the configured API host), never to a planted URL."""
        parts = urlsplit(url)
        api = urlsplit(self._client.base_url)
        if parts.scheme == api.scheme and parts.netloc == api.netloc:
            return True
        return parts.scheme == "https" and (parts.hostname or "").endswith(".slack.com")

    async def _http_session(self) -> aiohttp.ClientSession:
        if self._client.session is None:
            self._client.session = aiohttp.ClientSession()
        return self._client.session
