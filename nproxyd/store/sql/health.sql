-- ping --
-- Does the database answer?
SELECT 1;

-- health_gauges --
-- The database-backed gauges, each through a partial index; $1 now. oldest_due_at is the next_attempt_at of the oldest due pending mail (NULL when none is due).
SELECT
    (SELECT count(*) FROM mail_outbox WHERE status = 'pending') AS outbox_pending,
    (SELECT count(*) FROM mail_outbox WHERE status = 'dead') AS mail_dead,
    (SELECT min(next_attempt_at) FROM mail_outbox
        WHERE status = 'pending' AND next_attempt_at <= $1) AS oldest_due_at,
    (SELECT count(*) FROM nproxyd_renewal_claims WHERE state = 'claimed') AS claims_claimed,
    (SELECT count(*) FROM nproxyd_renewal_claims WHERE state = 'retry') AS claims_retry,
    (SELECT count(*) FROM nproxyd_renewal_claims WHERE state = 'failed') AS claims_failed;

-- latest_failures --
-- The most recent error of an open renewal claim and of a pending or dead mail, for /status (no parameters); each branch reads a partial index.
SELECT
    (SELECT last_error FROM nproxyd_renewal_claims
        WHERE state <> 'done' AND last_error IS NOT NULL
        ORDER BY updated_at DESC LIMIT 1) AS renewal_error,
    (SELECT latest.last_error FROM (
        (SELECT last_error, updated_at FROM mail_outbox
            WHERE status = 'pending' AND last_error IS NOT NULL
            ORDER BY updated_at DESC LIMIT 1)
        UNION ALL
        (SELECT last_error, updated_at FROM mail_outbox
            WHERE status = 'dead' AND last_error IS NOT NULL
            ORDER BY updated_at DESC LIMIT 1)
    ) AS latest ORDER BY latest.updated_at DESC LIMIT 1) AS mail_error;
