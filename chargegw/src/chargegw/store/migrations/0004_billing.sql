-- Billing: the card registry with its ledger, rate plans per device, and the priced
-- result of every settled order (amount and the inputs it was computed from).

CREATE TABLE cards (
    card_id         text PRIMARY KEY CHECK (card_id ~ '^([0-9A-F]{2}){1,32}$'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    balance_cent    bigint NOT NULL DEFAULT 0 CHECK (balance_cent >= 0),
    holder          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- append-only: every change of a card's balance, with the balance after it
CREATE TABLE card_transactions (
    id              bigserial PRIMARY KEY,
    card_id         text NOT NULL REFERENCES cards (card_id),
    kind            text NOT NULL CHECK (kind IN ('top_up', 'charge')),
    amount_cent     bigint NOT NULL,
    balance_after_cent bigint NOT NULL CHECK (balance_after_cent >= 0),
    order_no        text,
    shortfall_cent  bigint NOT NULL DEFAULT 0 CHECK (shortfall_cent >= 0),
    reference       text,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX card_transactions_card ON card_transactions (card_id, id);
-- an order is charged to a card once
CREATE UNIQUE INDEX card_transactions_order ON card_transactions (order_no)
    WHERE kind = 'charge';

CREATE TABLE rate_plans (
    name            text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('per_hour', 'per_kwh', 'power_tier', 'fee_tier')),
    parameters      jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_rate_plans (
    device_id       text PRIMARY KEY,
    plan            text NOT NULL REFERENCES rate_plans (name),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- one row per settled order: what it cost and why (the plan is copied into inputs)
CREATE TABLE order_charges (
    order_no        text PRIMARY KEY REFERENCES orders (order_no),
    plan            text,
    kind            text,
    inputs          jsonb NOT NULL,
    amount_cent     bigint NOT NULL CHECK (amount_cent >= 0),
    card_id         text,
    card_charged_cent bigint NOT NULL DEFAULT 0 CHECK (card_charged_cent >= 0),
    shortfall_cent  bigint NOT NULL DEFAULT 0 CHECK (shortfall_cent >= 0),
    settled_at      timestamptz NOT NULL,
    computed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_charges_settled ON order_charges (settled_at, order_no);
