-- renewal_candidates --
-- One keyset batch of subscriptions that need a renewal invoice now; :window_end is now + lead, (:after_period_end, :after_id) the keyset cursor, :size the batch size. Excludes slots with an invoice in the cycle or a claim that is done or not yet available. A cycle start Python cannot represent (±infinity, BC, year 10000 or later) is never returned: such a row comes back with cycle_start NULL and unreadable naming the column, so the batch proceeds without it (current_period_end is always within the finite window).
SELECT
    s.id AS subscription_id,
    s.user_id,
    s.current_period_end,
    CASE WHEN x.readable THEN x.cycle_start END AS cycle_start,
    CASE WHEN NOT x.readable THEN x.cycle_column END AS unreadable,
    u.email,
    p.code AS plan_code,
    p.monthly_price_usd,
    p.billing_currency
FROM subscriptions AS s
CROSS JOIN LATERAL (
    SELECT c.cycle_start,
           c.cycle_column,
           isfinite(c.cycle_start)
           AND c.cycle_start >= '0001-01-01 00:00:00+00'::timestamptz
           AND c.cycle_start < '10000-01-01 00:00:00+00'::timestamptz AS readable
    FROM (SELECT coalesce(s.current_period_start, s.activated_at, s.created_at) AS cycle_start,
                 CASE WHEN s.current_period_start IS NOT NULL THEN 'current_period_start'
                      WHEN s.activated_at IS NOT NULL THEN 'activated_at'
                      ELSE 'created_at' END AS cycle_column) AS c
) AS x
JOIN users AS u ON u.id = s.user_id
JOIN subscription_plans AS p ON p.id = s.plan_id
WHERE s.status = 'active'
  AND s.renews_manually
  AND s.current_period_end > :now
  AND s.current_period_end <= :window_end
  AND (s.current_period_end, s.id) > (:after_period_end::timestamptz, :after_id::text)
  AND NOT EXISTS (
      SELECT 1 FROM payment_invoices AS i
      WHERE i.subscription_id = s.id
        AND i.created_at >= x.cycle_start
  )
  AND NOT EXISTS (
      SELECT 1 FROM nproxyd_renewal_claims AS c
      WHERE c.subscription_id = s.id
        AND c.cycle_start = x.cycle_start
        AND (c.state = 'done' OR c.available_at > :now)
  )
ORDER BY s.current_period_end, s.id
LIMIT :size;

-- renewal_retry_floor --
-- The earliest period end in the window ($1 now, $2 window end) of a subscription whose current cycle has an open claim available again at $1 (a retry due, a lease elapsed) and no invoice yet (one the web API made settles the cycle as the candidate query does), or NULL: the renewal scheduler examines the window again from there. Driven by the open claims due (their partial index); each looks up its subscription by primary key in a subquery the planner cannot turn into a scan of the window.
SELECT min((
    SELECT s.current_period_end
    FROM subscriptions AS s
    WHERE s.id = c.subscription_id
      AND s.status = 'active'
      AND s.renews_manually
      AND s.current_period_end > $1
      AND s.current_period_end <= $2
      AND c.cycle_start = coalesce(s.current_period_start, s.activated_at, s.created_at)
      AND NOT EXISTS (
          SELECT 1 FROM payment_invoices AS i
          WHERE i.subscription_id = s.id
            AND i.created_at >= c.cycle_start
      )
))
FROM nproxyd_renewal_claims AS c
WHERE c.state <> 'done'
  AND c.available_at <= $1;

