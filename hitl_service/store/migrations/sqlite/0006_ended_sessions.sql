-- hitl-service schema, version 6 (SQLite): ended sessions by when they
-- ended, for HITL_RETENTION. The hourly prune takes the oldest ones a batch
-- at a time; without this index each batch would scan every session.
-- Partial: open sessions (NULL ended_at) never enter it.
CREATE INDEX sessions_ended ON sessions (ended_at, id) WHERE state IN ('ended', 'failed');
-- Dead letters go with the retention too (PostgreSQL has had this index
-- since version 1).
CREATE INDEX dead_letters_by_received ON dead_letters (received_at);
