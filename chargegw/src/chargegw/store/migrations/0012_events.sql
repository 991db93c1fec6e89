-- One event model for integrations (webhooks, the event stream, the pull API).
--
-- Every domain event is a row of `events`, written by triggers on the tables whose
-- changes it reports, so it commits (or rolls back) with the change itself, whichever
-- code path made it. Each event row fans out, in the same transaction, into one
-- `webhook_deliveries` row per enabled subscription that wants it.
--
-- `pk` is the row's identity. `id`, the event id clients see (SSE `id:`, `after=`,
-- `webhook-id: evt_<id>`), is given after commit by `sequence_events()`, one caller at a
-- time, so ids grow in commit order: a reader that has seen id N never later meets a
-- smaller one. (A bigserial alone would not do: a transaction that took id 7 may commit
-- after the one that took id 8.)

CREATE TABLE events (
    pk              bigserial PRIMARY KEY,
    id              bigint UNIQUE,
    type            text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    device_id       text,
    gateway_id      text,
    protocol        text,
    port            integer,
    order_no        text,
    command_id      bigint,
    job_id          bigint,
    frame_id        bigint,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX events_unsequenced ON events (pk) WHERE id IS NULL;
CREATE INDEX events_device_id ON events (device_id, id);
CREATE INDEX events_at ON events (at, id);
CREATE INDEX events_order ON events (order_no, id) WHERE order_no IS NOT NULL;

-- the last id given; its row lock serialises sequence_events()
CREATE TABLE event_sequencer (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id         bigint NOT NULL
);
INSERT INTO event_sequencer VALUES (true, 0);

CREATE TABLE webhook_subscriptions (
    id                      bigserial PRIMARY KEY,
    url                     text NOT NULL,
    description             text NOT NULL DEFAULT '',
    -- event types; `*` matches any run of characters (`order.*`, `*`)
    event_types             text[] NOT NULL,
    -- optional filters: NULL is "any"
    device_ids              text[],
    gateway_ids             text[],
    protocol                text CHECK (protocol IN ('ap3000', 'bkv')),
    enabled                 boolean NOT NULL DEFAULT true,
    disabled_reason         text,
    disabled_at             timestamptz,
    -- whsec_<base64>; the previous one is signed with too until previous_secret_until
    secret                  text NOT NULL,
    previous_secret         text,
    previous_secret_until   timestamptz,
    max_concurrency         integer NOT NULL DEFAULT 10 CHECK (max_concurrency BETWEEN 1 AND 100),
    timeout_s               double precision NOT NULL DEFAULT 10 CHECK (timeout_s > 0 AND timeout_s <= 60),
    -- the first failure since the last success; NULL while deliveries succeed
    failing_since           timestamptz,
    last_success_at         timestamptz,
    created_by              text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id                  bigserial PRIMARY KEY,
    subscription_id     bigint NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    -- the event (events.pk); NULL for a ping, whose body is in `payload`
    event_pk            bigint,
    payload             jsonb,
    -- a subscription gets one ordering key's deliveries in order (the device, else the
    -- gateway, else ''), the next only after the previous one is finished
    ordering_key        text NOT NULL,
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivering', 'delivered', 'failed',
                                          'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    -- a claim: the process delivering it, until when (a dead claimer's lease runs out)
    claimed_by          text,
    lease_until         timestamptz,
    -- why it was made: 'event', 'replay', 'retry', 'ping'
    origin              text NOT NULL DEFAULT 'event',
    created_at          timestamptz NOT NULL DEFAULT now(),
    first_attempt_at    timestamptz,
    last_attempt_at     timestamptz,
    finished_at         timestamptz,
    response_status     integer,
    response_body       text,
    latency_ms          double precision,
    last_error          text
);
-- the heads of the queues, and the due ones
CREATE INDEX webhook_deliveries_open ON webhook_deliveries (subscription_id, ordering_key, id)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (subscription_id, id);

