"""Runs ``agentd run`` as a real subprocess, the way an operator does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.fakes.redis_server import free_port

SECRETS = {
    "AGENTD_API_TOKEN": "tok-daemon-api-0001",
    "SLACK_BOT_TOKEN": "xoxb-slack-leak-0002",
    "SLACK_APP_TOKEN": "xapp-slack-leak-0003",
    "SLACK_SIGNING_SECRET": "slack-signing-leak-0006",
    "IMAP_PASSWORD": "imap-leak-0004",
    "SMTP_PASSWORD": "smtp-leak-0005",
}


class DaemonProcess:
    def __init__(self, tmp: Path, model_url: str, extra_env: dict[str, str] | None = None, toml: str = "") -> None:
        self.port = free_port()
        self.config = tmp / "agentd.toml"
        self.config.write_text(
            f'[http]\nlisten = "127.0.0.1:{self.port}"\n[store]\ndata_dir = "{tmp / "data"}"\n'
            f'[pool]\nprewarm = 0\n[agent]\nmodel = "claude-sonnet-4-5"\n{toml}'
        )
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": model_url,
            "ANTHROPIC_API_KEY": "sk-test-anthropic-key",
            # Slack is on (the tokens above): keep its connection attempts on this machine.
            "SLACK_API_URL": "http://127.0.0.1:9/api/",
            **SECRETS,
            **(extra_env or {}),
        }
        self.log = tmp / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {SECRETS['AGENTD_API_TOKEN']}"}

    async def start(self, timeout: float = 30) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "--config", str(self.config), "run"],
                env=self.env,
                stdout=log,
                stderr=log,
                cwd=Path(__file__).parent.parent,
            )
        async with aiohttp.ClientSession() as http:
            for _ in range(int(timeout / 0.05)):
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError("daemon did not become healthy")

    async def ask(self, conversation: str, text: str) -> dict[str, object]:
        async with (
            aiohttp.ClientSession(headers=self.headers) as http,
            http.post(f"{self.url}/v1/conversations/{conversation}/messages", json={"text": text}) as response,
        ):
            return dict(await response.json())

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return await asyncio.to_thread(self.process.wait, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
