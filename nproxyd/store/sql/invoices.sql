-- expire_pending_invoices --
-- Expire one keyset batch of due pending invoices; $1 now, $2 cursor expires_at, $3 cursor id, $4 batch size. Returns how many rows the batch scanned and expired, and its last key.
WITH due AS MATERIALIZED (
    SELECT ctid, id, expires_at
    FROM payment_invoices
    WHERE status = 'pending'
      AND expires_at IS NOT NULL
      AND expires_at <= $1
      AND (expires_at, id) > ($2::timestamptz, $3::text)
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
    last.expires_at AS last_expires_at,
    last.id AS last_id
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT expires_at, id FROM due ORDER BY expires_at DESC, id DESC LIMIT 1
) AS last ON true;
