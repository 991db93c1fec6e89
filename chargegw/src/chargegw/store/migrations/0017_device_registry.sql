-- The device registry (issue 13). With `device_registry_mode: enforce` only the ids listed
-- here are served: AP3000 physical ids (piles and hosts, 8 hex digits) and BKV gateway ids
-- (14 hex digits; a gateway's sockets follow it). Ids are stored in upper case.
CREATE TABLE device_registry (
    device_id       text PRIMARY KEY,
    protocol        text NOT NULL,
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text,
    CONSTRAINT device_registry_id_format CHECK (
        (protocol = 'ap3000' AND device_id ~ '^[0-9A-F]{8}$')
        OR (protocol = 'bkv' AND device_id ~ '^[0-9A-F]{14}$')
    )
);

-- One row: a revision every change of the registry moves (in the changing transaction,
-- whoever changes it: the API, a script, psql). Each process polls it cheaply and reloads
-- its copy of the registry when it moved.
CREATE TABLE device_registry_revision (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision        bigint NOT NULL
);
INSERT INTO device_registry_revision (singleton, revision) VALUES (true, 0);

CREATE FUNCTION device_registry_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE device_registry_revision SET revision = revision + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER device_registry_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON device_registry
    FOR EACH STATEMENT EXECUTE FUNCTION device_registry_changed();
