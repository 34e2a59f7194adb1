-- hitl-service schema, version 1 (SQLite).
-- Timestamps are ISO 8601 UTC text with microseconds, so they sort as text.
-- JSON columns are compact JSON text.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT NOT NULL DEFAULT '',
    picture_url TEXT NOT NULL DEFAULT '',
    external_id TEXT,                       -- NULL when the caller gave none
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX users_external_id ON users (external_id) WHERE external_id IS NOT NULL;

-- A provider's identity for a user (LiveChat: customer id, token, cookies).
CREATE TABLE provider_users (
    user_id          TEXT NOT NULL REFERENCES users (id),
    provider         TEXT NOT NULL,
    external_user_id TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT '{}',
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (user_id, provider)
);

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES users (id),
    provider            TEXT NOT NULL,
    state               TEXT NOT NULL,
    request_id          TEXT NOT NULL DEFAULT '',
    title               TEXT NOT NULL DEFAULT '',
    description         TEXT NOT NULL DEFAULT '',
    group_id            TEXT NOT NULL DEFAULT '',
    metadata            TEXT NOT NULL DEFAULT '{}',
    external_chat_id    TEXT NOT NULL DEFAULT '',
    chat_state          TEXT NOT NULL DEFAULT '{}',
    agent               TEXT,               -- JSON, NULL when nobody has it
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    ended_at            TEXT,
    end_reason          TEXT NOT NULL DEFAULT '',
    ended_by            TEXT NOT NULL DEFAULT 'unspecified',
    stop_requested_at   TEXT,
    last_activity_at    TEXT,
    catch_up_checkpoint TEXT NOT NULL DEFAULT ''
);
-- One open session per user and provider, across every writer.
CREATE UNIQUE INDEX sessions_one_open ON sessions (user_id, provider)
    WHERE state NOT IN ('ended', 'failed');
CREATE INDEX sessions_by_chat ON sessions (provider, external_chat_id, created_at);
CREATE INDEX sessions_by_created ON sessions (created_at, id);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at, id);
CREATE INDEX sessions_open ON sessions (id) WHERE state NOT IN ('ended', 'failed');

-- The event log; seq is the cursor. AUTOINCREMENT never reuses a value.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL
);
CREATE INDEX events_by_session ON events (session_id, seq);

-- Provider event keys seen, so redelivered webhooks are recorded once.
CREATE TABLE dedupe_keys (
    provider   TEXT NOT NULL,
    key        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (provider, key)
);
CREATE INDEX dedupe_keys_by_created ON dedupe_keys (created_at);

-- Events for chats not known yet, kept while a start is in flight.
CREATE TABLE parked_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    provider         TEXT NOT NULL,
    external_chat_id TEXT NOT NULL,
    event            TEXT NOT NULL,
    created_at       TEXT NOT NULL
);
CREATE INDEX parked_events_by_chat ON parked_events (provider, external_chat_id, id);

CREATE TABLE idempotency (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_by_created ON idempotency (created_at);

-- Provider calls we owe (sends, stops), stored before they are made.
CREATE TABLE outbox (
    pos             INTEGER PRIMARY KEY AUTOINCREMENT,  -- order within a session
    id              TEXT NOT NULL UNIQUE,
    session_id      TEXT NOT NULL,
    kind            TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,  -- attempts started
    attempts_settled INTEGER NOT NULL DEFAULT 0, -- attempts known not to have reached the provider
    next_attempt_at TEXT NOT NULL,
    lease_owner     TEXT NOT NULL DEFAULT '',
    lease_until     TEXT,
    last_error      TEXT NOT NULL DEFAULT '',
    error_code      TEXT NOT NULL DEFAULT '',
    result          TEXT NOT NULL DEFAULT '{}',
    created_at      TEXT NOT NULL,
    done_at         TEXT
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_pending_by_session ON outbox (session_id, pos) WHERE status = 'pending';

CREATE TABLE dead_letters (
    id          TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    received_at TEXT NOT NULL,
    reason      TEXT NOT NULL,
    body        BLOB NOT NULL
);
