-- API keys fit for partners: scopes, limits on devices, gateways and networks, expiry,
-- rotation, optional request signing; and the nonces of signed requests.
--
-- Keys stored before this migration keep working as before: they get every scope and no
-- limits. Every change that can make a key refuse requests (revoked, expiry, scopes,
-- limits) is announced on `chargegw_api_keys` with the key id, so each process drops what
-- it cached of the key at once (domain/auth.py KeyListener).

ALTER TABLE api_keys
    ADD COLUMN scopes text[] NOT NULL
        DEFAULT ARRAY['read', 'control', 'billing', 'config', 'admin']
        CHECK (cardinality(scopes) > 0
               AND scopes <@ ARRAY['read', 'control', 'billing', 'config', 'admin']),
    -- NULL: any; a device is allowed when it is listed or its gateway is
    ADD COLUMN allowed_device_ids text[],
    ADD COLUMN allowed_gateway_ids text[],
    -- NULL: any source address
    ADD COLUMN allowed_networks cidr[],
    ADD COLUMN expires_at timestamptz,
    -- the key this one replaced (POST /api/v1/api-keys/{id}/rotate)
    ADD COLUMN rotated_from bigint REFERENCES api_keys (key_id),
    ADD COLUMN hmac_required boolean NOT NULL DEFAULT false,
    -- the key's first characters (cgw_ and 4 more), to recognise it in lists; NULL for
    -- keys made before this migration
    ADD COLUMN key_prefix text;
-- new keys name their scopes
ALTER TABLE api_keys ALTER COLUMN scopes DROP DEFAULT;

CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('chargegw_api_keys', coalesce(NEW.key_id, OLD.key_id)::text);
    RETURN NULL;
END $$;

-- last_used_at is left out: it changes all the time and changes nothing a check decides
CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.scopes IS DISTINCT FROM NEW.scopes
          OR OLD.allowed_device_ids IS DISTINCT FROM NEW.allowed_device_ids
          OR OLD.allowed_gateway_ids IS DISTINCT FROM NEW.allowed_gateway_ids
          OR OLD.allowed_networks IS DISTINCT FROM NEW.allowed_networks
          OR OLD.hmac_required IS DISTINCT FROM NEW.hmac_required
          OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION api_keys_notify();
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();

-- the ids (`x-chargegw-id`) of signed requests seen lately, per key: a second request with
-- the same id is a replay, whichever process it reaches. Rows older than the signature
-- window (and a margin for clocks) are deleted by every process's key listener.
CREATE TABLE api_request_nonces (
    key_ref     text NOT NULL,
    nonce       text NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_ref, nonce)
);
CREATE INDEX api_request_nonces_seen ON api_request_nonces (seen_at);
