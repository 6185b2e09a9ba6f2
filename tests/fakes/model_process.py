"""The fake model in a process of its own, as a real upstream is: ``python -m tests.fakes.model_process``.

Prints its URL on the first line of stdout, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass

from tests.fakes.model import FakeModel


async def serve() -> None:
    model = FakeModel()
    await model.start()
    print(model.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await model.stop()


@dataclass
class ModelProcess:
    """A handle with the ``url`` that settings helpers read from a FakeModel."""

    url: str
    process: subprocess.Popen[str]

    @classmethod
    def start(cls) -> ModelProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.model_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return cls(process.stdout.readline().strip(), process)

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(serve())
