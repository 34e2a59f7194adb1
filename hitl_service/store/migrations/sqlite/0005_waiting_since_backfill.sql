-- hitl-service schema, version 5 (SQLite): waiting_since for the handoffs
-- that were already back in the queue when version 4 added the column (NULL
-- counted their queue timeout from their creation): when the first queue
-- event after their last assignment was logged. Only waiting sessions are
-- read, each through events_by_session.
UPDATE sessions SET waiting_since = (
    SELECT MIN(e.occurred_at) FROM events AS e
    WHERE e.session_id = sessions.id
      AND (e.kind = 'queued'
           OR (e.kind = 'transferred' AND json_extract(e.data, '$.to_agent') IS NULL))
      AND e.seq > (
          SELECT MAX(a.seq) FROM events AS a
          WHERE a.session_id = sessions.id
            AND (a.kind = 'agent_assigned'
                 OR (a.kind = 'transferred' AND json_extract(a.data, '$.to_agent') IS NOT NULL))
      )
)
WHERE state IN ('requested', 'queued') AND waiting_since IS NULL;
