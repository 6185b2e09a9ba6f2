"""The agent's Bash starts clean: no startup file of the daemon's home is read, so no denial precedes the output."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.model import FakeModel, ToolUse
from tests.integration.agent.test_reach import needs_sandbox
from tests.support.daemon_proc import DaemonProcess

STARTUP_FILES = (".bashrc", ".bash_profile", ".bash_login", ".profile")


@needs_sandbox
async def test_echo_through_the_sandbox_returns_exactly_its_output(tmp_path: Path, fake_model: FakeModel) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # The sandbox denies reads of home's dotfiles: a shell that tries one prints "Permission denied".
    for name in STARTUP_FILES:
        (home / name).write_text(f"touch {tmp_path / ('ran' + name)}\n")
    daemon = DaemonProcess(
        tmp_path, fake_model.url, extra_env={"HOME": str(home)}, toml='sandbox = true\nallowed_tools = ["Bash"]\n'
    )
    fake_model.add("run echo", tool=ToolUse("Bash", {"command": "echo hi", "description": "say hi"}), once=True)
    await daemon.start()
    try:
        body = await daemon.ask("a", "run echo")
        assert "error" not in body, body
        # What the command printed, then only the CLI's own note (remaining tokens) that follows every result.
        output, _, _note = fake_model.tool_results().partition("\n\n<system-reminder>")
        assert output == "hi", fake_model.tool_results()
    finally:
        daemon.kill()
