-- API keys created with `chargegw apikey create`. Only a hash of each key is stored
-- (`sha256:<hex>`): the key itself is shown once, when it is created.

CREATE TABLE api_keys (
    key_id          bigserial PRIMARY KEY,
    name            text NOT NULL,
    key_hash        text NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
