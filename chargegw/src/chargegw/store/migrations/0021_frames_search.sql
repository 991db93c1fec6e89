-- Searching the audit log: GET /api/v1/frames and `chargegw frames export`
-- (chargegw/domain/frames.py).
--
-- The filters and the indexes that serve them:
-- * device_id, gateway_id (its devices and itself), order_no (its device and time):
--   frames_device_time (0001);
-- * a time window alone, direction, command: the primary key (received_at, id), read in
--   order until a page is full;
-- * connection_id (and the frames of a device's connection that name no device: an
--   ICCID, bytes that did not decode, which the export takes along): frames_connection
--   below;
-- * errors_only: frames_errors below, partial, so it holds only the rare error frames.
--
-- Cost: frames_connection is one more index entry per frame written (the writer copies
-- frames in batches); frames_errors costs nothing for a frame that decoded. Both are
-- built here on every partition, and frame writes wait while they build: on a large
-- audit log, migrate when a pause of the writers (their batches queue up) is acceptable.
CREATE INDEX frames_connection ON frames (connection_id, received_at, id);
CREATE INDEX frames_errors ON frames (received_at, id) WHERE error IS NOT NULL;
