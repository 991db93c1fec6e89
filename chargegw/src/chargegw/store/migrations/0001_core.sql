-- Core model: gateways (connections' owners), devices, ports, the device event log,
-- and the audit log of every frame, partitioned by day.

CREATE TABLE gateways (
    gateway_id      text PRIMARY KEY,
    protocol        text NOT NULL CHECK (protocol IN ('ap3000', 'bkv')),
    iccid           text,
    imei            text,
    firmware        text,
    online          boolean NOT NULL DEFAULT false,
    connection_id   text,
    node            text,
    remote_addr     text,
    connected_at    timestamptz,
    last_seen_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id       text PRIMARY KEY,
    protocol        text NOT NULL CHECK (protocol IN ('ap3000', 'bkv')),
    gateway_id      text REFERENCES gateways (gateway_id),
    phy_id          text,
    socket_no       integer,
    device_type     integer,
    firmware        text,
    port_count      integer,
    iccid           text,
    online          boolean NOT NULL DEFAULT false,
    offline_reason  text,
    connection_id   text,
    last_seen_at    timestamptz,
    last_heartbeat_at timestamptz,
    signal_strength integer,
    temperature_c   integer,
    voltage_v       double precision,
    attributes      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_protocol_online ON devices (protocol, online, device_id);
CREATE INDEX devices_gateway ON devices (gateway_id);

-- port is 1-based (the API's numbering); status is protocol neutral, status_code raw
CREATE TABLE ports (
    device_id       text NOT NULL REFERENCES devices (device_id),
    port            integer NOT NULL CHECK (port >= 1),
    status          text NOT NULL,
    status_code     integer,
    status_text     text,
    power_w         double precision,
    voltage_v       double precision,
    current_a       double precision,
    energy_kwh      double precision,
    temperature_c   integer,
    order_ref       text,
    reported_at     timestamptz NOT NULL,
    device_time     timestamptz,
    PRIMARY KEY (device_id, port)
);

-- append-only: online/offline transitions with reasons, registrations, alarms ...
CREATE TABLE device_events (
    id              bigserial PRIMARY KEY,
    device_id       text NOT NULL,
    at              timestamptz NOT NULL,
    kind            text NOT NULL,
    reason          text,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX device_events_device_at ON device_events (device_id, at, id);

-- every frame in and out; hex with ICCIDs and card numbers masked
CREATE TABLE frames (
    id              bigserial,
    received_at     timestamptz NOT NULL,
    connection_id   text NOT NULL,
    device_id       text,
    direction       text NOT NULL CHECK (direction IN ('in', 'out')),
    protocol        text,
    command         text,
    hex             text NOT NULL,
    error           text,
    PRIMARY KEY (received_at, id)
) PARTITION BY RANGE (received_at);
CREATE TABLE frames_default PARTITION OF frames DEFAULT;
CREATE INDEX frames_device_time ON frames (device_id, received_at, id);
