"""Runs ``agentd run`` as a real subprocess, the way an operator does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil

from tests.fakes.redis_server import free_port
from tests.support import paths

SECRETS = {
    "AGENTD_API_TOKEN": "tok-daemon-api-0001",
    "SLACK_BOT_TOKEN": "xoxb-slack-leak-0002",
    "SLACK_APP_TOKEN": "xapp-slack-leak-0003",
    "SLACK_SIGNING_SECRET": "slack-signing-leak-0006",
    "IMAP_PASSWORD": "imap-leak-0004",
    "SMTP_PASSWORD": "smtp-leak-0005",
}


# Every daemon a test started; conftest kills what is left of them after each test.
STARTED: list[DaemonProcess] = []


class DaemonProcess:
    def __init__(
        self,
        tmp: Path,
        model_url: str,
        extra_env: dict[str, str] | None = None,
        toml: str = "",
        http_toml: str = "",
        module: str = "bot.app.cli",
    ) -> None:
        self.port = free_port()
        self.config = tmp / "agentd.toml"
        self.data_dir = (tmp / "data").resolve()
        self.module = module
        self.config.write_text(
            f'[http]\nlisten = "127.0.0.1:{self.port}"\n{http_toml}\n[store]\ndata_dir = "{self.data_dir}"\n'
            f'[pool]\nprewarm = 0\n[agent]\nmodel = "claude-sonnet-4-5"\n{toml}'
            # With Redis, a SIGKILLed daemon's replica name stays held for the lease TTL: keep the next start quick.
            + ("" if "[cluster]" in toml else "\n[cluster]\nlease_ttl_s = 2\n")
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
                [sys.executable, "-m", self.module, "--config", str(self.config), "run"],
                env=self.env,
                stdout=log,
                stderr=log,
                cwd=paths.ROOT,
            )
        STARTED.append(self)
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
        """SIGKILL the daemon and every process it started, as a container runtime does.

        The tree is captured before the kill: afterwards the CLI processes are orphans of init.
        Processes working in this daemon's data dir are included, so the CLI processes of a daemon
        that already died (``email.debug_crash_at``) are caught too.
        """
        if self.process is None:
            return
        doomed = [*self._descendants(), *self.orphans()]
        if self.process.poll() is None:
            self.process.kill()
        for proc in doomed:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.process.wait(10)
        psutil.wait_procs(doomed, timeout=10)

    def _descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        if self.process.poll() is not None:
            return []  # reaped: its pid may belong to someone else by now
        try:
            return list(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def orphans(self) -> list[psutil.Process]:
        """Live processes whose working directory is inside this daemon's data dir (its CLI processes)."""
        found = []
        for proc in psutil.process_iter(["cwd"]):
            cwd = proc.info["cwd"]
            if cwd is not None and Path(cwd).is_relative_to(self.data_dir) and proc.pid != os.getpid():
                found.append(proc)
        return found
