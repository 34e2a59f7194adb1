-- hitl-service schema, version 3 (PostgreSQL): turns of periodic upkeep.
-- One row per job (catch-up with the provider, pruning): the end of the turn
-- a replica last took. A replica runs the job only when it can move that end
-- forward, so replicas sharing a database run it once per interval between
-- them, not once each (catch-up makes one provider call per open chat).
CREATE TABLE upkeep_turns (
    job   text PRIMARY KEY,
    until timestamptz NOT NULL
);
