-- Where a delivery stands in its queue's order: NULL for a live event's delivery (its
-- event's id, given in commit order), else the id of the newest sequenced event when the
-- row was made (a replay, a re-sent delivered one): such rows go after what their queue
-- already holds, whatever their event's age.
ALTER TABLE webhook_deliveries ADD COLUMN queue_position bigint;
