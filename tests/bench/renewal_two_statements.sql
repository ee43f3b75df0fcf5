-- The second reference of the renewal_vs_set_based benchmark: the same rows as
-- renewal_set_based.sql, written the way the protocol of docs/design.md §3 (invariants 1, 2
-- and 4) requires, in two set-based statements and two transactions: first the claims of every
-- due slot ('claimed', with a lease), committed before any provider call could happen; then
-- one statement completing the claims ('done') with the invoices and their mails. No provider
-- is called, nothing is batched: the physical limit of the protocol's writes.
-- The claim block takes $1 now and $2 the window end (now + lead time); the store block, after
-- the line "-- store --", takes $1 now.
WITH due AS MATERIALIZED (
    SELECT s.id AS subscription_id,
           coalesce(s.current_period_start, s.activated_at, s.created_at) AS cycle_start
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
)
INSERT INTO nproxyd_renewal_claims AS c
    (subscription_id, cycle_start, order_id, state, token, holder, available_at, attempts,
     created_at, updated_at)
SELECT subscription_id, cycle_start,
       'renewal-' || subscription_id || '-' || (extract(epoch FROM cycle_start) * 1000000)::bigint,
       'claimed', 'reference', 'reference', $1 + interval '5 minutes', 1, $1, $1
FROM due
ON CONFLICT (subscription_id, cycle_start) DO NOTHING;
-- store --
WITH due AS MATERIALIZED (
    SELECT c.subscription_id, c.cycle_start, s.user_id, s.current_period_end, u.email,
           p.monthly_price_usd AS amount, p.billing_currency AS currency,
           gen_random_uuid()::text AS invoice_id,
           replace(gen_random_uuid()::text, '-', '') AS token
    FROM nproxyd_renewal_claims AS c
    JOIN subscriptions AS s ON s.id = c.subscription_id
    JOIN users AS u ON u.id = s.user_id
    JOIN subscription_plans AS p ON p.id = s.plan_id
    WHERE c.state = 'claimed' AND c.token = 'reference'
), completed AS (
    UPDATE nproxyd_renewal_claims AS c
    SET state = 'done', invoice_id = d.invoice_id, token = '', available_at = $1, updated_at = $1
    FROM due AS d
    WHERE c.subscription_id = d.subscription_id AND c.cycle_start = d.cycle_start
      AND c.state = 'claimed' AND c.token = 'reference'
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
SELECT (SELECT count(*) FROM completed) AS claims,
       (SELECT count(*) FROM invoices) AS invoices,
       (SELECT count(*) FROM mails) AS mails;
