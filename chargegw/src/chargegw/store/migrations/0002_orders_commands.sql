-- Charging sessions (orders) and the command outbox.

CREATE TABLE orders (
    order_no            text PRIMARY KEY,
    device_id           text NOT NULL,
    port                integer NOT NULL CHECK (port >= 1),
    protocol            text NOT NULL CHECK (protocol IN ('ap3000', 'bkv')),
    status              text NOT NULL CHECK (status IN
                            ('pending', 'starting', 'charging', 'stopping', 'settled',
                             'failed', 'cancelled')),
    start_mode          text NOT NULL DEFAULT 'online'
                            CHECK (start_mode IN ('online', 'card', 'code', 'device')),
    device_initiated    boolean NOT NULL DEFAULT false,
    mode                text CHECK (mode IN ('full', 'time', 'energy')),
    requested_duration_min integer,
    requested_energy_kwh double precision,
    balance_cent        integer,
    card_id             text,
    business_no         integer,
    start_command_id    bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    ended_at            timestamptz,
    device_ended_at     timestamptz,
    duration_s          integer,
    energy_kwh          double precision,
    max_power_w         double precision,
    stop_reason         text,
    stop_reason_code    integer,
    stop_reason_text    text,
    failure_reason      text,
    amount_cent         integer,
    settlement          jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_device_status ON orders (device_id, port, status);
CREATE INDEX orders_created ON orders (created_at, order_no);

CREATE TABLE order_samples (
    id                  bigserial PRIMARY KEY,
    order_no            text NOT NULL REFERENCES orders (order_no),
    at                  timestamptz NOT NULL,
    duration_s          integer,
    energy_kwh          double precision,
    power_w             double precision,
    voltage_v           double precision,
    current_a           double precision
);
CREATE INDEX order_samples_order ON order_samples (order_no, at, id);

-- every command is a row before it is a byte on a socket
CREATE TABLE commands (
    command_id          bigserial PRIMARY KEY,
    device_id           text NOT NULL,
    protocol            text NOT NULL CHECK (protocol IN ('ap3000', 'bkv')),
    name                text NOT NULL,
    params              jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority            integer NOT NULL,
    status              text NOT NULL CHECK (status IN ('pending', 'sent', 'acked', 'failed', 'dead')),
    correlation         integer,
    attempts            integer NOT NULL DEFAULT 0,
    order_no            text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    sent_at             timestamptz,
    finished_at         timestamptz,
    result_code         integer,
    result_text         text,
    dead_reason         text,
    reply               jsonb
);
CREATE INDEX commands_open ON commands (device_id, priority, command_id)
    WHERE status IN ('pending', 'sent');
CREATE INDEX commands_finished ON commands (finished_at) WHERE status IN ('acked', 'failed', 'dead');

-- one API request, one result, however often it is repeated
CREATE TABLE idempotency_keys (
    key                 text PRIMARY KEY,
    order_no            text,
    command_id          bigint,
    created_at          timestamptz NOT NULL DEFAULT now()
);
