-- Firmware images and upgrade jobs (firmware.py, docs/firmware.md).

-- An uploaded image and what it is for. AP3000 images are kept in a large object
-- (lo_from_bytea / lo_get); a BKV OTA "image" is an FTP address and file name the
-- gateway downloads itself (the uploaded file, if any, is kept for reference only).
CREATE TABLE firmware_images (
    firmware_id     bigserial PRIMARY KEY,
    protocol        text NOT NULL CHECK (protocol IN ('ap3000', 'bkv')),
    -- the upgrade command family: packets of 0xE0/0xE1/0xE2/0xFA (200 bytes) or
    -- 0xF8/0xF9 (256 bytes), or 'ota' (BKV 0x0007)
    family          text NOT NULL
                    CHECK (family IN ('0xE0', '0xE1', '0xE2', '0xF8', '0xF9', '0xFA', 'ota')),
    -- AP3000: device type (ap3000.md 11.9; 0xE0/0xE1/0xE2/0xF8) or host type (11.14;
    -- 0xFA/0xF9); BKV: the OTA target (1 = the gateway)
    device_type     integer NOT NULL,
    -- AP3000: the version number in decimal as devices report it ("313" = V3.13);
    -- BKV: the gateway's version text as its heartbeat reports it
    version         text NOT NULL,
    packet_size     integer,
    -- packets of one transfer, the check packet included (0 for 'ota')
    total_packets   integer NOT NULL DEFAULT 0,
    size_bytes      bigint NOT NULL,
    sha256          text,
    -- AP3000: u32 sum of the image bytes (the check packet's checksum)
    image_checksum  bigint,
    image_oid       oid,
    ftp_host        text,
    ftp_port        integer,
    file_name       text,
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- deleted images keep their row (jobs refer to it), not their bytes
    deleted_at      timestamptz,
    CHECK ((protocol = 'bkv') = (family = 'ota'))
);

CREATE TABLE upgrade_jobs (
    job_id          bigserial PRIMARY KEY,
    firmware_id     bigint NOT NULL REFERENCES firmware_images (firmware_id),
    selector        jsonb NOT NULL,
    -- upgrades in progress (transferring or rebooting) at most
    concurrency     integer NOT NULL CHECK (concurrency >= 1),
    -- upgrades started in any 60 s at most
    rate_per_min    integer NOT NULL CHECK (rate_per_min >= 1),
    force           boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz,
    finished_at     timestamptz
);
CREATE INDEX upgrade_jobs_open ON upgrade_jobs (job_id) WHERE finished_at IS NULL;

-- One device (AP3000 pile) or gateway (AP3000 host, BKV gateway) of a job.
CREATE TABLE upgrade_targets (
    job_id          bigint NOT NULL REFERENCES upgrade_jobs (job_id),
    target_id       text NOT NULL,
    state           text NOT NULL
                    CHECK (state IN ('queued', 'transferring', 'rebooting', 'verified',
                                     'failed', 'cancelled')),
    total_packets   integer NOT NULL DEFAULT 0,
    -- packets acknowledged in order (the transfer resumes after the last of them)
    acked_packets   integer NOT NULL DEFAULT 0,
    -- the session device the commands are queued under (the target itself, or for a
    -- gateway one of the devices behind it: they share its connection)
    via_device_id   text,
    -- the packet command in flight and the packet it carries (0: the 0xFA trigger)
    command_id      bigint,
    command_packet  integer,
    -- transmissions of command_packet so far (resends included)
    packet_sends    integer NOT NULL DEFAULT 0,
    restarts        integer NOT NULL DEFAULT 0,
    -- why a queued target has not started, or a transfer waits ('charging', 'offline')
    waiting         text,
    waiting_since   timestamptz,
    checked_at      timestamptz,
    failure_reason  text,
    previous_version text,
    reported_version text,
    -- the connection at the end of the transfer: a version report on it predates the reboot
    done_connection text,
    started_at      timestamptz,
    transferred_at  timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, target_id)
);
-- at most one upgrade per device or gateway at a time
CREATE UNIQUE INDEX upgrade_targets_one_active ON upgrade_targets (target_id)
    WHERE state IN ('queued', 'transferring', 'rebooting');
CREATE INDEX upgrade_targets_job_state ON upgrade_targets (job_id, state);
CREATE UNIQUE INDEX upgrade_targets_command ON upgrade_targets (command_id)
    WHERE command_id IS NOT NULL;
