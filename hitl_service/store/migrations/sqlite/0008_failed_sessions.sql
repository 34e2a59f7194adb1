-- hitl-service schema, version 8 (SQLite): failed sessions by creation, for
-- ListSessions filtered by FAILED. Without it the listing walked every
-- session kept by creation time (most of them ended) to find a page of
-- failed ones. Partial: only failed sessions enter it.
CREATE INDEX sessions_failed ON sessions (created_at, id) WHERE state = 'failed';
