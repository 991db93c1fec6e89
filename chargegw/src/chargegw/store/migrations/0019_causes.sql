-- Every change of state records its cause (docs/events.md, "Causes").
--
-- A cause is a kind ('frame', 'api', 'timer', 'fault', 'system'), a reference (the API
-- call's X-Request-Id; a timer's, fault's or the system's short name) and, for a frame,
-- the audit frame's id. Rows whose changes emit events carry the cause of their last
-- change (cause_kind, cause_ref, cause_frame_id) and the triggers copy it into the event.
--
-- Two ways in:
-- * per row: the batch writer's rows (ports, device_events), one batch holding the
--   changes of many frames, name their causes in their own columns;
-- * per transaction: code that changes orders and commands one transaction at a time
--   sets the transaction-local settings chargegw.cause_kind, _ref and _frame_id
--   (store/causes.py `apply`); a BEFORE trigger takes them into the row when its status
--   changes (or it is inserted), unless the statement names the cause itself. A status
--   change with no cause known leaves the row's cause NULL, never a stale one.
-- emit_event falls back to the transaction's cause for events whose row has none.

-- Frame ids are given in the gateway process: epoch << 32 | counter, one epoch per
-- writer start (and per 2^32 frames). The epoch stays below 2^31 so the id stays a
-- bigint; a restore moves this sequence by a small gap (ops/backup.py EPOCH_GAP).
CREATE SEQUENCE frame_id_epochs AS bigint MINVALUE 1 MAXVALUE 2147483647 NO CYCLE;
-- the first epoch lies above every id the database gave before (frames_id_seq)
SELECT setval('frame_id_epochs', ((SELECT last_value FROM frames_id_seq) >> 32) + 1, false);

ALTER TABLE events
    ADD COLUMN cause_kind text
        CHECK (cause_kind IN ('frame', 'api', 'timer', 'fault', 'system')),
    ADD COLUMN cause_ref text;
CREATE INDEX events_frame ON events (frame_id) WHERE frame_id IS NOT NULL;

ALTER TABLE ports
    ADD COLUMN cause_kind text, ADD COLUMN cause_ref text, ADD COLUMN cause_frame_id bigint;
ALTER TABLE device_events
    ADD COLUMN cause_kind text, ADD COLUMN cause_ref text, ADD COLUMN cause_frame_id bigint;
ALTER TABLE orders
    ADD COLUMN cause_kind text, ADD COLUMN cause_ref text, ADD COLUMN cause_frame_id bigint;
-- sent_frame_id: the audit frame that carried the command's last attempt
ALTER TABLE commands
    ADD COLUMN cause_kind text, ADD COLUMN cause_ref text, ADD COLUMN cause_frame_id bigint,
    ADD COLUMN sent_frame_id bigint;

-- the transaction's cause, part by part ('kind', 'ref', 'frame_id'); NULL if not set
CREATE FUNCTION transaction_cause(p_part text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('chargegw.' || 'cause_' || p_part, true), '')
$$;

-- emit_event gains the cause (defaulted: the callers of 0012 keep working)
DROP FUNCTION emit_event(text, text, integer, text, bigint, bigint, jsonb, timestamptz, text,
                         text);
CREATE FUNCTION emit_event(
    p_type text, p_device_id text, p_port integer, p_order_no text, p_command_id bigint,
    p_job_id bigint, p_data jsonb, p_at timestamptz DEFAULT now(), p_gateway_id text DEFAULT NULL,
    p_protocol text DEFAULT NULL, p_cause_kind text DEFAULT NULL, p_cause_ref text DEFAULT NULL,
    p_frame_id bigint DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_pk bigint;
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
            CASE WHEN v_kind = 'frame' THEN v_frame END)
    RETURNING pk INTO v_pk;
    INSERT INTO webhook_deliveries (subscription_id, event_pk, ordering_key)
    SELECT s.id, v_pk, coalesce(p_device_id, v_gateway, '')
      FROM webhook_subscriptions s
     WHERE s.enabled
       AND EXISTS (SELECT 1 FROM unnest(s.event_types) AS t(p) WHERE event_type_matches(t.p, p_type))
       AND (s.device_ids IS NULL OR p_device_id = ANY (s.device_ids))
       AND (s.gateway_ids IS NULL OR v_gateway = ANY (s.gateway_ids))
       AND (s.protocol IS NULL OR s.protocol = v_protocol);
    -- identical notifications in one transaction are delivered once
    PERFORM pg_notify('chargegw_events_new', '');
