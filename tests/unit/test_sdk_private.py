"""The two places bot/agent reaches into claude-agent-sdk's private names still find what they rely on.

Each failure names the installed SDK version: an upgrade that moves or renames one of them must
fail here, loudly, not leave the pool without a pid or a fresh host without its transcripts.
"""

from __future__ import annotations

import inspect
import json
import uuid
from pathlib import Path

import psutil
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, InMemorySessionStore, project_key_for_directory
from claude_agent_sdk import __version__ as sdk_version
from claude_agent_sdk._internal import session_resume
from claude_agent_sdk._internal.transport.subprocess_cli import SubprocessCLITransport

from bot.agent.session import cli_pid

SDK = f"claude-agent-sdk {sdk_version}"


class _Connected(Exception):
    """Stops the client's connect once its transport has spawned the process (no handshake follows)."""


async def test_the_cli_pid_is_the_transports_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in CLI that lives until its stdin closes: the transport spawns it as it would the real one.
    cli = tmp_path / "cli"
    cli.write_text("#!/bin/sh\nexec cat >/dev/null\n")
    cli.chmod(0o755)
    client = ClaudeSDKClient(ClaudeAgentOptions(cli_path=cli, cwd=tmp_path))
    assert cli_pid(client) is None, f"{SDK}: a client not yet connected has a pid"
    seen: dict[str, object] = {}
    spawn = SubprocessCLITransport.connect
    before = {child.pid for child in psutil.Process().children()}

    async def spawn_then_stop(transport: SubprocessCLITransport) -> None:
        await spawn(transport)
        children = [child.pid for child in psutil.Process().children() if child.pid not in before]
        seen.update(pid=cli_pid(client), children=children)
        await transport.close()
        raise _Connected

    monkeypatch.setattr(SubprocessCLITransport, "connect", spawn_then_stop)
    with pytest.raises(_Connected):
        await client.connect()
    children = seen["children"]
    assert isinstance(children, list) and len(children) == 1, f"{SDK}: the transport spawned {children}"
    assert seen["pid"] == children[0], (
        f"{SDK}: ClaudeSDKClient._transport._process.pid no longer names the CLI's process "
        "(bot/agent/session.py cli_pid reads these private names)"
    )


async def test_materialize_resume_session_brings_a_stored_transcript_to_disk(tmp_path: Path) -> None:
    fn = getattr(session_resume, "materialize_resume_session", None)
    assert fn is not None, f"{SDK}: claude_agent_sdk._internal.session_resume.materialize_resume_session is gone"
    assert list(inspect.signature(fn).parameters) == ["options"], f"{SDK}: its signature changed: {fn.__doc__}"
    store, session_id = InMemorySessionStore(), str(uuid.uuid4())
    entry = {"type": "user", "uuid": str(uuid.uuid4()), "session_id": session_id, "message": {"content": "hi"}}
    project = project_key_for_directory(tmp_path)
    await store.append({"project_key": project, "session_id": session_id}, [entry])
    # As bot/agent/transcripts.py Transcripts.restore calls it.
    options = ClaudeAgentOptions(
        cwd=tmp_path, resume=session_id, session_store=store, env={"CLAUDE_CONFIG_DIR": str(tmp_path / "claude")}
    )
    materialized = await fn(options)
    assert materialized is not None, f"{SDK}: a stored session was not materialized"
    written = materialized.config_dir / "projects" / project / f"{session_id}.jsonl"
    assert written.is_file(), f"{SDK}: the transcript is no longer written under config_dir/projects/<project>/"
    assert json.loads(written.read_text().splitlines()[0])["uuid"] == entry["uuid"], f"{SDK}: other entries"
    await materialized.cleanup()
    assert not materialized.config_dir.exists(), f"{SDK}: cleanup() left the temp dir"


async def test_materialize_resume_session_wraps_a_failed_load_in_runtime_error(tmp_path: Path) -> None:
    class Broken(InMemorySessionStore):
        async def load(self, key: object) -> None:
            raise ConnectionError("redis is down")

    options = ClaudeAgentOptions(cwd=tmp_path, resume=str(uuid.uuid4()), session_store=Broken())
    # Transcripts.restore turns RuntimeError (and only it) into StoreError.
    with pytest.raises(RuntimeError):
        await session_resume.materialize_resume_session(options)


async def test_nothing_stored_materializes_nothing(tmp_path: Path) -> None:
    options = ClaudeAgentOptions(cwd=tmp_path, resume=str(uuid.uuid4()), session_store=InMemorySessionStore())
    assert await session_resume.materialize_resume_session(options) is None, f"{SDK}: an empty store materialized"
