-- hitl-service schema, version 8 (PostgreSQL): failed sessions by creation,
-- for ListSessions filtered by FAILED. Without it the listing walked every
-- session kept by creation time (most of them ended) to find a page of
-- failed ones. Partial: only failed sessions enter it. A plain CREATE INDEX
-- (migrations run in a transaction), as in 0006.
CREATE INDEX sessions_failed ON sessions (created_at, id) WHERE state = 'failed';
