"""The fake model in a process of its own, as a real upstream is: ``python -m tests.fakes.model_process``.

Prints its URL on the first line of stdout, then serves until stdin closes. Its one optional argument
is a JSON object of tool rules: a trigger text, and the tool call (name and input) it answers with.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from tests.fakes.model import FakeModel, ToolUse


async def serve(tools: dict[str, dict[str, Any]]) -> None:
    model = FakeModel()
    for trigger, call in tools.items():
        model.add(trigger, tool=ToolUse(call["name"], call["input"]))
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
    def start(cls, tools: dict[str, dict[str, Any]] | None = None) -> ModelProcess:
        """``tools``: trigger text -> ``{"name": ..., "input": {...}}``, the tool call that text gets."""
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.model_process", json.dumps(tools or {})],
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
    asyncio.run(serve(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
