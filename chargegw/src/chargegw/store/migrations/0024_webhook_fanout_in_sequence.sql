-- Webhook deliveries are made when an event is given its id, not when it is written.
-- Written in the event's transaction, a delivery's id (its place in its device's queue)
-- followed the insert, while the event's id follows the commit: two transactions writing
-- events of one device at once could queue them against their events' order, and a queue
-- chose its next row by event id among a window of rows to make up for it. Made by
-- sequence_events(), one caller at a time and in id order, deliveries of live events are
-- in their events' order by construction; a queue's next row is its first open one.

-- events written before this migration have their deliveries already (made by the old
-- emit_event): give them their ids with the old sequence_events first. Deliveries are made
-- for the events after `fanned_through`, not only for those a call numbers itself: a call
-- of the old function already waiting for the sequencer's lock when this commits runs the
-- old body (it numbers events of the new emit_event without making their deliveries)
SELECT sequence_events(2147483647);
ALTER TABLE event_sequencer ADD COLUMN fanned_through bigint;
UPDATE event_sequencer SET fanned_through = last_id;
ALTER TABLE event_sequencer ALTER COLUMN fanned_through SET NOT NULL;

CREATE OR REPLACE FUNCTION emit_event(
    p_type text, p_device_id text, p_port integer, p_order_no text, p_command_id bigint,
    p_job_id bigint, p_data jsonb, p_at timestamptz DEFAULT now(), p_gateway_id text DEFAULT NULL,
    p_protocol text DEFAULT NULL, p_cause_kind text DEFAULT NULL, p_cause_ref text DEFAULT NULL,
    p_frame_id bigint DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_gateway text := p_gateway_id;
    v_protocol text := p_protocol;
    v_kind text := p_cause_kind;
    v_ref text := p_cause_ref;
    v_frame bigint := p_frame_id;
BEGIN
    IF v_kind IS NULL THEN  -- the row names none: the transaction's, if it set one
        v_kind := transaction_cause('kind');
        v_ref := transaction_cause('ref');
        v_frame := transaction_cause('frame_id')::bigint;
    END IF;
    IF p_device_id IS NOT NULL AND (v_gateway IS NULL OR v_protocol IS NULL) THEN
        SELECT coalesce(v_gateway, d.gateway_id), coalesce(v_protocol, d.protocol)
          INTO v_gateway, v_protocol
          FROM devices d WHERE d.device_id = p_device_id;
        IF NOT FOUND THEN  -- a BKV gateway's own event
            SELECT coalesce(v_gateway, g.gateway_id), coalesce(v_protocol, g.protocol)
              INTO v_gateway, v_protocol
              FROM gateways g WHERE g.gateway_id = p_device_id;
        END IF;
    END IF;
    INSERT INTO events (type, at, device_id, gateway_id, protocol, port, order_no, command_id,
                        job_id, data, cause_kind, cause_ref, frame_id)
    VALUES (p_type, coalesce(p_at, now()), p_device_id, v_gateway, v_protocol, p_port,
            p_order_no, p_command_id, p_job_id, coalesce(p_data, '{}'::jsonb), v_kind, v_ref,
            CASE WHEN v_kind = 'frame' THEN v_frame END);
    -- identical notifications in one transaction are delivered once
    PERFORM pg_notify('chargegw_events_new', '');
END $$;

CREATE OR REPLACE FUNCTION sequence_events(p_limit integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
    v_count bigint;
    v_fanned bigint;
BEGIN
    SELECT last_id, fanned_through INTO v_last, v_fanned FROM event_sequencer FOR UPDATE;
    WITH todo AS (
        SELECT pk, row_number() OVER (ORDER BY pk) AS n
          FROM events WHERE id IS NULL ORDER BY pk LIMIT p_limit
    )
    UPDATE events e SET id = v_last + todo.n FROM todo WHERE e.pk = todo.pk;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count = 0 AND v_fanned = v_last THEN
        RETURN 0;
    END IF;
    UPDATE event_sequencer SET last_id = v_last + v_count, fanned_through = v_last + v_count;
    -- a delivery per enabled subscription that wants the event, in id order (the
    -- delivery ids, a queue's order, follow); the sequencer's row lock orders the calls
    INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key)
    SELECT s.id, e.pk, coalesce(e.device_id, e.gateway_id, '')
      FROM events e
      JOIN webhook_subscriptions s
        ON s.enabled
       AND EXISTS (SELECT 1 FROM unnest(s.event_types) AS t(p) WHERE event_type_matches(t.p, e.type))
       AND (s.device_ids IS NULL OR e.device_id = ANY (s.device_ids))
       AND (s.gateway_ids IS NULL OR e.gateway_id = ANY (s.gateway_ids))
       AND (s.protocol IS NULL OR s.protocol = e.protocol)
     WHERE e.id > v_fanned AND e.id <= v_last + v_count
       -- made already by a process still on the old emit_event (during an upgrade); a
       -- scalar subquery on the event index alone (an anti join, or a bitmap AND with the
       -- subscription index, read every delivery of the subscription per call)
       AND (SELECT 1 FROM webhook_deliveries w
             WHERE w.event_pk = e.pk AND w.subscription_id + 0 = s.id LIMIT 1) IS NULL
     ORDER BY e.id, s.id;
    PERFORM pg_notify('chargegw_events', (v_last + v_count)::text);
    RETURN v_last + v_count;
END $$;
