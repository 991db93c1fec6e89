-- Autovacuum and fillfactor of the tables updated all the time (issue 14; the
-- measurement and the reasoning are in docs/operations.md, "Autovacuum").
--
-- Measured with 200 simulated AP3000 piles (40 charging) for 45 minutes of pile time,
-- autovacuum off: per pile hour every `devices` and `gateways` row was updated ~23 times
-- and every `ports` row ~21 times (heartbeats, status reports), about 90 % of them HOT
-- updates; every `events` row once (its id is given after commit; the column is indexed,
-- so never HOT); a command 3 times (claimed and sent, answered), an order about 5 times.
-- With the default scale factor (0.2) up to a fifth of a table is dead before a vacuum
-- is even considered: on a 10-million-row `events` table, 2 million dead tuples.

-- State rows: room on each page for the next versions of its rows (HOT updates stay on
-- the page and need no index entries; pruning reclaims them without a vacuum), and a
-- vacuum once 5 % of the rows are dead. fillfactor applies to pages written from now on.
ALTER TABLE devices SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05,
                         autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE ports SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05,
                       autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE gateways SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05,
                          autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE device_sessions SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05);

-- Queues that keep days of finished rows behind a small open head: the outbox and the
-- webhook deliveries are claimed through partial indexes of their open rows, which the
-- dead versions of just-finished rows bloat until a vacuum; vacuum at 2 % dead (at
-- least 1000 rows) instead of 20 %.
ALTER TABLE commands SET (autovacuum_vacuum_scale_factor = 0.02,
                          autovacuum_vacuum_threshold = 1000);
ALTER TABLE webhook_deliveries SET (autovacuum_vacuum_scale_factor = 0.02,
                                    autovacuum_vacuum_threshold = 1000);
ALTER TABLE orders SET (autovacuum_vacuum_scale_factor = 0.05);

-- The event log: one dead version per event (the id update), 30 days of rows by default.
ALTER TABLE events SET (autovacuum_vacuum_scale_factor = 0.02,
                        autovacuum_vacuum_threshold = 10000);
