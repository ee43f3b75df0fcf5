-- recover_cooldown_keys --
-- Return every cooldown key whose cooldown elapsed to active, keeping its failure count; $1 now. Returns the recovered ids.
UPDATE provider_keys
SET status = 'active', cooldown_until = NULL, updated_at = $1
WHERE status = 'cooldown' AND cooldown_until <= $1
RETURNING id;

-- claim_balance_due_keys --
-- Claim active keys whose balance is due for a check (stamping balance_checked_at so no other instance probes them); $1 now, $2 poll seconds, $3 limit.
WITH due AS (
    SELECT id
    FROM provider_keys
    WHERE status = 'active'
      AND (balance_checked_at IS NULL
           OR balance_checked_at <= $1::timestamptz - make_interval(secs => $2::float8))
    ORDER BY balance_checked_at NULLS FIRST, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE provider_keys AS k
SET balance_checked_at = $1
FROM due
WHERE k.id = due.id
RETURNING k.id, k.provider, k.label;

-- record_key_balances --
-- Store probed balances; $1 ids, $2 balances, $3 now.
UPDATE provider_keys AS k
SET balance = t.balance, balance_checked_at = $3, updated_at = $3
FROM unnest($1::text[], $2::numeric[]) AS t(id, balance)
WHERE k.id = t.id;

-- record_key_failures --
-- Count one failure per key: cooldown, or manual_review at the threshold; :failures_before_manual_review is the threshold. Keys in manual_review or disabled are never touched.
UPDATE provider_keys AS k
SET consecutive_failures = k.consecutive_failures + 1,
    status = CASE WHEN k.consecutive_failures + 1 >= :failures_before_manual_review
        THEN 'manual_review' ELSE 'cooldown' END,
    cooldown_until = CASE
        WHEN k.consecutive_failures + 1 >= :failures_before_manual_review THEN NULL
        ELSE :now::timestamptz + make_interval(secs => :cooldown_minutes::float8 * 60)
    END,
    last_error = t.error,
    updated_at = :now
FROM unnest(:ids::text[], :errors::text[]) AS t(id, error)
WHERE k.id = t.id AND k.status IN ('active', 'cooldown')
RETURNING k.id, k.status;

-- provider_key_counts --
-- Keys by status.
SELECT status, count(*) AS count FROM provider_keys GROUP BY status;
