-- The order id of a renewal claim is a function of its primary key (subscription, cycle
-- start), so the primary key already makes it unique. A second unique index made racing
-- claims of one slot fail: INSERT ... ON CONFLICT (subscription_id, cycle_start) arbitrates
-- on the primary key only, and an instance that reached the order-id index first raised a
-- unique violation instead of taking the ON CONFLICT path.
ALTER TABLE nproxyd_renewal_claims DROP CONSTRAINT IF EXISTS nproxyd_renewal_claims_order_id_key;
