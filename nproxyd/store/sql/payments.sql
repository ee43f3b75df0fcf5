-- discover_payment_invoices --
-- Start following the invoices of one provider that are pending, or expired/canceled within the grace period; $1 provider, $2 now, $3 grace in seconds. Returns no rows: the command tag counts the invoices newly followed (a tick that follows thousands holds no list of them).
-- The foreign-key checks of the rows reuse their cached plans (plan_cache_mode auto for this
-- statement's transaction, set before the first row), as in claim_renewal_slots.
INSERT INTO nproxyd_invoice_payments
    (invoice_id, provider, provider_payment_id, next_check_at, created_at, updated_at)
SELECT found.id, found.provider, found.provider_invoice_id, $2, $2, $2
FROM (
    SELECT p.id, p.provider, p.provider_invoice_id
    FROM payment_invoices AS p
    WHERE p.provider = $1 AND p.status = 'pending'
    UNION ALL
    SELECT p.id, p.provider, p.provider_invoice_id
    FROM payment_invoices AS p
    WHERE p.provider = $1
      AND p.status IN ('expired', 'canceled')
      AND p.updated_at > $2::timestamptz - $3::float8 * interval '1 second'
) AS found
WHERE NOT EXISTS (SELECT 1 FROM nproxyd_invoice_payments AS w WHERE w.invoice_id = found.id)
  AND (SELECT set_config('plan_cache_mode', 'auto', true)) = 'auto'
ON CONFLICT (invoice_id) DO NOTHING;

-- claim_due_payment_checks --
-- Lease one batch of due checks to this tick (oldest due first) and retire the invoices no longer followed (paid, or ended longer than the grace ago); $1 now, $2 lease until, $3 batch size, $4 grace in seconds. Returns every claimed row with `follow`; a `created_at` Python cannot represent (±infinity, BC, year 10000) as NULL.
WITH due AS (
    SELECT w.invoice_id
    FROM nproxyd_invoice_payments AS w
    WHERE w.next_check_at IS NOT NULL AND w.next_check_at <= $1
    ORDER BY w.next_check_at, w.invoice_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), judged AS (
    SELECT d.invoice_id,
        (p.status = 'pending'
            OR (p.status IN ('expired', 'canceled')
                AND p.updated_at > $1::timestamptz - $4::float8 * interval '1 second')) AS follow
    FROM due AS d
    JOIN payment_invoices AS p ON p.id = d.invoice_id
), claimed AS (
    UPDATE nproxyd_invoice_payments AS w
    SET next_check_at = CASE WHEN j.follow THEN $2::timestamptz END, updated_at = $1
    FROM judged AS j
    WHERE w.invoice_id = j.invoice_id
    RETURNING w.invoice_id, w.provider_payment_id, w.provider_status, w.quiet_checks,
        w.failures, j.follow
)
SELECT c.invoice_id, c.provider_payment_id, c.provider_status, c.quiet_checks, c.failures,
    c.follow,
    CASE WHEN p.created_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'
        THEN p.created_at END AS created_at,
    p.amount_crypto, p.currency, u.email AS user_email, pl.code AS plan_code
FROM claimed AS c
JOIN payment_invoices AS p ON p.id = c.invoice_id
LEFT JOIN users AS u ON u.id = p.user_id
LEFT JOIN subscriptions AS s ON s.id = p.subscription_id
LEFT JOIN subscription_plans AS pl ON pl.id = s.plan_id
ORDER BY c.invoice_id;

-- record_payment_results --
-- Record check results or notifications: an answer older than the stored one (by the provider's updated_at) never replaces it; provider_payment_id is never changed by an answer (:payment_ids are what the answers said); a status change gets a history row and, the first time it is an awaiting status of an invoice not yet paid, one operator mail; the arrays hold one element per result (:statuses NULL: no answer), :source is 'poll' or 'ipn', :operator_email may be NULL. Returns the status changes.
-- The foreign-key checks of the history rows reuse their cached plans, as in discover above.
WITH input AS (
    SELECT *
    FROM unnest(:invoice_ids::text[], :outcomes::text[], :payment_ids::text[],
        :statuses::text[], :actually_paid::numeric[], :pay_amounts::numeric[],
        :pay_currencies::text[], :outcome_amounts::numeric[], :outcome_currencies::text[],
        :provider_updated_at::timestamptz[], :errors::text[], :next_check_at::timestamptz[],
        :quiet_checks::int[], :failures::int[], :mail_subjects::text[], :mail_bodies::text[],
        :mail_message_ids::text[])
        AS t(invoice_id, outcome, payment_id, status, actually_paid, pay_amount, pay_currency,
            outcome_amount, outcome_currency, provider_updated_at, error, next_check_at,
            quiet_checks, failures, subject, body, message_id)
), locked AS (
    -- Locked first (in id order): a notification and a poll of one invoice are applied one
    -- after the other, each comparing with what the other wrote.
    SELECT w.invoice_id, w.provider_status, w.provider_updated_at
    FROM nproxyd_invoice_payments AS w
    WHERE w.invoice_id IN (SELECT invoice_id FROM input)
    ORDER BY w.invoice_id
    FOR UPDATE
), decided AS (
    SELECT i.*, l.provider_status AS old_status,
        (i.status IS NOT NULL
            AND (l.provider_updated_at IS NULL
                OR (i.provider_updated_at IS NOT NULL
                    AND i.provider_updated_at >= l.provider_updated_at))) AS fresh
    FROM input AS i
    JOIN locked AS l USING (invoice_id)
), applied AS (
    SELECT d.*,
        CASE WHEN d.fresh THEN d.status ELSE d.old_status END AS new_status,
        (d.fresh AND d.status IS DISTINCT FROM d.old_status) AS changed
    FROM decided AS d
), updated AS (
    UPDATE nproxyd_invoice_payments AS w
    SET provider_status = a.new_status,
        actually_paid = CASE WHEN a.fresh THEN a.actually_paid ELSE w.actually_paid END,
        pay_amount = CASE WHEN a.fresh THEN a.pay_amount ELSE w.pay_amount END,
        pay_currency = CASE WHEN a.fresh THEN a.pay_currency ELSE w.pay_currency END,
        outcome_amount = CASE WHEN a.fresh THEN a.outcome_amount ELSE w.outcome_amount END,
        outcome_currency = CASE WHEN a.fresh THEN a.outcome_currency ELSE w.outcome_currency END,
        provider_updated_at = CASE WHEN a.fresh
            THEN coalesce(a.provider_updated_at, w.provider_updated_at)
            ELSE w.provider_updated_at END,
        status_since = CASE WHEN a.changed THEN :now ELSE w.status_since END,
        awaiting = CASE WHEN a.changed THEN a.new_status = ANY(:awaiting_statuses::text[])
            ELSE w.awaiting END,
        last_checked_at = CASE WHEN :source = 'poll' THEN :now ELSE w.last_checked_at END,
        last_notified_at = CASE WHEN :source = 'ipn' THEN :now ELSE w.last_notified_at END,
        next_check_at = CASE
            WHEN a.new_status = ANY(:final_statuses::text[]) THEN NULL
            WHEN :source = 'poll' THEN a.next_check_at
            ELSE w.next_check_at END,
        attempts = w.attempts + CASE WHEN :source = 'poll' THEN 1 ELSE 0 END,
        quiet_checks = CASE WHEN :source = 'poll' THEN a.quiet_checks
            WHEN a.changed THEN 0 ELSE w.quiet_checks END,
        failures = CASE WHEN :source = 'poll' THEN a.failures ELSE w.failures END,
        last_outcome = CASE WHEN :source = 'poll' THEN a.outcome ELSE w.last_outcome END,
        last_error = CASE WHEN :source = 'poll' THEN a.error ELSE w.last_error END,
        updated_at = :now
    FROM applied AS a
    WHERE w.invoice_id = a.invoice_id
    RETURNING w.invoice_id
), history AS (
    INSERT INTO nproxyd_invoice_payment_history
        (invoice_id, at, from_status, to_status, source, provider_updated_at)
    SELECT a.invoice_id, :now, a.old_status, a.new_status, :source, a.provider_updated_at
    FROM applied AS a
    WHERE a.changed
    RETURNING invoice_id
), mail AS (
    INSERT INTO mail_outbox
        (to_address, subject, body, message_id, dedupe_key, next_attempt_at, created_at,
            updated_at)
    SELECT :operator_email::text, a.subject, a.body, a.message_id,
        'payment-status:' || a.invoice_id || ':' || a.new_status, :now, :now, :now
    FROM applied AS a
    WHERE a.changed AND :operator_email::text IS NOT NULL AND a.body IS NOT NULL
      AND a.new_status = ANY(:awaiting_statuses::text[])
      -- An invoice the admin already set paid waits for nothing (a notification can arrive
      -- after the activation; a poll never asks about a paid invoice).
      AND NOT EXISTS (
          SELECT 1 FROM payment_invoices AS p WHERE p.id = a.invoice_id AND p.status = 'paid'
      )
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING dedupe_key
)
SELECT a.invoice_id, a.old_status AS from_status, a.new_status AS to_status,
    :source::text AS source,
    EXISTS (
        SELECT 1 FROM mail AS m
        WHERE m.dedupe_key = 'payment-status:' || a.invoice_id || ':' || a.new_status
    ) AS mailed
FROM applied AS a
WHERE a.changed
  AND (SELECT set_config('plan_cache_mode', 'auto', true)) = 'auto'
ORDER BY a.invoice_id;

-- track_notified_payment --
-- Find the invoice a notification names and start following it if it was not yet; $1 provider, $2 provider payment id, $3 now. Returns the invoice as a check (none for an unknown payment); a `created_at` Python cannot represent as NULL.
WITH invoice AS (
    SELECT p.id
    FROM payment_invoices AS p
    WHERE p.provider = $1 AND p.provider_invoice_id = $2
    ORDER BY p.created_at DESC, p.id
    LIMIT 1
), tracked AS (
    INSERT INTO nproxyd_invoice_payments
        (invoice_id, provider, provider_payment_id, next_check_at, created_at, updated_at)
    SELECT i.id, $1, $2, $3, $3, $3 FROM invoice AS i
    ON CONFLICT (invoice_id) DO NOTHING
    RETURNING invoice_id
)
SELECT p.id AS invoice_id, p.provider_invoice_id AS provider_payment_id,
    CASE WHEN p.created_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'
        THEN p.created_at END AS created_at,
    p.amount_crypto, p.currency, u.email AS user_email, pl.code AS plan_code,
    w.provider_status, coalesce(w.quiet_checks, 0) AS quiet_checks,
    coalesce(w.failures, 0) AS failures
FROM invoice AS i
JOIN payment_invoices AS p ON p.id = i.id
LEFT JOIN nproxyd_invoice_payments AS w ON w.invoice_id = i.id
LEFT JOIN users AS u ON u.id = p.user_id
LEFT JOIN subscriptions AS s ON s.id = p.subscription_id
LEFT JOIN subscription_plans AS pl ON pl.id = s.plan_id;

-- settle_awaiting_payments --
-- Invoices the admin has set paid no longer await activation; $1 now. Returns their ids.
UPDATE nproxyd_invoice_payments AS w
SET awaiting = false, updated_at = $1
FROM payment_invoices AS p
WHERE w.awaiting AND p.id = w.invoice_id AND p.status = 'paid'
RETURNING w.invoice_id;

-- list_awaiting_payments --
-- Invoices the provider reports finished or partially paid that are not paid yet, longest waiting first.
SELECT w.invoice_id, p.status AS invoice_status, u.email AS user_email, pl.code AS plan_code,
    p.amount_crypto, p.currency, p.amount_usd, w.provider_status, w.actually_paid,
    w.pay_currency, w.provider_payment_id, w.status_since AS since
FROM nproxyd_invoice_payments AS w
JOIN payment_invoices AS p ON p.id = w.invoice_id
LEFT JOIN users AS u ON u.id = p.user_id
LEFT JOIN subscriptions AS s ON s.id = p.subscription_id
LEFT JOIN subscription_plans AS pl ON pl.id = s.plan_id
WHERE w.awaiting AND p.status <> 'paid'
ORDER BY w.status_since, w.invoice_id;

-- awaiting_payment_summary --
-- How many invoices await activation and how long the oldest has waited; $1 now.
SELECT count(*)::int AS count,
    coalesce(extract(epoch FROM $1::timestamptz - min(w.status_since)), 0)::float8 AS oldest_seconds
FROM nproxyd_invoice_payments AS w
JOIN payment_invoices AS p ON p.id = w.invoice_id
WHERE w.awaiting AND p.status <> 'paid';

-- payment_status_history --
-- Every status change of one invoice's payment, oldest first; $1 invoice id.
SELECT at, from_status, to_status, source, provider_updated_at
FROM nproxyd_invoice_payment_history
WHERE invoice_id = $1
ORDER BY at, id;

-- invoice_payment_state --
-- What nproxyd knows about one invoice's payment; $1 invoice id.
SELECT p.id AS invoice_id, p.status AS invoice_status, p.provider, p.provider_invoice_id,
    p.amount_crypto, p.currency, w.provider_status, w.actually_paid, w.pay_currency,
    w.outcome_amount, w.outcome_currency, w.provider_updated_at, w.status_since,
    w.last_checked_at, w.last_notified_at, w.next_check_at, w.attempts, w.last_outcome,
    w.last_error
FROM payment_invoices AS p
LEFT JOIN nproxyd_invoice_payments AS w ON w.invoice_id = p.id
WHERE p.id = $1;
