-- expiry_survey --
-- Size of payment_invoices and how many pending invoices are due; $1 now, $2 due rows per heap page from which a sweep in physical order pays (the count stops there). Returns pages, estimated rows and the capped due count.
WITH size AS (
    SELECT
        pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages,
        greatest(c.reltuples, 0)::bigint AS tuples
    FROM pg_class AS c
    WHERE c.oid = 'payment_invoices'::regclass
)
SELECT
    size.pages,
    size.tuples,
    (
        SELECT count(*)
        FROM (
            SELECT 1
            FROM payment_invoices
            WHERE status = 'pending'
              AND expires_at IS NOT NULL
              AND expires_at <= $1
            LIMIT (SELECT greatest(pages * $2::bigint, 1) FROM size)
        ) AS due
    ) AS due
FROM size;

-- expire_pending_invoices_in_pages --
-- Expire up to $4 due pending invoices stored in heap pages [$2, $3), in physical order, skipping locked rows; $1 now, $2 first tid, $3 tid after the last, $4 batch size. Returns how many rows it took and expired.
WITH due AS MATERIALIZED (
    SELECT ctid
    FROM payment_invoices
    WHERE ctid >= $2::tid
      AND ctid < $3::tid
      AND status = 'pending'
      AND expires_at IS NOT NULL
      AND expires_at <= $1
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE payment_invoices AS p
    SET status = 'expired', updated_at = $1
    FROM due
    -- The rows are locked (FOR UPDATE), so their ctid cannot change before this UPDATE.
    WHERE p.ctid = due.ctid AND p.status = 'pending'
    RETURNING 1
)
SELECT (SELECT count(*) FROM due) AS scanned, (SELECT count(*) FROM expired) AS expired;

-- expire_pending_invoices --
-- Expire one keyset batch of due pending invoices through the partial index; $1 now, $2 cursor expires_at as text, $3 cursor id, $4 batch size. Returns how many rows the batch took and expired, and its last key (the time as text, so no timestamp is ever decoded).
WITH due AS MATERIALIZED (
    SELECT ctid, id, expires_at
    FROM payment_invoices
    WHERE status = 'pending'
      AND expires_at IS NOT NULL
      AND expires_at <= $1
      AND (expires_at, id) > ($2::text::timestamptz, $3::text)
    ORDER BY expires_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE payment_invoices AS p
    SET status = 'expired', updated_at = $1
    FROM due
    -- The rows are locked (FOR UPDATE), so their ctid cannot change before this UPDATE:
    -- joining by ctid skips a second walk through the primary key per row.
    WHERE p.ctid = due.ctid AND p.status = 'pending'
    RETURNING p.id
)
SELECT
    (SELECT count(*) FROM due) AS scanned,
    (SELECT count(*) FROM expired) AS expired,
    last.expires_at::text AS last_expires_at,
    last.id AS last_id
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT expires_at, id FROM due ORDER BY expires_at DESC, id DESC LIMIT 1
) AS last ON true;

-- expire_pending_invoices_in_page_range --
-- Expire every due pending invoice stored in heap pages [$2, $3), in physical order, in one UPDATE (run under a short lock_timeout: a row locked by another transaction makes it fail, and the range is then done with skip-locked batches); $1 now, $2 first tid, $3 tid after the last.
UPDATE payment_invoices
SET status = 'expired', updated_at = $1
WHERE ctid >= $2::tid
  AND ctid < $3::tid
  AND status = 'pending'
  AND expires_at IS NOT NULL
  AND expires_at <= $1;

-- set_lock_timeout --
-- Bound how long the current transaction's statements wait for a row lock; $1 the timeout (e.g. '50ms').
SELECT set_config('lock_timeout', $1, true);
