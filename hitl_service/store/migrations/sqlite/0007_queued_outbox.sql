-- hitl-service schema, version 7 (SQLite): items queued behind their
-- session's head are marked, and the claim's index holds only the others.
-- Before, every claim walked every due item and skipped those behind a
-- head one by one: a backlog of N sends to one session cost O(N) per
-- claim, O(N^2) to drain. An item is queued when stored behind a pending
-- one, and unqueued when the item ahead of it leaves the pending state.
-- Older releases ignore the column (their claim checks the order itself).
ALTER TABLE outbox ADD COLUMN queued INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET queued = 1 WHERE status = 'pending' AND EXISTS (
    SELECT 1 FROM outbox p WHERE p.session_id = outbox.session_id
    AND p.status = 'pending' AND p.pos < outbox.pos);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending' AND queued = 0;
-- Whether (and from when) items wait behind a head: the loop's wake-ups.
CREATE INDEX outbox_queued ON outbox (next_attempt_at) WHERE status = 'pending' AND queued = 1;
