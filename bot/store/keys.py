"""Every Redis key name and TTL agentd uses, in one place."""

from __future__ import annotations

from urllib.parse import quote

PREFIX = "agentd"
CONVERSATION_INDEX = f"{PREFIX}:conversations"
DAY_S = 86_400


def conversation(conversation_id: str) -> str:
    return f"{PREFIX}:conv:{conversation_id}"


def conversation_ttl_s(days: int) -> int:
    """Records expire this long after the conversation was last written."""
    return days * DAY_S


# -- Slack -------------------------------------------------------------------
# A Slack event is claimed once by event_id (retries) and once by message
# identity (a mention arrives both as app_mention and as message).
# ``team`` is always the installation's team, never the sender's (Slack Connect).
SLACK_EVENT_TTL_S = DAY_S


def slack_event(event_id: str) -> str:
    return f"{PREFIX}:slack:event:{event_id}"


def slack_message(team: str, channel: str, ts: str) -> str:
    return f"{PREFIX}:slack:msg:{team}:{channel}:{ts}"


def slack_thread(team: str, channel: str, thread_ts: str) -> str:
    """Set while the agent takes part in a thread, so follow-ups need no mention."""
    return f"{PREFIX}:slack:thread:{team}:{channel}:{thread_ts}"


# -- Slack assistant threads (the AI-app surface) -------------------------------
# Feedback is kept for a year, whatever the conversation's TTL, so it can be reviewed later.
SLACK_FEEDBACK_TTL_S = 365 * DAY_S


def slack_assistant_thread(channel: str, thread_ts: str) -> str:
    """JSON: the channel an assistant thread's person is viewing ({}: unknown); set by Slack's assistant events."""
    return f"{PREFIX}:slack:assistant:{channel}:{thread_ts}"


def slack_assistant_turns(channel: str, thread_ts: str) -> str:
    """JSON {told, titled}: the context the agent was last given, and whether the thread has its title."""
    return f"{PREFIX}:slack:assistant-turns:{channel}:{thread_ts}"


def slack_feedback_target(channel: str, ts: str) -> str:
    """JSON {conversation, session_id, turn, answered}: the turn a message with feedback buttons rates."""
    return f"{PREFIX}:slack:feedback-target:{channel}:{ts}"


def slack_feedback(channel: str, ts: str, user: str) -> str:
    """JSON {conversation, message_ts, user, value, ...}: one person's 👍/👎 on one answer (the last click wins)."""
    return f"{PREFIX}:slack:feedback:{channel}:{ts}:{user}"


SLACK_FEEDBACK_PREFIX = f"{PREFIX}:slack:feedback:"


# -- Email -------------------------------------------------------------------
# Per-message records outlive any retry or rescan of the mailbox.
MAIL_RECORD_TTL_S = 180 * DAY_S
MAIL_RATE_WINDOW_S = 3600


def mail_checkpoint(mailbox: str) -> str:
    """JSON {uidvalidity, last_uid} of the last message taken from ``mailbox``."""
    return f"{PREFIX}:mail:checkpoint:{mailbox}"


def mail_outcome(message_id: str) -> str:
    """JSON {status, conversation, reason}: what became of one inbound message; written once."""
    return f"{PREFIX}:mail:outcome:{message_id}"


def mail_outbox(message_id: str) -> str:
    """JSON {state, raw}: the reply to one inbound message, written before it is sent."""
    return f"{PREFIX}:mail:outbox:{message_id}"


def mail_thread(message_id: str) -> str:
    """The conversation a Message-ID (received or sent) belongs to."""
    return f"{PREFIX}:mail:thread:{message_id}"


def mail_sender_rate(sender: str) -> str:
    return f"{PREFIX}:mail:rate:{sender}"


def mail_domain_rate(domain: str) -> str:
    return f"{PREFIX}:mail:rate-domain:{domain.lower()}"


def mail_thread_replies(conversation_id: str) -> str:
    return f"{PREFIX}:mail:replies:{conversation_id}"


def mail_participants(conversation_id: str) -> str:
    """JSON list of the addresses that may continue an email conversation: its root's From, To and Cc,
    and whoever the agent answered in it.  Anyone else referencing the thread starts a conversation of their own."""
    return f"{PREFIX}:mail:participants:{conversation_id}"


# -- Schedules ---------------------------------------------------------------
# One claim per (job, scheduled time): two replicas on one Redis run each occurrence once.
JOB_FIRE_TTL_S = 7 * DAY_S
JOB_STATE_TTL_S = 365 * DAY_S


def job_fire(job_id: str, fire_time: str) -> str:
    return f"{PREFIX}:job:fire:{job_id}:{fire_time}"


def job_running(job_id: str) -> str:
    """Set while a run of the job is in progress on any replica (``overlap = "skip"``)."""
    return f"{PREFIX}:job:running:{job_id}"


def job_paused(job_id: str) -> str:
    return f"{PREFIX}:job:paused:{job_id}"


