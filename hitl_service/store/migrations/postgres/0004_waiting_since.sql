-- hitl-service schema, version 4 (PostgreSQL): when a session last began to
-- wait for an agent. The queue timeout counts from here, not from the
-- session's creation: a handoff an agent gave back to the queue waits anew.
-- NULL: it has waited since it was created (every session before this).
ALTER TABLE sessions ADD COLUMN waiting_since timestamptz;
