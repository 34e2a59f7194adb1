-- hitl-service schema, version 2 (SQLite): fewer pages written per message.
-- Every SendMessage inserts an idempotency row and an outbox row; each page a
-- commit touches is one more WAL frame (4 KiB written).
-- * idempotency becomes WITHOUT ROWID: the primary key is the table, not a
--   separate index beside it.
-- * outbox.pos drops AUTOINCREMENT, which updated sqlite_sequence on every
--   insert. A plain INTEGER PRIMARY KEY is still larger than every row in the
--   table, and pos only orders the rows that exist (a session's pending items).
--   (events keeps AUTOINCREMENT: cursors must never be reused.)
-- No other table references these two.

CREATE TABLE idempotency_v2 (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
INSERT INTO idempotency_v2 (scope, key, request_hash, resource_id, created_at)
    SELECT scope, key, request_hash, resource_id, created_at FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_v2 RENAME TO idempotency;
CREATE INDEX idempotency_by_created ON idempotency (created_at);

CREATE TABLE outbox_v2 (
    pos             INTEGER PRIMARY KEY,  -- order within a session
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
INSERT INTO outbox_v2 SELECT * FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v2 RENAME TO outbox;
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_pending_by_session ON outbox (session_id, pos) WHERE status = 'pending';
