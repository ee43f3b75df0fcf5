-- The shared schema of nproxy (docs/design.md §4) and nproxyd's own tables.
-- Every statement is idempotent: the web API may have created the shared tables already,
-- in which case only what is missing is created and nothing is rewritten.

CREATE TABLE IF NOT EXISTS users (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS subscription_plans (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    code text NOT NULL UNIQUE,
    display_name text NOT NULL,
    monthly_request_limit int NOT NULL,
    monthly_price_usd numeric(12, 2),
    billing_currency text NOT NULL
);

CREATE TABLE IF NOT EXISTS subscriptions (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    user_id text NOT NULL REFERENCES users (id),
    plan_id text NOT NULL REFERENCES subscription_plans (id),
    status text NOT NULL CHECK (status IN ('pending_activation', 'active', 'expired')),
    renews_manually boolean NOT NULL DEFAULT true,
    activated_at timestamptz,
    current_period_start timestamptz,
    current_period_end timestamptz,
    canceled_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payment_invoices (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    user_id text NOT NULL REFERENCES users (id),
    subscription_id text REFERENCES subscriptions (id),
    provider text NOT NULL,
    provider_invoice_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'paid', 'expired', 'canceled')),
    currency text NOT NULL,
    amount_crypto numeric(20, 8) NOT NULL,
    amount_usd numeric(12, 2) NOT NULL,
    payment_address text,
    expires_at timestamptz,
    paid_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS provider_keys (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    provider text NOT NULL,
    label text NOT NULL,
    status text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'cooldown', 'manual_review', 'disabled')),
    consecutive_failures int NOT NULL DEFAULT 0,
    cooldown_until timestamptz,
    last_error text,
    balance numeric,
    balance_checked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mail_outbox (
    id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    to_address text NOT NULL,
    subject text NOT NULL,
    body text NOT NULL,
    message_id text NOT NULL UNIQUE
        DEFAULT '<' || gen_random_uuid()::text || '@nproxyd.invalid>',
    dedupe_key text UNIQUE,
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);

-- nproxyd's lease on a mail row being delivered (constant defaults: no table rewrite).
ALTER TABLE mail_outbox ADD COLUMN IF NOT EXISTS lease_until timestamptz;
ALTER TABLE mail_outbox ADD COLUMN IF NOT EXISTS leased_by text NOT NULL DEFAULT '';
ALTER TABLE mail_outbox ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- One automatic renewal invoice per (subscription, paid cycle): the primary key is the
-- guarantee, whatever the number of instances. A slot is claimable when it is not done and
-- available_at has passed (a lease that elapsed, a backoff that ended, a failure's cool-off).
CREATE TABLE IF NOT EXISTS nproxyd_renewal_claims (
    subscription_id text NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    cycle_start timestamptz NOT NULL,
    order_id text NOT NULL UNIQUE,
    state text NOT NULL DEFAULT 'claimed'
        CHECK (state IN ('claimed', 'retry', 'failed', 'done')),
    token text NOT NULL DEFAULT '',
    holder text NOT NULL DEFAULT '',
    available_at timestamptz NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    last_error text,
    invoice_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, cycle_start)
);

CREATE INDEX IF NOT EXISTS nproxyd_renewal_claims_open
    ON nproxyd_renewal_claims (available_at) WHERE state <> 'done';

CREATE INDEX IF NOT EXISTS nproxyd_renewal_claims_token
    ON nproxyd_renewal_claims (token) WHERE state = 'claimed';

CREATE INDEX IF NOT EXISTS nproxyd_mail_outbox_due
    ON mail_outbox (next_attempt_at, id) WHERE status = 'pending';

CREATE INDEX IF NOT EXISTS nproxyd_mail_outbox_dead
    ON mail_outbox (id) WHERE status = 'dead';

CREATE INDEX IF NOT EXISTS nproxyd_provider_keys_cooldown
    ON provider_keys (cooldown_until) WHERE status = 'cooldown';

CREATE INDEX IF NOT EXISTS nproxyd_provider_keys_balance_due
    ON provider_keys (balance_checked_at NULLS FIRST, id) WHERE status = 'active';