def job_failures(job_id: str) -> str:
    """Consecutive failed runs; cleared by a good run or a resume."""
    return f"{PREFIX}:job:failures:{job_id}"


def job_runs(job_id: str) -> str:
    """JSON list of the newest runs, newest first, at most ``keep_runs``."""
    return f"{PREFIX}:job:runs:{job_id}"


# -- Model usage (the gateway's ledger) ----------------------------------------
# Cost counters per UTC day and dimension (conversation, user, profile, channel, global); the budgets
# read the same counters, so every replica on one Redis sees one total.
USAGE_TTL_S = 400 * DAY_S


def usage(day: str, dimension: str, value: str) -> str:
    """USD spent on ``day`` (YYYY-MM-DD, UTC) by one ``dimension`` value."""
    return f"{PREFIX}:usage:{day}:{dimension}:{value}"


def usage_prefix(day: str = "") -> str:
    return f"{PREFIX}:usage:{day}:" if day else f"{PREFIX}:usage:"


# -- Transcripts (the SessionStore mirror) --------------------------------------
# One session's keys share one hash tag, ``{<project>/<session>}``, so a Redis Cluster keeps them in one
# slot and an append is one transaction.  The parts are percent-encoded: a brace or a slash in a name
# cannot move the tag or make two sessions collide.  Each project's session index has its own tag.


def transcript_ttl_s(days: int) -> int:
    """A transcript expires this long after its last append (every append renews it)."""
    return days * DAY_S


def _quoted(part: str) -> str:
    return quote(part, safe="")


def _transcript(project_key: str, session_id: str) -> str:
    return f"{PREFIX}:tx:{{{_quoted(project_key)}/{_quoted(session_id)}}}"


def transcript_entries(project_key: str, session_id: str, subpath: str | None = None) -> str:
    """A list of JSON entries, in append order (the main transcript, or one subagent's)."""
    suffix = f":{_quoted(subpath)}" if subpath else ""
    return f"{_transcript(project_key, session_id)}:entries{suffix}"


def transcript_uuids(project_key: str, session_id: str, subpath: str | None = None) -> str:
    """A set of the entry uuids already stored under the matching entries key (dedup)."""
    suffix = f":{_quoted(subpath)}" if subpath else ""
    return f"{_transcript(project_key, session_id)}:uuids{suffix}"


def transcript_subkeys(project_key: str, session_id: str) -> str:
    """A set of the session's subpaths (subagent transcripts)."""
    return f"{_transcript(project_key, session_id)}:subkeys"


def transcript_summary(project_key: str, session_id: str) -> str:
    """The SDK's folded session summary (JSON), kept up to date by every main append."""
    return f"{_transcript(project_key, session_id)}:summary"


def transcript_sessions(project_key: str) -> str:
    """A sorted set: session id -> last append time (epoch ms) of one project."""
    return f"{PREFIX}:tx:sessions:{{{_quoted(project_key)}}}"


# -- Fleet (replicas on one Redis) ----------------------------------------------------
# One conversation's lease and its fencing epoch share a hash tag, so one script sees both.
# The epoch only grows (INCR on every new owner) and outlives leases: it is kept as long as the
# conversation record. A lease lives lease_ttl_s unless its owner renews it.


def conversation_lease(conversation_id: str) -> str:
    """``"<replica> <epoch>"`` while a replica owns the conversation's live process."""
    return f"{PREFIX}:fleet:{{{_quoted(conversation_id)}}}:lease"


def conversation_epoch(conversation_id: str) -> str:
    """The fencing token of the conversation's latest owner (an INCR counter)."""
    return f"{PREFIX}:fleet:{{{_quoted(conversation_id)}}}:epoch"


FLEET_REPLICAS = f"{PREFIX}:fleet:replicas"  # sorted set: replica -> its last heartbeat (epoch ms)


def fleet_replica(replica: str) -> str:
    """JSON: a replica's last heartbeat (its room, its address, its clock); expires unless renewed."""
    return f"{PREFIX}:fleet:replica:{_quoted(replica)}"


# -- Durable intake -----------------------------------------------------------------------
# Each replica appends what it accepts to its own stream, read by its own consumer in one group;
# an entry is acknowledged and deleted once its outcome is recorded. A crashed replica's pending
# entries are what another replica claims (XAUTOCLAIM). Outcomes are kept for retries and lookups.
INTAKE_GROUP = "agentd"
INTAKE_OUTCOME_TTL_S = 7 * DAY_S


def intake_stream(replica: str) -> str:
    return f"{PREFIX}:intake:{{{_quoted(replica)}}}"


def intake_accepted(key: str) -> str:
    """The stream entry id of an accepted message, by its key: a second acceptance is a retry."""
    return f"{PREFIX}:intake:accepted:{_quoted(key)}"


def intake_outcome(key: str) -> str:
    """JSON ``{"outcome", "recorded_at"}`` of a message whose outcome is recorded."""
    return f"{PREFIX}:intake:outcome:{_quoted(key)}"
