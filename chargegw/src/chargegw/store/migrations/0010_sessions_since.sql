-- Each process looks every few seconds for devices that another process bound since its
-- last look (cluster.py, newest connection wins across processes): keep that an index scan
-- at 100,000 devices.
CREATE INDEX device_sessions_since ON device_sessions (since);
