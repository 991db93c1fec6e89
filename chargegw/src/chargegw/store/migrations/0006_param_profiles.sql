-- Parameter profiles (named, validated sets of parameter groups per protocol) and the
-- jobs that apply one to a selection of devices. A job's per-device progress is derived
-- from device_params; param_job_devices.status keeps the last derived value.

CREATE TABLE param_profiles (
    name        text PRIMARY KEY,
    protocol    text NOT NULL CHECK (protocol IN ('ap3000')),
    -- group -> full desired fields, validated and rounded to the wire resolution
    groups      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE param_jobs (
    job_id      bigserial PRIMARY KEY,
    profile     text NOT NULL REFERENCES param_profiles (name),
    selector    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE param_job_devices (
    job_id          bigint NOT NULL REFERENCES param_jobs (job_id),
    device_id       text NOT NULL REFERENCES devices (device_id),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'applying', 'verified', 'mismatch', 'failed',
                                      'superseded')),
    -- group -> the set command the job queued (a later PUT or job supersedes it)
    set_command_ids jsonb NOT NULL,
    PRIMARY KEY (job_id, device_id)
);
CREATE INDEX param_job_devices_device ON param_job_devices (device_id);
