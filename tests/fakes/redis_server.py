"""A real redis-server on a free loopback port, restartable under a running client."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, password: str = "s3cret-redis-pw", extra_args: tuple[str, ...] = ()) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory, self.password, self.port = directory, password, free_port()
        self.extra_args = extra_args  # more redis-server options, e.g. ("--rename-command", "EXPIRE", "")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                self.password,
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until(accepting=True)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
        self._wait_until(accepting=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_until(self, accepting: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                if accepting:
                    return
                time.sleep(0.02)
                continue
            if not accepting:
                return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not {'start' if accepting else 'stop'}")
