-- hitl-service schema, version 9 (PostgreSQL): sessions whose start is in
-- flight, for the check every webhook event about a chat that is not ours
-- makes (LiveChat sends a whole license's). Without it the check read every
-- open session through sessions_open (10,000 rows at 10,000 open).
-- Partial: a session is in it only while it starts.
CREATE INDEX sessions_starting ON sessions (provider) WHERE state = 'starting';
