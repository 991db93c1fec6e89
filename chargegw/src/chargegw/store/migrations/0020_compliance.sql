-- Protocol compliance per firmware (docs/compliance.md).
--
-- The gateway counts in memory the deviations from the protocol it sees, per device,
-- and adds them here in batches (chargegw/domain/compliance.py): an upsert that
-- increments. A device is counted under the (protocol, device type, firmware) it had
-- when the frames arrived, so an upgraded device has one row per firmware. '' means
-- "not known" (a device that never said, frames before any device spoke: device
-- 'unknown').

-- frames received, the denominator of the score
CREATE TABLE compliance_frames (
    protocol        text NOT NULL,
    device_type     text NOT NULL DEFAULT '',
    firmware        text NOT NULL DEFAULT '',
    device_id       text NOT NULL,
    frames          bigint NOT NULL DEFAULT 0 CHECK (frames >= 0),
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    PRIMARY KEY (device_id, protocol, device_type, firmware)
);
CREATE INDEX compliance_frames_firmware ON compliance_frames (protocol, device_type, firmware);

-- deviations by kind; `tolerated` of `count` were deviations a quirk profile of the
-- device expects; `examples`: the latest few frames that showed it, newest first
CREATE TABLE compliance_deviations (
    protocol        text NOT NULL,
    device_type     text NOT NULL DEFAULT '',
    firmware        text NOT NULL DEFAULT '',
    device_id       text NOT NULL,
    kind            text NOT NULL,
    count           bigint NOT NULL DEFAULT 0 CHECK (count >= 0),
    tolerated       bigint NOT NULL DEFAULT 0 CHECK (tolerated >= 0 AND tolerated <= count),
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    examples        jsonb NOT NULL DEFAULT '[]'::jsonb,
    PRIMARY KEY (device_id, protocol, device_type, firmware, kind)
);
CREATE INDEX compliance_deviations_firmware
    ON compliance_deviations (protocol, device_type, firmware);
