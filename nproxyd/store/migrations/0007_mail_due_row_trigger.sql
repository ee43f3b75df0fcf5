-- The "mail is due again" check of migration 0005, row by row: same notification, no join.
--
-- 0005's statement-level trigger joined the statement's old and new transition tables on id.
-- Transition tables have no statistics and PL/pgSQL keeps the plan made at the session's first
-- call, so a session whose first UPDATE touched one row nested-looped every later statement:
-- cost in the square of the rows updated. With 100,000 rows in mail_outbox, a lease of 1,000
-- rows spent 143-163 ms in the trigger, of 3,000 rows 1.3 s, of 10,000 rows 35 s. Even with a
-- hash join every UPDATE of mail_outbox copied its old and new rows into the transition tables
-- (1,869 temporary blocks written for 10,000 rows, past work_mem), the sender's own leases and
-- outcomes included, to find nothing (docs/benchmarks.md: the mail-due trigger).
--
-- Here the check is the trigger's WHEN clause, evaluated as each row is updated: where it is
-- false (every update of the mail sender: leases, extensions, recorded outcomes) nothing is
-- queued and no function runs; where it is true the function sends the same empty
-- notification, and PostgreSQL delivers identical notifications of one transaction once, at
-- commit. So the listeners see what they saw before: one notification per transaction that
-- inserted pending mail, made mail pending again, or moved a pending mail's next_attempt_at
-- earlier. A row that wakes the senders costs about 3.4 µs (100,000 dead mails retried by one
-- statement: 0.33 s of a 2.6-3.7 s statement) and a queued event of about 23 bytes in memory
-- until the statement ends. Rows are paired by identity, not by id, so an UPDATE that changes
-- a mail's id is judged on that row too (0005 missed it; nothing does it).
-- The INSERT trigger of 0005 stays: it stops at the first pending row, linear.
--
-- Idempotent: it may run again, also after 0005 ran again and put its trigger back.

-- DROP TRIGGER locks mail_outbox against reads and writes, and statements queue behind a lock
-- that waits: give up soon (the migration fails and runs again at the next start).
SET LOCAL lock_timeout = '2s';

CREATE OR REPLACE FUNCTION nproxyd_notify_mail_due_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nproxyd_mail_due', '');
    RETURN NULL;
END
$$;

-- The old trigger goes first: its ACCESS EXCLUSIVE lock is the strongest this needs, taken
-- before any weaker one (no lock upgrade a writer could deadlock with). One transaction: no
-- writer ever sees mail_outbox without one of the two. When the row-level trigger is in place
-- and the old one gone, nothing is locked.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'mail_outbox'::regclass AND tgname = 'nproxyd_mail_outbox_due_again'
    ) THEN
        DROP TRIGGER nproxyd_mail_outbox_due_again ON mail_outbox;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'mail_outbox'::regclass AND tgname = 'nproxyd_mail_outbox_due_again_row'
    ) THEN
        CREATE TRIGGER nproxyd_mail_outbox_due_again_row
            AFTER UPDATE ON mail_outbox
            FOR EACH ROW
            WHEN (NEW.status = 'pending'
                AND (OLD.status <> 'pending' OR NEW.next_attempt_at < OLD.next_attempt_at))
            EXECUTE FUNCTION nproxyd_notify_mail_due_row();
    END IF;
END
$$;

DROP FUNCTION IF EXISTS nproxyd_notify_mail_due_again();
