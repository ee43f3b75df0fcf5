-- nproxyd:no-transaction
-- The payment watcher's own tables (docs/design.md: what the provider reports about each
-- invoice's payment) and the indexes it reads payment_invoices through. payment_invoices and
-- subscriptions are never written here: activation belongs to the web API's admin. Every
-- statement is idempotent; indexes on the shared table are built CONCURRENTLY.

CREATE TABLE IF NOT EXISTS nproxyd_invoice_payments (
    invoice_id text PRIMARY KEY REFERENCES payment_invoices (id) ON DELETE CASCADE,
    provider text NOT NULL,
    provider_payment_id text NOT NULL,
    provider_status text,
    actually_paid numeric,
    pay_amount numeric,
    pay_currency text,
    outcome_amount numeric,
    outcome_currency text,
    provider_updated_at timestamptz,
    status_since timestamptz,
    awaiting boolean NOT NULL DEFAULT false,
    last_checked_at timestamptz,
    last_notified_at timestamptz,
    next_check_at timestamptz,
    attempts int NOT NULL DEFAULT 0,
    quiet_checks int NOT NULL DEFAULT 0,
    failures int NOT NULL DEFAULT 0,
    last_outcome text,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS nproxyd_invoice_payments_due
    ON nproxyd_invoice_payments (next_check_at, invoice_id) WHERE next_check_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS nproxyd_invoice_payments_awaiting
    ON nproxyd_invoice_payments (status_since, invoice_id) WHERE awaiting;

CREATE TABLE IF NOT EXISTS nproxyd_invoice_payment_history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invoice_id text NOT NULL REFERENCES nproxyd_invoice_payments (invoice_id) ON DELETE CASCADE,
    at timestamptz NOT NULL,
    from_status text,
    to_status text NOT NULL,
    source text NOT NULL CHECK (source IN ('poll', 'ipn')),
    provider_updated_at timestamptz
);

CREATE INDEX IF NOT EXISTS nproxyd_invoice_payment_history_invoice
    ON nproxyd_invoice_payment_history (invoice_id, at, id);

-- Invoices to start following: pending ones, and ones that ended within the grace period.
CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_payment_invoices_pending_provider
    ON payment_invoices (provider, id) WHERE status = 'pending';

CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_payment_invoices_ended
    ON payment_invoices (provider, updated_at) WHERE status IN ('expired', 'canceled');

-- An instant payment notification names the provider's payment id.
CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_payment_invoices_provider_ref
    ON payment_invoices (provider, provider_invoice_id);
