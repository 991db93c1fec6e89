-- The event stream's runtime (chargegw.domain.events): retention, and deliveries that
-- cannot outlive their event.

-- Retention deletes the oldest events in id order; `purged_through` is the id up to
-- which they were deleted (events with a webhook delivery still open are kept beyond
-- it until the delivery ends). A stream resumed from an older id is told what it lost.
CREATE TABLE event_retention (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_through  bigint NOT NULL
);
INSERT INTO event_retention VALUES (true, 0);

-- A delivery names an existing event, whatever deletes events: retention keeps an event
-- while one of its deliveries is open, and a delivery added while retention deletes its
-- event fails instead of pointing at nothing.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_pk) WHERE event_pk IS NOT NULL;
ALTER TABLE webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_event_fk FOREIGN KEY (event_pk) REFERENCES events (pk);
