-- Data safety (issue 11): directory in database time, dead letters, money in bigint,
-- one open order per port, scoped idempotency keys, commands ordered after others,
-- message ids that never repeat per device.

-- The session directory: "since" orders binds (database time); "updated_at" is when the
-- row last changed, which the processes scan to notice binds of other processes.
ALTER TABLE device_sessions ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
-- the process an entry was taken from by the sweep (it may come back and re-assert it)
ALTER TABLE device_sessions ADD COLUMN lost_owner text;
DROP INDEX IF EXISTS device_sessions_since;
CREATE INDEX device_sessions_updated ON device_sessions (updated_at);

-- which process holds a gateway's connection (marked offline when that process is lost)
ALTER TABLE gateways ADD COLUMN owner text;

-- Rows the database refused for their own values (class 22/23), kept instead of dropped.
CREATE TABLE rejected_rows (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    table_name  text NOT NULL,
    row_key     text,
    row_data    jsonb NOT NULL,
    error       text NOT NULL,
    sqlstate    text
);
CREATE INDEX rejected_rows_at ON rejected_rows (at);

-- Money: amounts never overflow; a settlement that cannot be priced is kept for review.
ALTER TABLE orders ALTER COLUMN amount_cent TYPE bigint;
ALTER TABLE orders ALTER COLUMN balance_cent TYPE bigint;
ALTER TABLE orders
    ADD COLUMN device_ref text,          -- the session id the device reported (AP3000 order id)
    ADD COLUMN pricing_error text,       -- why the settlement could not be priced
    ADD COLUMN review_reason text,       -- why a person should look at this order
    ADD COLUMN max_power_source text;    -- settlement, samples or none
CREATE INDEX orders_review ON orders (created_at, order_no) WHERE review_reason IS NOT NULL;
-- settled sessions of a port, for recognising a resent settlement
CREATE INDEX orders_settled_port ON orders (device_id, port, ended_at) WHERE status = 'settled';
CREATE INDEX orders_device_ref ON orders (device_id, device_ref) WHERE device_ref IS NOT NULL;

-- One open order per port among the orders the platform starts (API, card swipes): two
-- concurrent starts cannot both open one. Of duplicates from before this rule, the most
-- advanced one stays open (charging or stopping before starting before pending, then the
-- newest); the others end failed, marked for review, and their unsent commands die.
CREATE TEMPORARY TABLE superseded_orders ON COMMIT DROP AS
SELECT order_no FROM (
    SELECT order_no, row_number() OVER (
               PARTITION BY device_id, port
               ORDER BY CASE status WHEN 'stopping' THEN 0 WHEN 'charging' THEN 0
                                    WHEN 'starting' THEN 1 ELSE 2 END,
                        created_at DESC, order_no DESC) AS rank
      FROM orders
     WHERE status IN ('pending', 'starting', 'charging', 'stopping') AND NOT device_initiated
) ranked WHERE rank > 1;
UPDATE commands SET status = 'dead', dead_reason = 'superseded (migration 0011)',
       finished_at = now()
 WHERE order_no IN (SELECT order_no FROM superseded_orders) AND status = 'pending';
UPDATE orders SET status = 'failed', updated_at = now(),
       failure_reason = 'superseded: another order was open on the port (migration 0011)',
       review_reason = 'open at the same time as another order on the port (migration 0011)'
 WHERE order_no IN (SELECT order_no FROM superseded_orders);
CREATE UNIQUE INDEX orders_one_open_per_port ON orders (device_id, port)
    WHERE status IN ('pending', 'starting', 'charging', 'stopping') AND NOT device_initiated;

-- Idempotency keys belong to the API key that used them and remember the request.
ALTER TABLE idempotency_keys
    ADD COLUMN scope text NOT NULL DEFAULT '',   -- a hash of the API key ('' without one)
    ADD COLUMN request jsonb;                    -- device, port and a digest of the body
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (scope, key);

-- a top-up with a reference is applied once per card
CREATE INDEX card_transactions_reference ON card_transactions (card_id, reference)
    WHERE kind = 'top_up' AND reference IS NOT NULL;

-- a command that waits for another one's outcome (a stop for a start in flight)
ALTER TABLE commands ADD COLUMN after_command bigint;

-- the last message id (AP3000) / seq (BKV) used per device: never repeated, across restarts
CREATE TABLE device_correlations (
    device_id   text PRIMARY KEY,
    last        integer NOT NULL
);
