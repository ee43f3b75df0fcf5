-- The reference of the renewal_vs_set_based benchmark: everything one renewal tick writes for
-- the due subscriptions, in one set-based statement. The same selection as the scheduler's
-- candidate query (active, manual, ending in ($1, $2], no invoice in the cycle, no claim), then
-- per slot a done claim, a pending invoice and its renewal mail, with bodies, ids and payment
-- addresses of the same shape and size as the simulated provider's. No provider is called and
-- no claim is taken before it: this is the physical limit of the writes, not a design.
-- $1 now, $2 window end (now + lead time).
WITH due AS MATERIALIZED (
    SELECT s.id AS subscription_id,
           s.user_id,
           s.current_period_end,
           coalesce(s.current_period_start, s.activated_at, s.created_at) AS cycle_start,
           u.email,
           p.monthly_price_usd AS amount,
           p.billing_currency AS currency,
           gen_random_uuid()::text AS invoice_id,
           replace(gen_random_uuid()::text, '-', '') AS token
    FROM subscriptions AS s
    JOIN users AS u ON u.id = s.user_id
    JOIN subscription_plans AS p ON p.id = s.plan_id
    WHERE s.status = 'active'
      AND s.renews_manually
      AND s.current_period_end > $1
      AND s.current_period_end <= $2
      AND NOT EXISTS (
          SELECT 1 FROM payment_invoices AS i
          WHERE i.subscription_id = s.id
            AND i.created_at >= coalesce(s.current_period_start, s.activated_at, s.created_at)
      )
      AND NOT EXISTS (
          SELECT 1 FROM nproxyd_renewal_claims AS c
          WHERE c.subscription_id = s.id
            AND c.cycle_start = coalesce(s.current_period_start, s.activated_at, s.created_at)
      )
), claims AS (
    INSERT INTO nproxyd_renewal_claims
        (subscription_id, cycle_start, order_id, state, token, holder, available_at, attempts,
         invoice_id, created_at, updated_at)
    SELECT subscription_id, cycle_start,
           'renewal-' || subscription_id || '-'
               || (extract(epoch FROM cycle_start) * 1000000)::bigint,
           'done', '', 'reference', $1, 1, invoice_id, $1, $1
    FROM due
    RETURNING 1
), invoices AS (
    INSERT INTO payment_invoices
        (id, user_id, subscription_id, provider, provider_invoice_id, status, currency,
         amount_crypto, amount_usd, payment_address, expires_at, created_at, updated_at)
    SELECT invoice_id, user_id, subscription_id, 'simulated', 'sim_' || token, 'pending',
           currency, amount, amount, 'sim_addr_' || token, $1 + interval '24 hours', $1, $1
    FROM due
    RETURNING 1
), mails AS (
    INSERT INTO mail_outbox
        (to_address, subject, body, message_id, dedupe_key, next_attempt_at, created_at,
         updated_at)
    SELECT email, 'Your nproxy subscription renewal invoice',
           concat_ws(E'\n',
               'Your current subscription period is ending soon.',
               'Current access ends at '
                   || to_char(current_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
                   || ' UTC.',
               'Invoice amount: ' || amount || ' ' || currency || '.',
               'Payment address: sim_addr_' || token || '.',
               'Invoice expires at '
                   || to_char(($1 + interval '24 hours') AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
                   || ' UTC.',
               'Open billing: https://app.nproxy.example/billing'),
           '<' || replace(gen_random_uuid()::text, '-', '') || '@nproxy.example>',
           'renewal-invoice:' || invoice_id, $1, $1, $1
    FROM due
    RETURNING 1
)
SELECT (SELECT count(*) FROM claims) AS claims,
       (SELECT count(*) FROM invoices) AS invoices,
       (SELECT count(*) FROM mails) AS mails;