END $$;

-- orders and commands: a change of status (or a new row) takes the transaction's cause,
-- unless the statement set the row's cause itself
CREATE FUNCTION take_transaction_cause() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.status IS NOT DISTINCT FROM NEW.status
           OR NEW.cause_kind IS DISTINCT FROM OLD.cause_kind
           OR NEW.cause_ref IS DISTINCT FROM OLD.cause_ref
           OR NEW.cause_frame_id IS DISTINCT FROM OLD.cause_frame_id THEN
            RETURN NEW;
        END IF;
    ELSIF NEW.cause_kind IS NOT NULL THEN
        RETURN NEW;
    END IF;
    NEW.cause_kind := transaction_cause('kind');
    NEW.cause_ref := transaction_cause('ref');
    NEW.cause_frame_id := transaction_cause('frame_id')::bigint;
    RETURN NEW;
END $$;
CREATE TRIGGER orders_take_cause BEFORE INSERT OR UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION take_transaction_cause();
CREATE TRIGGER commands_take_cause BEFORE INSERT OR UPDATE OF status ON commands
    FOR EACH ROW EXECUTE FUNCTION take_transaction_cause();

-- ---------------------------------------------------------------- sources (0012, with causes)

CREATE OR REPLACE FUNCTION events_from_device_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_type text;
    v_data jsonb := jsonb_build_object('reason', NEW.reason, 'detail', NEW.detail);
    v_order text := NEW.detail ->> 'order_no';
    v_job bigint;
    v_port integer;
