-- Device parameters with read-back verification: what the platform wants a device to
-- hold (desired), what the device last said it holds (reported), and whether the two
-- agree. A group is only 'verified' once the device has read it back.

CREATE TABLE device_params (
    device_id       text NOT NULL REFERENCES devices (device_id),
    "group"         text NOT NULL CHECK ("group" IN ('running1', 'running2', 'limits', 'card')),
    desired         jsonb,
    reported        jsonb,
    desired_at      timestamptz,
    reported_at     timestamptz,
    verified_at     timestamptz,
    -- NULL while nothing is desired (a read-back only recorded what the device holds)
    status          text CHECK (status IN ('pending', 'applying', 'verified', 'mismatch',
                                           'failed')),
    -- field -> {"desired": ..., "reported": ...} for every field that differs
    diff            jsonb,
    failure_reason  text,
    set_command_id  bigint,
    read_command_id bigint,
    PRIMARY KEY (device_id, "group"),
    CHECK ((desired IS NULL) = (status IS NULL))
);
