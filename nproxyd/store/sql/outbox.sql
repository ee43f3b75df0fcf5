-- claim_due_mail --
-- Lease a batch of due pending mail to this instance; $1 now, $2 lease until, $3 holder, $4 batch size.
-- Only what delivery needs is returned: no timestamp column, so a created_at or next_attempt_at
-- that Python cannot represent (BC, year 10000, ±infinity) never fails the batch.
-- The locked ids reach mail_outbox through its primary key whatever its size: as an array the
-- planner cannot count (ARRAY(...) is computed once), not as a join it might turn into a hash
-- of the whole table (docs/design.md §6).
UPDATE mail_outbox AS m
SET lease_until = $2, leased_by = $3
WHERE m.id = ANY(ARRAY(
    SELECT id
    FROM mail_outbox
    WHERE status = 'pending'
      AND next_attempt_at <= $1
      AND (lease_until IS NULL OR lease_until <= $1)
    ORDER BY next_attempt_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
))
RETURNING m.id, m.to_address, m.subject, m.body, m.message_id, m.attempts;

-- record_mail_outcomes --
-- Record delivery outcomes of mail this holder still holds (a lease another instance took over is theirs); :statuses are 'sent', 'pending' or 'dead', :counts_attempt is false for an outcome that does not use up an attempt (the server was unavailable).
-- The outcomes reach mail_outbox through its primary key, one probe each, whatever the size of
-- the table or the statistics of leased_by: the arrays come from a subquery the planner does not
-- flatten (OFFSET 0), so it cannot count them and drives the join from the batch; the holder and
-- status checks are conditions of that join, never a filter it would guess matches ~1 row and
-- scan the table for (docs/design.md §6).
UPDATE mail_outbox AS m
SET status = t.status,
    attempts = m.attempts + CASE WHEN t.counts_attempt THEN 1 ELSE 0 END,
    last_error = t.error,
    next_attempt_at = t.next_attempt_at,
    sent_at = CASE WHEN t.status = 'sent' THEN :now ELSE m.sent_at END,
    lease_until = NULL,
    leased_by = '',
    updated_at = :now
FROM (
    SELECT outcome.*, batch.holder, batch.held_status
    FROM (
        SELECT :ids::text[], :statuses::text[], :errors::text[], :next_attempt_at::timestamptz[],
            :counts_attempt::boolean[], :holder::text, 'pending'::text
        OFFSET 0
    ) AS batch(ids, statuses, errors, next_attempts, counts, holder, held_status)
    CROSS JOIN LATERAL unnest(
        batch.ids, batch.statuses, batch.errors, batch.next_attempts, batch.counts
    ) AS outcome(id, status, error, next_attempt_at, counts_attempt)
) AS t
WHERE m.id = t.id AND m.status = t.held_status AND m.leased_by = t.holder;

-- enqueue_mail --
-- Queue one mail (:dedupe_key may be NULL). Returns its id, or nothing when the dedupe key exists.
INSERT INTO mail_outbox
    (to_address, subject, body, message_id, dedupe_key, next_attempt_at, created_at, updated_at)
VALUES (:to_address, :subject, :body, :message_id, :dedupe_key, :now, :now, :now)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id;

-- list_dead_mail --
-- Dead mail, newest first; $1 limit. An updated_at Python cannot represent is returned as NULL.
SELECT id, to_address, subject, attempts, last_error,
    CASE
        WHEN updated_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'
        THEN updated_at
    END AS updated_at
FROM mail_outbox
WHERE status = 'dead'
ORDER BY updated_at DESC, id
LIMIT $1;

-- retry_dead_mail --
-- Put the given dead mail back to pending with attempts reset; $1 ids, $2 now. Returns the ids.
UPDATE mail_outbox
SET status = 'pending', attempts = 0, next_attempt_at = $2, lease_until = NULL,
    leased_by = '', updated_at = $2
WHERE id = ANY($1::text[]) AND status = 'dead'
RETURNING id;

-- retry_all_dead_mail --
-- Put every dead mail back to pending with attempts reset; $1 now. Returns the ids.
UPDATE mail_outbox
SET status = 'pending', attempts = 0, next_attempt_at = $1, lease_until = NULL,
    leased_by = '', updated_at = $1
WHERE status = 'dead'
RETURNING id;

-- outbox_counts --
-- Pending and dead mail, each counted through its partial index (sent mail is not counted).
SELECT
    (SELECT count(*) FROM mail_outbox WHERE status = 'pending') AS pending,
    (SELECT count(*) FROM mail_outbox WHERE status = 'dead') AS dead;

-- extend_mail_leases --
-- Extend the lease of mail this holder still holds unrecorded; $1 ids, $2 holder, $3 lease until.
UPDATE mail_outbox
SET lease_until = $3
WHERE id = ANY($1::text[])
  AND leased_by = $2
  AND status = 'pending'
  AND lease_until IS NOT NULL;