BEGIN
    v_type := CASE NEW.kind
        WHEN 'online' THEN 'device.online'
        WHEN 'offline' THEN 'device.offline'
        WHEN 'registered' THEN 'device.registered'
        WHEN 'alarm' THEN 'device.alarm'
        WHEN 'card_swipe' THEN CASE NEW.reason
            WHEN 'accepted' THEN 'card.swipe_accepted'
            WHEN 'resend' THEN NULL
            ELSE 'card.swipe_refused' END
        WHEN 'param_verified' THEN 'param.verified'
        WHEN 'param_mismatch' THEN 'param.mismatch'
        WHEN 'param_failed' THEN 'param.failed'
        WHEN 'param_drift' THEN 'param.drift'
        WHEN 'upgrade_started' THEN 'upgrade.started'
        WHEN 'upgrade_verified' THEN 'upgrade.verified'
        WHEN 'upgrade_failed' THEN 'upgrade.failed'
        ELSE NULL END;
    IF v_type IS NULL THEN
        RETURN NULL;
    END IF;
    -- a device's detail may hold anything: only plain integers are taken as subjects
    IF (NEW.detail ->> 'job_id') ~ '^[0-9]{1,18}$' THEN
        v_job := (NEW.detail ->> 'job_id')::bigint;
    END IF;
    IF (NEW.detail ->> 'port') ~ '^[0-9]{1,9}$' THEN
        v_port := (NEW.detail ->> 'port')::integer;
    END IF;
    IF NEW.kind = 'card_swipe' THEN
        v_data := jsonb_build_object(
            'result', NEW.reason, 'card_id', NEW.detail ->> 'card_id',
            'port', NEW.detail -> 'port', 'balance_cent', NEW.detail -> 'balance_cent',
            'detail', NEW.detail);
    END IF;
    PERFORM emit_event(v_type, NEW.device_id, v_port, v_order, NULL, v_job, v_data, NEW.at,
                       p_cause_kind => NEW.cause_kind, p_cause_ref => NEW.cause_ref,
                       p_frame_id => NEW.cause_frame_id);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION events_from_orders() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_data jsonb := jsonb_build_object(
        'status', NEW.status, 'start_mode', NEW.start_mode,
        'device_initiated', NEW.device_initiated, 'mode', NEW.mode,
        'card_id', NEW.card_id, 'started_at', NEW.started_at, 'ended_at', NEW.ended_at,
        'duration_s', NEW.duration_s, 'energy_kwh', NEW.energy_kwh,
        'max_power_w', NEW.max_power_w, 'stop_reason', NEW.stop_reason,
        'stop_reason_code', NEW.stop_reason_code, 'failure_reason', NEW.failure_reason,
        'amount_cent', NEW.amount_cent);
    v_type text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM emit_event('order.created', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data, p_cause_kind => NEW.cause_kind, p_cause_ref => NEW.cause_ref,
                           p_frame_id => NEW.cause_frame_id);
        IF NEW.status = 'pending' OR NEW.status = 'starting' THEN
            RETURN NULL;
        END IF;
    ELSIF OLD.status IS NOT DISTINCT FROM NEW.status THEN
        RETURN NULL;
    END IF;
    v_type := CASE NEW.status
        WHEN 'charging' THEN 'order.started'
        WHEN 'stopping' THEN 'order.stopping'
        WHEN 'settled' THEN 'order.stopped'
        WHEN 'failed' THEN 'order.failed'
        WHEN 'cancelled' THEN 'order.cancelled'
        ELSE NULL END;
    IF v_type IS NOT NULL THEN
        PERFORM emit_event(v_type, NEW.device_id, NEW.port, NEW.order_no, NULL, NULL, v_data,
                           p_cause_kind => NEW.cause_kind, p_cause_ref => NEW.cause_ref,
                           p_frame_id => NEW.cause_frame_id);
    END IF;
    IF NEW.status = 'settled' THEN
        PERFORM emit_event('order.settled', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data, p_cause_kind => NEW.cause_kind, p_cause_ref => NEW.cause_ref,
                           p_frame_id => NEW.cause_frame_id);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION events_from_commands() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('acked', 'failed', 'dead') THEN
        PERFORM emit_event('command.' || NEW.status, NEW.device_id, NULL, NEW.order_no,
                           NEW.command_id, NULL,
                           jsonb_build_object('name', NEW.name, 'attempts', NEW.attempts,
                                              'result_code', NEW.result_code,
                                              'result_text', NEW.result_text,
                                              'dead_reason', NEW.dead_reason),
                           coalesce(NEW.finished_at, now()), NULL, NEW.protocol,
                           NEW.cause_kind, NEW.cause_ref, NEW.cause_frame_id);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION events_from_ports() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_old text;
    v_data jsonb;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        v_old := OLD.status;
    END IF;
    v_data := jsonb_build_object('status', NEW.status, 'previous_status', v_old,
                                 'status_code', NEW.status_code,
                                 'status_text', NEW.status_text, 'order_ref', NEW.order_ref);
    PERFORM emit_event('port.status_changed', NEW.device_id, NEW.port, NULL, NULL, NULL, v_data,
                       NEW.reported_at, p_cause_kind => NEW.cause_kind,
                       p_cause_ref => NEW.cause_ref, p_frame_id => NEW.cause_frame_id);
    IF NEW.status = 'fault' THEN
        PERFORM emit_event('device.fault', NEW.device_id, NEW.port, NULL, NULL, NULL, v_data,
                           NEW.reported_at, p_cause_kind => NEW.cause_kind,
                           p_cause_ref => NEW.cause_ref, p_frame_id => NEW.cause_frame_id);
    END IF;
    RETURN NULL;
END $$;
