-- Scale-out: gateway processes (nodes/workers), the session directory, flapping bans,
-- and command claims.

-- One row per gateway process. "owner" = node/worker/pid: a restarted worker is a new
-- owner, so nothing it held before the restart looks held.
CREATE TABLE cluster_processes (
    owner           text PRIMARY KEY,
    node            text NOT NULL,
    worker          integer NOT NULL,
    pid             integer NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    connections     integer NOT NULL DEFAULT 0,
    devices         integer NOT NULL DEFAULT 0,
    max_connections integer NOT NULL DEFAULT 0,
    draining        boolean NOT NULL DEFAULT false,
    stopped_at      timestamptz,
    -- connections this process is asked to shed (rebalance), and how fast
    shed_remaining  integer NOT NULL DEFAULT 0,
    shed_rate       double precision NOT NULL DEFAULT 0,
    device_listen   text,
    http_listen     text
);

-- Which process holds which device's connection. owner NULL: nobody (offline).
-- connects/window_start count (re)connections for flapping detection.
CREATE TABLE device_sessions (
    device_id       text PRIMARY KEY,
    owner           text,
    connection_id   text,
    remote_addr     text,
    since           timestamptz NOT NULL,
    released_at     timestamptz,
    window_start    timestamptz NOT NULL,
    connects        integer NOT NULL DEFAULT 1
);
CREATE INDEX device_sessions_owner ON device_sessions (owner) WHERE owner IS NOT NULL;

-- Devices refused for a while because they reconnect too often (or banned by hand).
CREATE TABLE device_bans (
    device_id       text PRIMARY KEY,
    until           timestamptz NOT NULL,
    reason          text NOT NULL,
    connects        integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The process that claimed a command (only the owner of the device's connection may).
ALTER TABLE commands ADD COLUMN claimed_by text;
CREATE INDEX commands_expiring ON commands (expires_at) WHERE status IN ('pending', 'sent');
