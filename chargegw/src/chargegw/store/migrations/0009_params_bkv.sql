-- Parameters, part 2 (params.py, docs/params.md): BKV groups and AP3000 groups without
-- a read-back, drift checks after reconnects, profile versions, and profile jobs paced
-- by a rollout rate and a concurrency limit.

-- device_params: the new groups, and 'acknowledged' for groups the device can only
-- acknowledge (the protocol defines no read-back for them)
ALTER TABLE device_params DROP CONSTRAINT device_params_group_check;
ALTER TABLE device_params ADD CONSTRAINT device_params_group_check CHECK ("group" IN (
    'running1', 'running2', 'limits', 'card', 'mute', 'work_mode', 'card_mode', 'qr_code',
    'socket_params', 'voice_window_a', 'voice_window_b'));
ALTER TABLE device_params DROP CONSTRAINT device_params_status_check;
ALTER TABLE device_params ADD CONSTRAINT device_params_status_check CHECK (status IN (
    'pending', 'applying', 'verified', 'acknowledged', 'mismatch', 'failed'));
ALTER TABLE device_params
    -- the device refused the set command (not re-applied after a reconnect)
    ADD COLUMN refused          boolean NOT NULL DEFAULT false,
    -- when the device acknowledged the set command
    ADD COLUMN acknowledged_at  timestamptz,
    -- the read-back queued by the last drift check (after a reconnect or registration)
    ADD COLUMN check_command_id bigint,
    ADD COLUMN checked_at       timestamptz,
    -- the profile job whose values are desired (NULL: set with PUT); a later PUT or job
    -- replaces it, which the job shows as 'superseded'
    ADD COLUMN job_id           bigint;
UPDATE device_params p SET job_id = j.job_id
FROM param_job_devices j
WHERE j.device_id = p.device_id AND (j.set_command_ids ->> p."group")::bigint = p.set_command_id;
CREATE INDEX device_params_open ON device_params (device_id)
    WHERE status IN ('pending', 'applying');
CREATE INDEX device_params_job ON device_params (job_id) WHERE job_id IS NOT NULL;

-- profiles: both protocols; every change is a new version, jobs keep theirs
ALTER TABLE param_profiles DROP CONSTRAINT param_profiles_protocol_check;
ALTER TABLE param_profiles ADD CONSTRAINT param_profiles_protocol_check
    CHECK (protocol IN ('ap3000', 'bkv'));
ALTER TABLE param_profiles
    ADD COLUMN version    integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at timestamptz;
UPDATE param_profiles SET updated_at = created_at;
ALTER TABLE param_profiles ALTER COLUMN updated_at SET NOT NULL;
ALTER TABLE param_profiles ALTER COLUMN updated_at SET DEFAULT now();

CREATE TABLE param_profile_versions (
    name        text NOT NULL REFERENCES param_profiles (name),
    version     integer NOT NULL,
    groups      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
INSERT INTO param_profile_versions (name, version, groups, created_at)
SELECT name, 1, groups, created_at FROM param_profiles;

-- jobs: the profile version and its groups as applied, the pace, and when every
-- device had been started and had settled
ALTER TABLE param_jobs
    ADD COLUMN profile_version integer NOT NULL DEFAULT 1,
    ADD COLUMN protocol        text NOT NULL DEFAULT 'ap3000'
                               CHECK (protocol IN ('ap3000', 'bkv')),
    ADD COLUMN groups          jsonb,
    -- devices started in any 60 s, at most
    ADD COLUMN rate_per_min    integer NOT NULL DEFAULT 60 CHECK (rate_per_min >= 1),
    -- devices with a group pending or applying, at most
    ADD COLUMN concurrency     integer NOT NULL DEFAULT 10 CHECK (concurrency >= 1),
    ADD COLUMN finished_at     timestamptz;
-- jobs before this migration started every device at once
UPDATE param_jobs j SET groups = p.groups, finished_at = j.created_at
FROM param_profiles p WHERE p.name = j.profile;
ALTER TABLE param_jobs ALTER COLUMN groups SET NOT NULL;
ALTER TABLE param_jobs ALTER COLUMN profile_version DROP DEFAULT;
ALTER TABLE param_jobs ALTER COLUMN protocol DROP DEFAULT;
CREATE INDEX param_jobs_open ON param_jobs (job_id) WHERE finished_at IS NULL;

ALTER TABLE param_job_devices DROP CONSTRAINT param_job_devices_status_check;
ALTER TABLE param_job_devices ADD CONSTRAINT param_job_devices_status_check CHECK (status IN (
    'queued', 'pending', 'applying', 'verified', 'acknowledged', 'mismatch', 'failed',
    'superseded'));
ALTER TABLE param_job_devices ALTER COLUMN set_command_ids DROP NOT NULL;
ALTER TABLE param_job_devices ALTER COLUMN status SET DEFAULT 'queued';
ALTER TABLE param_job_devices
    ADD COLUMN started_at     timestamptz,
    -- why the device could not be started (its groups do not fit it)
    ADD COLUMN failure_reason text;
UPDATE param_job_devices d SET started_at = j.created_at
FROM param_jobs j WHERE j.job_id = d.job_id;
CREATE INDEX param_job_devices_queued ON param_job_devices (job_id, device_id)
    WHERE status = 'queued';
CREATE INDEX param_job_devices_started ON param_job_devices (job_id, started_at)
    WHERE started_at IS NOT NULL;
