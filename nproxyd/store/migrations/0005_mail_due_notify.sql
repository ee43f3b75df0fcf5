-- Wake the mail senders of every instance as soon as mail is due, whoever wrote it (the web
-- API, `nproxyd mail retry`, another instance): one NOTIFY on 'nproxyd_mail_due' per statement
-- that inserted pending mail or made mail pending again. Delivered at commit, so a listener
-- never looks before the rows are visible; the mail sender's sweep remains the fallback.
-- Statement-level with transition tables: one check per statement, not per row, and the
-- daemon's own updates (leases, recorded outcomes) stay quiet.
-- Migration 0007 replaces the UPDATE trigger with a row-level one (the join below could cost
-- the square of a statement's rows).

-- Creating a trigger locks mail_outbox against writes for a moment: never wait long for it.
SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION nproxyd_notify_mail_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM nproxyd_inserted WHERE status = 'pending') THEN
        PERFORM pg_notify('nproxyd_mail_due', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION nproxyd_notify_mail_due_again() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1
        FROM nproxyd_after AS a
        JOIN nproxyd_before AS b ON b.id = a.id
        WHERE a.status = 'pending'
          AND (b.status <> 'pending' OR a.next_attempt_at < b.next_attempt_at)
    ) THEN
        PERFORM pg_notify('nproxyd_mail_due', '');
    END IF;
    RETURN NULL;
END
$$;

-- Created only when missing: the migration may run again on a database that has them.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'mail_outbox'::regclass AND tgname = 'nproxyd_mail_outbox_inserted'
    ) THEN
        CREATE TRIGGER nproxyd_mail_outbox_inserted
            AFTER INSERT ON mail_outbox
            REFERENCING NEW TABLE AS nproxyd_inserted
            FOR EACH STATEMENT EXECUTE FUNCTION nproxyd_notify_mail_inserted();
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'mail_outbox'::regclass AND tgname = 'nproxyd_mail_outbox_due_again'
    ) THEN
        CREATE TRIGGER nproxyd_mail_outbox_due_again
            AFTER UPDATE ON mail_outbox
            REFERENCING OLD TABLE AS nproxyd_before NEW TABLE AS nproxyd_after
            FOR EACH STATEMENT EXECUTE FUNCTION nproxyd_notify_mail_due_again();
    END IF;
END
$$;
