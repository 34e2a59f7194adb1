-- hitl-service schema, version 2 (PostgreSQL): nothing to change.
-- sqlite/0002 makes SQLite write fewer pages per message (idempotency without
-- a rowid, outbox.pos without AUTOINCREMENT); PostgreSQL's tables already
-- work that way. The version is recorded so both trees stay numbered alike.
SELECT 1;
