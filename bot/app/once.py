"""``agentd once``: one task on a fresh CLI process, with the daemon's isolation, gateway and budgets.

The same services as ``agentd run``, built by ``wiring`` (store, ledger, gateway, launcher), and its
process-tree sweep, without the pool: nothing is kept warm. The process, its sandbox helpers and the
gateway are gone when ``run_once`` returns; a temp workdir (no ``--cwd``) and the session's Claude
state are removed.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from bot import procs, workdir_fs
from bot.agent import ClaudeLauncher
from bot.app import wiring
from bot.app.shutdown import Cleanups
from bot.config import ConfigError, Settings
from bot.core import (
    AgentCrashed,
    AgentError,
    AgentSession,
    Failure,
    Outcome,
    SessionSpec,
    TurnContext,
    TurnDone,
)
from bot.pool.turn import drive, failure_detail, failure_of
from bot.telemetry import Telemetry

log = structlog.get_logger(__name__)

CHANNEL = "once"


@dataclass(frozen=True)
class OnceResult:
    """What ``--output json`` prints."""

    outcome: str  # "ok" or a ``Failure`` value
    result: str
    session_id: str | None
    cost_usd: float
    turns: int  # model round trips of this task
    duration_s: float
    workdir: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class _Failed:
    """No result: the process could not start, crashed or ran out of time."""

    failure: Failure
    detail: str


@dataclass(frozen=True)
class OnceRequest:
    profile: str
    prompt: str
    cwd: Path | None = None


def workdir_for(request: OnceRequest, data_dir: Path, name: str) -> tuple[Path, bool]:
    """The agent's workdir, and whether it is a temp one to remove afterwards."""
    if request.cwd is None:
        return data_dir / "work" / name, True
    cwd = request.cwd.expanduser().resolve()
    if not cwd.is_dir():
        raise ConfigError(f"--cwd {request.cwd}: not an existing directory")
    if cwd.is_relative_to(data_dir) or data_dir.is_relative_to(cwd):
        # data_dir holds every conversation's state and the store: it is never anyone's workdir.
        raise ConfigError(f"--cwd {request.cwd}: may not be inside data_dir ({data_dir}) or contain it")
    return cwd, False


async def run_once(settings: Settings, request: OnceRequest) -> OnceResult:
    try:
        profile = settings.profile(request.profile)
    except KeyError:
        raise ConfigError(f"--profile: no profile named {request.profile!r}") from None
    # Helpers the CLI leaves behind (the sandbox's socat) re-parent to us, so the sweep can reap them.
    procs.become_subreaper()
    data_dir = settings.store.data_dir.resolve()
    name = f"once-{uuid.uuid4().hex[:12]}"
    workdir, temporary = workdir_for(request, data_dir, name)
    spec = SessionSpec(
        conversation_id=f"{CHANNEL}:{name}",
        workdir=workdir,
        config_dir=data_dir / "state" / name / "claude",
        data_dir=data_dir,
        session_id=str(uuid.uuid4()),
        resume=False,
        profile=profile,
    )
    started = time.monotonic()
    try:
        async with _services(settings) as (launcher, telemetry):
            started_ns = time.time_ns()
            done = await _one_turn(launcher, spec, request.prompt, settings.agent.turn_timeout_s)
            outcome = _outcome(spec, done)
            telemetry.record_turn(outcome, profile.name, CHANNEL, started_ns)
    finally:
        shutil.rmtree(spec.config_dir.parent, ignore_errors=True)
        if temporary:
            _remove_workdir(workdir)
    return _result(outcome, done, workdir, time.monotonic() - started)


@asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[tuple[ClaudeLauncher, Telemetry]]:
    """The daemon's services (``wiring``) without the transcript mirror, closed in reverse order on leaving."""
    async with AsyncExitStack() as stack:
        # Unbounded cleanups: a signal cancels `once` (the CLI's handlers), and no shutdown deadline applies.
        services = await wiring.open_services(settings, Cleanups(stack), mirror=False, own_gateway_port=True)
        yield services.launcher, services.telemetry


async def _one_turn(launcher: ClaudeLauncher, spec: SessionSpec, prompt: str, timeout_s: float) -> TurnDone | _Failed:
    """The turn's result, or why there is none; the CLI's whole process tree is gone on return."""
    tree = procs.ProcessTree()
    try:
        async with launcher.open(spec) as session:
            try:
                async with asyncio.timeout(timeout_s):
                    return await _drive(session, tree, prompt, spec.conversation_id)
            except TimeoutError:
                return _Failed(Failure.TIMEOUT, f"the task ran longer than agent.turn_timeout_s ({timeout_s:g} s)")
            finally:
                if session.pid is not None:
                    tree.remember(session.pid)
    except AgentCrashed as exc:
        return _Failed(Failure.CRASHED, str(exc)[:300])
    except AgentError as exc:
        return _Failed(Failure.AGENT_ERROR, str(exc)[:300])
    finally:
        await tree.sweep()


async def _drive(session: AgentSession, tree: procs.ProcessTree, prompt: str, conversation_id: str) -> TurnDone:
    def remember(_text: str = "") -> None:
        if session.pid is not None:
            tree.remember(session.pid)  # the sandbox helper starts with the first Bash call

    remember()
    return await drive(session, prompt, TurnContext(conversation_id, user=CHANNEL, channel=CHANNEL), remember)


def _outcome(spec: SessionSpec, done: TurnDone | _Failed) -> Outcome:
    if isinstance(done, _Failed):
        return Outcome(spec.conversation_id, "", None, 0.0, 0, failure=done.failure, error=done.detail)
    failure = failure_of(done)
    cost = done.metered_usd if done.metered_usd is not None else done.total_cost_usd
    error = None if failure is None else failure_detail(done)
    return Outcome(spec.conversation_id, done.reply, done.session_id, cost, 1, failure=failure, error=error)


def _remove_workdir(workdir: Path) -> None:
    """The temp workdir goes, and nothing its links point to (``workdir_fs.remove_tree``)."""
    try:
        workdir_fs.remove_tree(workdir)
    except OSError as exc:
        log.warning("workdir_not_removed", workdir=str(workdir), error=str(exc)[:200])


def _result(outcome: Outcome, done: TurnDone | _Failed, workdir: Path, seconds: float) -> OnceResult:
    return OnceResult(
        outcome=str(outcome.failure or "ok"),
        result=outcome.reply,
        session_id=outcome.session_id,
        cost_usd=round(outcome.cost_usd, 6),
        turns=done.num_turns if isinstance(done, TurnDone) else 0,
        duration_s=round(seconds, 3),
        workdir=str(workdir),
        error=outcome.error,
    )
