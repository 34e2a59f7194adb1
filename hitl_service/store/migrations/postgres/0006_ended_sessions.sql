-- hitl-service schema, version 6 (PostgreSQL): ended sessions by when they
-- ended, for HITL_RETENTION. The hourly prune takes the oldest ones a batch
-- at a time; without this index each batch would scan every session.
-- Partial: open sessions (NULL ended_at) never enter it. A plain CREATE
-- INDEX (migrations run in a transaction): it blocks writes to sessions
-- while it builds, like 0004's ALTER; its lock is asked with the
-- migration's lock_timeout and retried (store.migrate_waiting).
CREATE INDEX sessions_ended ON sessions (ended_at, id) WHERE state IN ('ended', 'failed');
