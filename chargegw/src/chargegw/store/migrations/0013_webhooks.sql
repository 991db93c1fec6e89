-- Webhook delivery queues (chargegw.domain.webhooks).
--
-- A subscription's deliveries form one queue per ordering key (the device); one row of a
-- queue is in flight at a time, the one whose event id is the smallest. A delivery
-- inserted while its queue has an open row is `queued` and stays out of the due index, so
-- a queue blocked behind a failing head costs nothing however long it grows; finishing
-- the head makes the next row `pending` (in the finishing statement). A BEFORE INSERT
-- trigger decides, whichever code inserts (emit_event, replay, retry). Rows inserted at
-- once by concurrent transactions may both be `pending`: the claim lets the one with the
-- smaller event id go first.

ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_status_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_status_check
    CHECK (status IN ('queued', 'pending', 'delivering', 'delivered', 'failed', 'cancelled'));

-- the `webhook-id` of a ping and of a copy of one; NULL: `evt_<events.id>`
ALTER TABLE webhook_deliveries ADD COLUMN webhook_id text;

-- the open rows of each queue in order (the head test, the promotion of the next row)
DROP INDEX webhook_deliveries_open;
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (subscription_id, ordering_key, id)
    WHERE status IN ('queued', 'pending', 'delivering');
-- the rows of a queue that may go next (pending) or are in flight: one or two per queue
CREATE INDEX webhook_deliveries_heads
    ON webhook_deliveries (subscription_id, ordering_key, id)
    WHERE status IN ('pending', 'delivering');
-- what a subscription has due (a claimed row's next_attempt_at is the end of its lease),
-- and its live claims
DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (subscription_id, next_attempt_at, id)
    WHERE status IN ('pending', 'delivering');
-- the attempts in flight (a subscription's live claims, against max_concurrency)
CREATE INDEX webhook_deliveries_claimed ON webhook_deliveries (subscription_id)
    WHERE status = 'delivering';
-- finished rows, for the retention sweep
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (finished_at)
    WHERE status IN ('delivered', 'failed', 'cancelled');

CREATE FUNCTION webhook_deliveries_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'pending' AND EXISTS (
        SELECT 1 FROM webhook_deliveries q
         WHERE q.subscription_id = NEW.subscription_id
           AND q.ordering_key = NEW.ordering_key
           AND q.status IN ('queued', 'pending', 'delivering')
    ) THEN
        NEW.status := 'queued';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER webhook_deliveries_enqueue BEFORE INSERT ON webhook_deliveries
    FOR EACH ROW EXECUTE FUNCTION webhook_deliveries_enqueue();
