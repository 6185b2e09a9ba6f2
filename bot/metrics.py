"""Prometheus metrics (served at /metrics). Labels carry no conversation ids or text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TURNS = Counter("agentd_turns_total", "Turns finished, by outcome", ["outcome"])
TURN_SECONDS = Histogram(
    "agentd_turn_seconds", "Wall time of a turn", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
)
SPAWNS = Counter("agentd_spawns_total", "CLI processes started, by kind", ["kind"])
SPAWN_SECONDS = Histogram("agentd_spawn_seconds", "Time to connect a CLI process")
EVICTIONS = Counter("agentd_evictions_total", "CLI processes retired, by reason", ["reason"])
ADMISSION_REFUSED = Counter(
    "agentd_admission_refused_total", "New conversations refused by fair admission, by reason", ["reason"]
)
LIVE_SESSIONS = Gauge("agentd_live_processes", "CLI processes currently running")
POOL_RSS_BYTES = Gauge("agentd_pool_rss_bytes", "Sum of sampled RSS of all CLI process trees, bytes")
STORE_ERRORS = Counter("agentd_store_errors_total", "Store operations that failed")
MIRROR_ERRORS = Counter("agentd_mirror_errors_total", "Transcript batches the Redis mirror failed to store")
CHANNEL_MESSAGES = Counter(
    "agentd_channel_messages_total", "Inbound channel messages, by channel and fate", ["channel", "fate"]
)
SLACK_FEEDBACK = Counter(
    "agentd_slack_feedback_total", "Feedback clicks on answers in Slack assistant threads, good or bad", ["value"]
)
CHANNEL_CONNECTED = Gauge("agentd_channel_connected", "1 while a channel's connection is up", ["channel"])
# Per replica: which duties (the IMAP inbox) this one holds, and how often it lost one it held.
DUTY_HELD = Gauge("agentd_duty_held", "1 while this replica holds the duty (with Redis: its lease)", ["duty"])
DUTY_LOSSES = Counter(
    "agentd_duty_losses_total", "Duties this replica lost while holding them (taken over, Redis unreachable)", ["duty"]
)
JOB_RUNS = Counter("agentd_job_runs_total", "Scheduled job runs, by job and status", ["job", "status"])
JOB_NEXT_FIRE = Gauge("agentd_job_next_fire_timestamp", "Next fire time of each job (Unix seconds; 0: paused)", ["job"])
MODEL_REQUESTS = Counter("agentd_model_requests_total", "Model requests through the gateway", ["model", "status"])
MODEL_TOKENS = Counter("agentd_model_tokens_total", "Model tokens, by kind", ["model", "kind"])
COST = Counter("agentd_cost_usd_total", "Metered model cost in USD, by profile", ["profile"])
BUDGET_STOPS = Counter("agentd_budget_stops_total", "Model requests refused by a budget", ["budget"])
MODEL_FIRST_BYTE_SECONDS = Histogram(
    "agentd_model_first_byte_seconds",
    "Time to the first byte of a model response",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
MODEL_SECONDS = Histogram(
    "agentd_model_seconds", "Total time of a model request", buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
)
# Sampled by the pool every pool.rss_sample_s (and a process's RSS series goes when it exits).
SESSIONS_BY_STATE = Gauge(
    "agentd_sessions", "Live CLI processes by state (spare: started ahead of demand, no conversation yet)", ["state"]
)
SESSIONS_BY_PROFILE = Gauge("agentd_sessions_by_profile", "Live CLI processes by profile", ["profile"])
QUEUE_DEPTH = Gauge("agentd_queue_depth", "Messages waiting behind a running turn, all conversations together")
PROCESS_RSS_BYTES = Gauge("agentd_process_rss_bytes", "Sampled RSS of one CLI process tree, bytes (by pid)", ["pid"])
MIB = 1 << 20
CRASHES = Counter(
    "agentd_crashes_total", "CLI processes that died unasked: during a turn, killed over memory, or idle", ["kind"]
)
