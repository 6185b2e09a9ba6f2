"""A job's run history reads what earlier versions stored, and writes it back unchanged."""

from __future__ import annotations

import json

from bot.jobs import JobRun, JobStatus

# As the daemon stored one history entry before statuses had a type.
STORED = (
    '{"job_id": "digest", "fire_time": "2026-12-01T08:00:00+00:00", "started_at": 1.5, "ended_at": 2.5,'
    ' "status": "skipped", "cost_usd": 0.0, "delivered_to": "", "conversation_id": "", "error": "busy"}'
)


def test_a_stored_run_reads_and_writes_back_unchanged() -> None:
    run = JobRun.from_json(json.loads(STORED))
    assert run.status is JobStatus.SKIPPED
    assert json.dumps(run.to_json()) == STORED


def test_every_status_keeps_its_stored_value() -> None:
    assert {str(status) for status in JobStatus} == {"running", "ok", "failed", "skipped", "cancelled"}
