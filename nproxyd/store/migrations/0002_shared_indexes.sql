-- nproxyd:no-transaction
-- Indexes for due rows on tables the web API shares and that may be large: built
-- CONCURRENTLY so writers are never blocked for long.

CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_payment_invoices_pending_expiry
    ON payment_invoices (expires_at, id)
    WHERE status = 'pending' AND expires_at IS NOT NULL;

CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_payment_invoices_subscription_created
    ON payment_invoices (subscription_id, created_at)
    WHERE subscription_id IS NOT NULL;

CREATE INDEX CONCURRENTLY IF NOT EXISTS nproxyd_subscriptions_renewal_due
    ON subscriptions (current_period_end, id)
    WHERE status = 'active' AND renews_manually;
