-- hitl-service schema, version 1 (PostgreSQL).
-- Same tables and meaning as sqlite/0001_init.sql. Timestamps are timestamptz.
-- JSON columns are `json`, not `jsonb`: jsonb refuses the escape \u0000, which
-- JSON text may carry (a provider message, caller metadata), and SQLite keeps it.

CREATE TABLE users (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL DEFAULT '',
    picture_url text NOT NULL DEFAULT '',
    external_id text,                       -- NULL when the caller gave none
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE UNIQUE INDEX users_external_id ON users (external_id) WHERE external_id IS NOT NULL;

-- A provider's identity for a user (LiveChat: customer id, token, cookies).
CREATE TABLE provider_users (
    user_id          text NOT NULL REFERENCES users (id),
    provider         text NOT NULL,
    external_user_id text NOT NULL,
    state            json NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id, provider)
);

-- Session ids sort bytewise (COLLATE "C"), as in SQLite, whatever the
-- database's collation: list_open_sessions and page keysets order by id.
CREATE TABLE sessions (
    id                  text COLLATE "C" PRIMARY KEY,
    user_id             text NOT NULL REFERENCES users (id),
    provider            text NOT NULL,
    state               text NOT NULL,
    request_id          text NOT NULL DEFAULT '',
    title               text NOT NULL DEFAULT '',
    description         text NOT NULL DEFAULT '',
    group_id            text NOT NULL DEFAULT '',
    metadata            json NOT NULL DEFAULT '{}',
    external_chat_id    text NOT NULL DEFAULT '',
    chat_state          json NOT NULL DEFAULT '{}',
    agent               json,               -- NULL when nobody has it
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    ended_at            timestamptz,
    end_reason          text NOT NULL DEFAULT '',
    ended_by            text NOT NULL DEFAULT 'unspecified',
    stop_requested_at   timestamptz,
    last_activity_at    timestamptz,
    catch_up_checkpoint text NOT NULL DEFAULT ''
);
-- One open session per user and provider, across every replica.
CREATE UNIQUE INDEX sessions_one_open ON sessions (user_id, provider)
    WHERE state NOT IN ('ended', 'failed');
CREATE INDEX sessions_by_chat ON sessions (provider, external_chat_id, created_at);
CREATE INDEX sessions_by_created ON sessions (created_at, id);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at, id);
CREATE INDEX sessions_open ON sessions (id) WHERE state NOT IN ('ended', 'failed');

-- The event log; seq is the cursor, taken from event_log_head (not a sequence)
-- inside the appending transaction, so commit order equals seq order and a
-- reader by cursor never skips a row that commits later.
CREATE TABLE events (
    seq         bigint PRIMARY KEY,
    session_id  text NOT NULL,
    user_id     text NOT NULL,
    occurred_at timestamptz NOT NULL,
    kind        text NOT NULL,
    data        json NOT NULL
);
CREATE INDEX events_by_session ON events (session_id, seq);

-- The newest allocated (and, once committed, visible) cursor. One row; every
-- appending transaction holds its row lock until it commits.
CREATE TABLE event_log_head (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    seq      bigint NOT NULL
);
INSERT INTO event_log_head (only_row, seq) VALUES (true, 0);

-- Provider event keys seen, so redelivered webhooks are recorded once.
CREATE TABLE dedupe_keys (
    provider   text NOT NULL,
    key        text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (provider, key)
);
CREATE INDEX dedupe_keys_by_created ON dedupe_keys (created_at);

-- Events for chats not known yet, kept while a start is in flight.
CREATE TABLE parked_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider         text NOT NULL,
    external_chat_id text NOT NULL,
    event            json NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX parked_events_by_chat ON parked_events (provider, external_chat_id, id);
CREATE INDEX parked_events_by_created ON parked_events (created_at);

CREATE TABLE idempotency (
    scope        text NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    resource_id  text NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_by_created ON idempotency (created_at);

-- Provider calls we owe (sends, stops), stored before they are made. Inserts
-- of one session are serialized (a transaction-scoped advisory lock), so pos
-- order within a session is commit order.
CREATE TABLE outbox (
    pos              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order within a session
    id               text NOT NULL UNIQUE,
    session_id       text NOT NULL,
    kind             text NOT NULL,
    request_id       text NOT NULL,
    payload          json NOT NULL,
    status           text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,  -- attempts started
    attempts_settled integer NOT NULL DEFAULT 0,  -- attempts known not to have reached the provider
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      text NOT NULL DEFAULT '',
    lease_until      timestamptz,
    last_error       text NOT NULL DEFAULT '',
    error_code       text NOT NULL DEFAULT '',
    result           json NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL,
    done_at          timestamptz
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_pending_by_session ON outbox (session_id, pos) WHERE status = 'pending';
CREATE INDEX outbox_done ON outbox (done_at) WHERE status <> 'pending';

CREATE TABLE dead_letters (
    id          text PRIMARY KEY,
    provider    text NOT NULL,
    received_at timestamptz NOT NULL,
    reason      text NOT NULL,
    body        bytea NOT NULL
);
CREATE INDEX dead_letters_by_received ON dead_letters (received_at);
