"""The mail outcome and outbox records read what earlier versions stored, and write it back unchanged."""

from __future__ import annotations

import json

from bot.mail.outbox import MailStatus, OutboxEntry, OutcomeRecord, SendState

# As the daemon stored them before the records had types (field order included).
STORED_OUTCOME = '{"status": "refused", "reason": "not on the allowlist", "conversation": null, "uid": 7, "body": "ab"}'
STORED_OUTBOX = '{"state": "sending", "status": "failed_replied", "reason": "timeout", "to": "a@x.test", "raw": "UkFX"}'


def test_stored_records_read_and_write_back_unchanged() -> None:
    outcome = OutcomeRecord.from_json(STORED_OUTCOME)
    entry = OutboxEntry.from_json(STORED_OUTBOX)
    assert outcome.status is MailStatus.REFUSED and outcome.uid == 7
    assert entry.state is SendState.SENDING and entry.status is MailStatus.FAILED_REPLIED
    assert outcome.to_json() == STORED_OUTCOME and entry.to_json() == STORED_OUTBOX


def test_an_outcome_without_status_or_body_still_reads() -> None:
    # Records from before the body digest; a status this version does not know marks like any other.
    for raw in ('{"status": "replied"}', "{}", '{"status": "from_the_future"}'):
        record = OutcomeRecord.from_json(raw)
        assert record.body is None
        assert record.status in (MailStatus.REPLIED, None)


def test_every_status_keeps_its_stored_value() -> None:
    stored = {
        "replied",
        "failed_replied",
        "failed",
        "undeliverable",
        "reply_cap",
        "oversized",
        "ignored",
        "refused",
        "rate_limited",
        "unreadable",
    }
    assert {str(status) for status in MailStatus} == stored
    assert json.dumps(MailStatus.RATE_LIMITED) == '"rate_limited"'
