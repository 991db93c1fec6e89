-- Sessions of the operator console (docs/console.md): a browser signs in with an API key
-- and holds a random session token in an HttpOnly cookie. The row keeps the SHA-256 of
-- the token (never the token) and the hash of the key (as api_keys.key_hash, never the
-- key), so every request is checked against the key as it is now: a revoked or expired
-- key ends its sessions at once. Any worker serves any session.

CREATE TABLE console_sessions (
    token_hash      text PRIMARY KEY,
    key_hash        text NOT NULL,
    -- sent back in X-CSRF-Token on every request that changes something
    csrf_token      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- absolute end of the session; signing in again makes a new one
    expires_at      timestamptz NOT NULL,
    -- a session unused for `console_idle_timeout_s` ends too
    last_used_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);

-- the overview counts the open orders (sessions charging now) without reading them all
CREATE INDEX orders_open ON orders (status)
    WHERE status IN ('pending', 'starting', 'charging', 'stopping');
