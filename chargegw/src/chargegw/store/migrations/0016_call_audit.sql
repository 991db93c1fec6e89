-- The audit trail of HTTP API calls (docs/partners.md, "Audit"): every call that may
-- change something (not GET/HEAD) made with a valid key, and every refused
-- authentication. Rows are written by the API process before the call's answer is sent
-- (chargegw.domain.call_audit) and removed after `call_audit_retention_days`.

CREATE TABLE call_audit (
    id              bigserial PRIMARY KEY,
    -- when the request arrived (the serving process's clock)
    at              timestamptz NOT NULL,
    -- the X-Request-Id answered with the call (the client's, or one made up)
    request_id      text NOT NULL,
    -- the key's identity as the key check gave it (NULL when it refused the key)
    key_id          text,
    key_name        text,
    -- the first 16 hex digits of the SHA-256 of the presented key: the start of its
    -- api_keys.key_hash, so a refused stored key (revoked, expired) can be named
    key_fingerprint text,
    -- why the key check refused the request (401/403), NULL when it passed
    auth_failure    text,
    source          text,
    method          text NOT NULL,
    path            text NOT NULL,
    query           text NOT NULL DEFAULT '',
    -- a JSON body with its secrets masked, when it is at most 8 KiB so masked; a longer
    -- one is cut to 8 KiB of masked JSON text in body_excerpt; other bodies: size only
    body            jsonb,
    body_excerpt    text,
    body_bytes      bigint NOT NULL DEFAULT 0,
    status          integer NOT NULL,
    duration_ms     double precision NOT NULL,
    -- what the call concerned and created (from its path and its JSON answer)
    device_id       text,
    order_nos       text[] NOT NULL DEFAULT '{}',
    command_ids     bigint[] NOT NULL DEFAULT '{}',
    job_ids         bigint[] NOT NULL DEFAULT '{}',
    resource_id     text
);
CREATE INDEX call_audit_at ON call_audit (at);
CREATE INDEX call_audit_key ON call_audit (key_id, id) WHERE key_id IS NOT NULL;
CREATE INDEX call_audit_device ON call_audit (device_id, id) WHERE device_id IS NOT NULL;
CREATE INDEX call_audit_orders ON call_audit USING gin (order_nos);
