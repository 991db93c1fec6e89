-- A periodic report that repeats the last one (an AP3000 0x21 heartbeat, a BKV status
-- cluster) moves one timestamp on its device instead of one per port: the ports it
-- covers (bit port-1 of reported_ports) were reported at ports_reported_at, or later at
-- their own reported_at (a port's report time is the greater of the two). Each port
-- timestamp was a row update per port and frame in PostgreSQL.
ALTER TABLE devices
    ADD COLUMN reported_ports integer,
    ADD COLUMN ports_reported_at timestamptz;

-- the time a port was last reported (see above)
CREATE FUNCTION port_reported_at(
    p_reported_at timestamptz, p_port integer, p_mask integer, p_device_at timestamptz
) RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_mask IS NOT NULL AND p_port BETWEEN 1 AND 31
             AND p_mask & (1 << (p_port - 1)) <> 0
        THEN GREATEST(p_reported_at, p_device_at)
        ELSE p_reported_at
    END
$$;