-- claim_renewal_slots --
-- Claim (subscription, cycle) slots, one per element of the arrays, until :lease_until. Returns the slots this call won.
-- The set_config before the first row lets the foreign-key check of each row reuse its cached
-- plan (plan_cache_mode auto, for this statement's transaction only); the statement itself was
-- planned per execution, as the pool plans every statement (docs/design.md §1, store).
INSERT INTO nproxyd_renewal_claims AS c
    (subscription_id, cycle_start, order_id, state, token, holder, available_at, attempts,
     created_at, updated_at)
SELECT t.subscription_id, t.cycle_start, t.order_id, 'claimed', :token, :holder, :lease_until, 1,
    :now, :now
FROM unnest(:subscription_ids::text[], :cycle_starts::timestamptz[], :order_ids::text[])
    AS t(subscription_id, cycle_start, order_id)
WHERE (SELECT set_config('plan_cache_mode', 'auto', true)) = 'auto'
ON CONFLICT (subscription_id, cycle_start) DO UPDATE
SET state = 'claimed',
    token = excluded.token,
    holder = excluded.holder,
    available_at = excluded.available_at,
    attempts = c.attempts + 1,
    updated_at = excluded.updated_at
WHERE c.state <> 'done' AND c.available_at <= :now
RETURNING c.subscription_id, c.cycle_start, c.order_id, c.attempts;

-- commit_renewal_invoices --
-- Store invoices and their mail and complete their claims, fenced by claim token, in one statement; a slot whose cycle gained an invoice meanwhile is completed as superseded. The arrays hold one element per invoice; :subject is the mail subject of all. Returns the completed slots.
-- The claims are reached through their primary key, as in release_renewal_claims below. The
-- foreign-key checks of the invoices reuse their plans, as in claim_renewal_slots above.
WITH t AS (
    SELECT u.*, batch.held_state
    FROM (
        SELECT :subscription_ids::text[], :cycle_starts::timestamptz[], :tokens::text[],
               :invoice_ids::text[], :user_ids::text[], :provider_invoice_ids::text[],
               :currencies::text[], :amounts::numeric[], :payment_addresses::text[],
               :expires_at::timestamptz[], :to_addresses::text[], :bodies::text[],
               :message_ids::text[], 'claimed'::text
        OFFSET 0
    ) AS batch(subscription_ids, cycle_starts, tokens, invoice_ids, user_ids,
               provider_invoice_ids, currencies, amounts, payment_addresses, expires_at,
               to_addresses, bodies, message_ids, held_state)
    CROSS JOIN LATERAL unnest(
        batch.subscription_ids, batch.cycle_starts, batch.tokens, batch.invoice_ids,
        batch.user_ids, batch.provider_invoice_ids, batch.currencies, batch.amounts,
        batch.payment_addresses, batch.expires_at, batch.to_addresses, batch.bodies,
        batch.message_ids
    ) AS u(subscription_id, cycle_start, token, invoice_id, user_id, provider_invoice_id,
           currency, amount, payment_address, expires_at, to_address, body, message_id)
), checked AS MATERIALIZED (
    SELECT t.*, EXISTS (
        SELECT 1 FROM payment_invoices AS i
        WHERE i.subscription_id = t.subscription_id AND i.created_at >= t.cycle_start
    ) AS superseded
    FROM t
), completed AS (
    UPDATE nproxyd_renewal_claims AS c
    SET state = 'done',
        invoice_id = CASE WHEN x.superseded THEN NULL ELSE x.invoice_id END,
        last_error = CASE WHEN x.superseded
                          THEN 'superseded: the cycle already has an invoice' END,
        token = '',
        available_at = :now,
        updated_at = :now
    FROM checked AS x
    WHERE c.subscription_id = x.subscription_id
      AND c.cycle_start = x.cycle_start
      AND c.state = x.held_state
      AND c.token = x.token
    RETURNING c.subscription_id, c.cycle_start, x.superseded
), stored AS (
    SELECT t.* FROM t
    JOIN completed AS d USING (subscription_id, cycle_start)
    WHERE NOT d.superseded
), invoices AS (
    INSERT INTO payment_invoices
        (id, user_id, subscription_id, provider, provider_invoice_id, status, currency,
         amount_crypto, amount_usd, payment_address, expires_at, created_at, updated_at)
    SELECT invoice_id, user_id, subscription_id, :provider, provider_invoice_id, 'pending',
           currency,
           amount, amount, payment_address, expires_at, :now, :now
    FROM stored
), mails AS (
    INSERT INTO mail_outbox
        (to_address, subject, body, message_id, dedupe_key, next_attempt_at, created_at,
         updated_at)
    SELECT to_address, :subject, body, message_id, 'renewal-invoice:' || invoice_id,
           :now, :now, :now
    FROM stored
)
SELECT subscription_id, superseded FROM completed
WHERE (SELECT set_config('plan_cache_mode', 'auto', true)) = 'auto';

-- release_renewal_claims --
-- Give claims back after a provider failure, fenced by token; :states are 'retry' or 'failed', one element per slot in each array.
-- The slots reach the claims through their primary key, one probe each, whatever the size of
-- the table: the arrays come from a subquery the planner does not flatten (OFFSET 0), and the
-- held state is a column of it, not a constant that would let a partial index of every claimed
-- row drive the join (docs/design.md §6).
UPDATE nproxyd_renewal_claims AS c
SET state = t.state,
    available_at = t.available_at,
    last_error = t.error,
    token = '',
    holder = '',
    updated_at = :now
FROM (
    SELECT released.*, batch.held_state
    FROM (
        SELECT :subscription_ids::text[], :cycle_starts::timestamptz[], :tokens::text[],
               :states::text[], :available_at::timestamptz[], :errors::text[], 'claimed'::text
        OFFSET 0
    ) AS batch(subscription_ids, cycle_starts, tokens, states, available_at, errors,
               held_state)
    CROSS JOIN LATERAL unnest(
        batch.subscription_ids, batch.cycle_starts, batch.tokens, batch.states,
        batch.available_at, batch.errors
    ) AS released(subscription_id, cycle_start, token, state, available_at, error)
) AS t
WHERE c.subscription_id = t.subscription_id
  AND c.cycle_start = t.cycle_start
  AND c.state = t.held_state
  AND c.token = t.token;

-- extend_renewal_claims --
-- Extend the lease of the slots still claimed with this token; $1 token, $2 lease until.
UPDATE nproxyd_renewal_claims
SET available_at = $2
WHERE token = $1 AND state = 'claimed';