-- `*` in a type pattern is any run of characters; the API allows only [a-z0-9_.*]
CREATE FUNCTION event_type_matches(pattern text, type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT type LIKE replace(replace(pattern, '_', '\_'), '*', '%') COLLATE "C"
$$;

-- Record an event: its row, its deliveries, and a wake-up for the sequencer.
CREATE FUNCTION emit_event(
    p_type text, p_device_id text, p_port integer, p_order_no text, p_command_id bigint,
    p_job_id bigint, p_data jsonb, p_at timestamptz DEFAULT now(), p_gateway_id text DEFAULT NULL,
    p_protocol text DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_pk bigint;
    v_gateway text := p_gateway_id;
    v_protocol text := p_protocol;
BEGIN
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
                        job_id, data)
    VALUES (p_type, coalesce(p_at, now()), p_device_id, v_gateway, v_protocol, p_port,
            p_order_no, p_command_id, p_job_id, coalesce(p_data, '{}'::jsonb))
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

-- Give ids to the committed events that have none, in the order they were written;
-- returns the last id given (0 when there was nothing to do). One caller at a time.
CREATE FUNCTION sequence_events(p_limit integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
    v_count bigint;
BEGIN
    SELECT last_id INTO v_last FROM event_sequencer FOR UPDATE;
    WITH todo AS (
        SELECT pk, row_number() OVER (ORDER BY pk) AS n
          FROM events WHERE id IS NULL ORDER BY pk LIMIT p_limit
    )
    UPDATE events e SET id = v_last + todo.n FROM todo WHERE e.pk = todo.pk;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    UPDATE event_sequencer SET last_id = v_last + v_count;
    PERFORM pg_notify('chargegw_events', (v_last + v_count)::text);
    RETURN v_last + v_count;
END $$;

-- ---------------------------------------------------------------- sources

-- the device event log: online/offline, registrations, alarms, swipes, params, upgrades
CREATE FUNCTION events_from_device_events() RETURNS trigger LANGUAGE plpgsql AS $$
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
    PERFORM emit_event(v_type, NEW.device_id, v_port, v_order, NULL, v_job, v_data, NEW.at);
    RETURN NULL;
END $$;
CREATE TRIGGER device_events_emit AFTER INSERT ON device_events
    FOR EACH ROW EXECUTE FUNCTION events_from_device_events();

-- orders: created, then each change of status
CREATE FUNCTION events_from_orders() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_data jsonb := jsonb_build_object(
        'status', NEW.status, 'start_mode', NEW.start_mode,
        'device_initiated', NEW.device_initiated, 'mode', NEW.mode,
        'card_id', NEW.card_id, 'started_at', NEW.started_at, 'ended_at', NEW.ended_at,
        'duration_s', NEW.duration_s, 'energy_kwh', NEW.energy_kwh,
        'max_power_w', NEW.max_power_w, 'stop_reason', NEW.stop_reason,
        'stop_reason_code', NEW.stop_reason_code, 'failure_reason', NEW.failure_reason,
        'amount_cent', NEW.amount_cent);
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM emit_event('order.created', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data);
        IF NEW.status = 'pending' OR NEW.status = 'starting' THEN
            RETURN NULL;
        END IF;
    ELSIF OLD.status IS NOT DISTINCT FROM NEW.status THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 'charging' THEN
        PERFORM emit_event('order.started', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data);
    ELSIF NEW.status = 'stopping' THEN
        PERFORM emit_event('order.stopping', NEW.device_id, NEW.port, NEW.order_no, NULL,
                           NULL, v_data);
    ELSIF NEW.status = 'settled' THEN
        PERFORM emit_event('order.stopped', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data);
        PERFORM emit_event('order.settled', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data);
    ELSIF NEW.status = 'failed' THEN
        PERFORM emit_event('order.failed', NEW.device_id, NEW.port, NEW.order_no, NULL, NULL,
                           v_data);
    ELSIF NEW.status = 'cancelled' THEN
        PERFORM emit_event('order.cancelled', NEW.device_id, NEW.port, NEW.order_no, NULL,
                           NULL, v_data);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER orders_emit AFTER INSERT OR UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION events_from_orders();

-- an order's progress: each sample the device reports while it charges
CREATE FUNCTION events_from_order_samples() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_device text;
    v_port integer;
BEGIN
    SELECT device_id, port INTO v_device, v_port FROM orders WHERE order_no = NEW.order_no;
    PERFORM emit_event('order.progress', v_device, v_port, NEW.order_no, NULL, NULL,
                       jsonb_build_object('duration_s', NEW.duration_s,
                                          'energy_kwh', NEW.energy_kwh,
                                          'power_w', NEW.power_w, 'voltage_v', NEW.voltage_v,
                                          'current_a', NEW.current_a),
                       NEW.at);
    RETURN NULL;
END $$;
CREATE TRIGGER order_samples_emit AFTER INSERT ON order_samples
    FOR EACH ROW EXECUTE FUNCTION events_from_order_samples();

-- commands: their end (acked, failed by the device, dead)
CREATE FUNCTION events_from_commands() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('acked', 'failed', 'dead') THEN
        PERFORM emit_event('command.' || NEW.status, NEW.device_id, NULL, NEW.order_no,
                           NEW.command_id, NULL,
                           jsonb_build_object('name', NEW.name, 'attempts', NEW.attempts,
                                              'result_code', NEW.result_code,
                                              'result_text', NEW.result_text,
                                              'dead_reason', NEW.dead_reason),
                           coalesce(NEW.finished_at, now()), NULL, NEW.protocol);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER commands_emit AFTER UPDATE OF status ON commands
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION events_from_commands();

-- ports: each change of status (and a fault, as device.fault)
CREATE FUNCTION events_from_ports() RETURNS trigger LANGUAGE plpgsql AS $$
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
                       NEW.reported_at);
    IF NEW.status = 'fault' THEN
        PERFORM emit_event('device.fault', NEW.device_id, NEW.port, NULL, NULL, NULL, v_data,
                           NEW.reported_at);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ports_emit_insert AFTER INSERT ON ports
    FOR EACH ROW EXECUTE FUNCTION events_from_ports();
CREATE TRIGGER ports_emit_update AFTER UPDATE OF status ON ports
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION events_from_ports();

-- bans: placed (or extended), lifted by hand before they ran out
CREATE FUNCTION events_from_bans() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.until > now() THEN
            PERFORM emit_event('ban.lifted', OLD.device_id, NULL, NULL, NULL, NULL,
                               jsonb_build_object('reason', OLD.reason, 'until', OLD.until));
        END IF;
        RETURN NULL;
    END IF;
    PERFORM emit_event('ban.placed', NEW.device_id, NULL, NULL, NULL, NULL,
                       jsonb_build_object('reason', NEW.reason, 'until', NEW.until,
                                          'connects', NEW.connects));
    RETURN NULL;
END $$;
CREATE TRIGGER device_bans_emit AFTER INSERT OR UPDATE OR DELETE ON device_bans
    FOR EACH ROW EXECUTE FUNCTION events_from_bans();
