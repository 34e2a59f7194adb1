-- hitl-service schema, version 9 (SQLite): sessions whose start is in
-- flight, for the check every webhook event about a chat that is not ours
-- makes (LiveChat sends a whole license's). Through sessions_open it read
-- every open session (10 ms at 10,000 open, in the write transaction).
-- Partial: a session is in it only while it starts.
CREATE INDEX sessions_starting ON sessions (provider) WHERE state = 'starting';
