"""Prometheus metrics of one gateway process, exposed by the API at ``GET /metrics``.

Every :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` instead
of the process-wide default one, so tests and several apps in one process never collide
on metric names. The layers that do the work (transport, session, store) update the
attributes directly::

    metrics.connections_accepted_total.inc()
    metrics.frames_total.labels(protocol="ap3000", direction="in", command="0x01").inc()
    with metrics.db_write_seconds.time():
        ...

Several worker processes (``chargegw serve --workers N``) share one exposition through
prometheus-client's multiprocess mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
for its workers only; every value then lives in a per-process file in that directory and
:meth:`Metrics.render` reads all of them (counters and histograms summed, dead workers'
counts kept; gauges by their ``multiprocess_mode``: ``livesum`` for what each worker holds,
``livemostrecent`` for a database-wide figure every worker computes, ``livemax`` for
per-worker gauges labelled ``worker``). Without the variable each :class:`Metrics` keeps
its values in memory, in its own registry. See docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, ParamSpec

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["MULTIPROC_ENV", "Metrics", "guarded", "never_fails"]

log = structlog.get_logger("chargegw.metrics")
_P = ParamSpec("_P")
#: a failing metric is logged at most this often
_LOG_EVERY_S = 60.0
_last_logged = [-_LOG_EVERY_S]


@contextlib.contextmanager
def never_fails() -> Iterator[None]:
    """Run a metric update; should it raise (in multiprocess mode a value file that can
    no longer be written: a full or wiped directory), log it and go on. A figure is never
    worth a command, an ACK or a settlement."""
    try:
        yield
    except Exception:
        update_failed()


class _FlushFirst(Collector):
    """A collector with no metrics of its own: collecting it flushes the frames counted
    in memory (see :meth:`Metrics.frame`), so a scrape or a test reads exact counts."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self._metrics.flush_frames()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # described as empty: registering it calls nothing else


def update_failed() -> None:
    """What :func:`never_fails` does with the exception being handled (for a per-frame
    ``try``/``except``, where a context manager per call costs more than the update)."""
    now = time.monotonic()
    if now - _last_logged[0] >= _LOG_EVERY_S:
        _last_logged[0] = now
        log.exception("metric update failed, going on without it")


def guarded(update: Callable[_P, object]) -> Callable[_P, None]:
    """``update`` (a metric hook) run under :func:`never_fails`."""

    @functools.wraps(update)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        with never_fails():
            update(*args, **kwargs)

    return run


#: the directory of the per-process value files; set by the supervisor for its workers
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: how a gauge's per-process values combine in one scrape (multiprocess mode only):
#: SUM what each worker holds (its connections), take the MOST RECENT of a figure every
#: worker computes from the shared database (not summed: each worker sees the whole), MAX
#: of a per-worker gauge labelled ``worker`` (one live process per label). Only the
#: ``live*`` modes: a dead worker's gauges vanish with it (mark_process_dead)
SUM: Final = "livesum"
RECENT: Final = "livemostrecent"
MAX: Final = "livemax"

#: batch writes (COPY of up to a few hundred rows) take milliseconds; outliers reach seconds
_DB_WRITE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """The gateway's metrics, all registered in :attr:`registry`.

    Names are prefixed with ``namespace`` (``chargegw_connections_current``); counters get
    Prometheus' ``_total`` suffix on exposition.
    """

    registry: CollectorRegistry

    #: TCP connections from devices open right now
    connections_current: Gauge
    #: TCP connections accepted since start
    connections_accepted_total: Counter
    #: TCP connections closed, by ``reason`` (idle, peer, garbage, shutdown, ...)
    connections_closed_total: Counter
    #: device connections refused, by ``rule`` (network, per_source, identify_timeout,
    #: unregistered, max_connections, accept_rate, banned)
    device_connections_refused_total: Counter
    #: device connections that have not sent a complete valid frame yet
    device_connections_unidentified: Gauge
    #: ids in the device registry, as this process last loaded it
    device_registry_ids: Gauge
    #: ids not in the device registry, once per connection and id (served in `log` mode)
    device_unregistered_total: Counter
    #: frames by ``protocol`` (ap3000, bkv), ``direction`` (in, out) and ``command``
    frames_total: Counter
    #: undecodable input, by ``kind`` (checksum, length, resync, ...)
    decode_errors_total: Counter
    #: deviations from the protocol devices showed, by ``protocol`` and ``kind``
    #: (chargegw.domain.compliance; no device or firmware label: low cardinality)
    protocol_deviations_total: Counter
    #: reads paused for exceeding a frame-rate limit, by scope (connection, process)
    frames_throttled_total: Counter
    devices_banned_total: Counter
    #: devices currently considered online
    devices_online: Gauge
    #: duration of one database write (a batch or a transaction)
    db_write_seconds: Histogram
    #: database writes that failed (and were kept for a retry)
    db_write_failures_total: Counter
    #: batches waiting for the writer
    batch_queue_depth: Gauge
    #: rows held in memory while the database is slow or unreachable
    db_buffered_rows: Gauge
    #: HTTP requests answered 429, by ``scope``: key, global (control calls), auth (a
    #: source address blocked after failed authentications)
    api_rate_limited_total: Counter
    api_busy_total: Counter
    api_in_flight: Gauge
    #: HTTP requests answered 413: the body was larger than allowed
    api_body_too_large_total: Counter
    #: call audit rows held in memory until the database takes them
    api_audit_unsaved: Gauge
    #: call audit rows that could not be stored (logged instead), by ``reason``
    api_audit_lost_total: Counter

    #: frames counted since the last :meth:`flush_frames`, by label set
    _frame_counts: dict[tuple[str, str, str], int]

    def frame(self, protocol: str, direction: str, command: str) -> None:
        """Count one frame. Counted here and added to ``frames_total`` by
        :meth:`flush_frames` (before every collection of the registry, and every second
        by the gateway for the other workers' scrapes): an increment of the counter
        itself takes a lock, and in multiprocess mode writes a file, twice per frame."""
        key = (protocol, direction, command)
        counts = self._frame_counts
        counts[key] = counts.get(key, 0) + 1

    def flush_frames(self) -> None:
        """Add the frames counted since the last flush to ``frames_total``."""
        counts = self._frame_counts
        self._frame_counts = {}
        for key, count in counts.items():
            child = self._frame_children.get(key)
            if child is None:
                child = self._frame_children[key] = self.frames_total.labels(*key)
            child.inc(count)

    def __init__(
        self, namespace: str = "chargegw", registry: CollectorRegistry | None = None
    ) -> None:
        """Create the metrics in ``registry`` (a new, private one by default)."""
        self._frame_children: dict[tuple[str, str, str], Any] = {}
        self._frame_counts = {}
        # prometheus-client chose its value store when it was imported, from the same
        # variable: files in this directory, or memory
        self._multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = registry if registry is not None else CollectorRegistry()
        ns = namespace
        reg = self.registry
        # first in the registry: collected before the counters, it adds what was counted
        reg.register(_FlushFirst(self))
        self.connections_current = Gauge(
            "connections_current",
            "Device TCP connections open now",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.connections_accepted_total = Counter(
            "connections_accepted", "Device TCP connections accepted", namespace=ns, registry=reg
        )
        self.connections_closed_total = Counter(
            "connections_closed",
            "Device TCP connections closed, by reason",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self.device_connections_refused_total = Counter(
            "device_connections_refused",
            "Device connections refused or closed by a hygiene rule, by rule",
            ["rule"],
            namespace=ns,
            registry=reg,
        )
        self.device_connections_unidentified = Gauge(
            "device_connections_unidentified",
            "Device connections that have not sent a complete valid frame yet",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.device_registry_ids = Gauge(
            "device_registry_ids",
            "Device ids in the registry, as this process last loaded it",
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.device_unregistered_total = Counter(
            "device_unregistered",
            "Device ids not in the registry seen on a connection (once per connection and id)",
            namespace=ns,
            registry=reg,
        )
        self.frames_total = Counter(
            "frames",
            "Frames received (in) and sent (out), by protocol and command",
            ["protocol", "direction", "command"],
            namespace=ns,
            registry=reg,
        )
        self.decode_errors_total = Counter(
            "decode_errors",
            "Input that could not be decoded, by kind",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self.protocol_deviations_total = Counter(
            "protocol_deviations",
            "Deviations from the protocol devices showed, by protocol and kind",
            ["protocol", "kind"],
            namespace=ns,
            registry=reg,
        )
        self.frames_throttled_total = Counter(
            "frames_throttled",
            "Times reads were paused because a connection or the process sent too many frames",
            ["scope"],
            namespace=ns,
            registry=reg,
        )
        self.devices_banned_total = Counter(
            "devices_banned",
            "Devices banned for reconnecting too often",
            namespace=ns,
            registry=reg,
        )
        self.devices_online = Gauge(
            "devices_online",
            "Devices currently online, by protocol",
            ["protocol"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.db_write_seconds = Histogram(
            "db_write_seconds",
            "Duration of database writes",
            namespace=ns,
            registry=reg,
            buckets=_DB_WRITE_BUCKETS,
        )
        self.db_write_failures_total = Counter(
            "db_write_failures", "Database writes that failed", namespace=ns, registry=reg
        )
        self.batch_queue_depth = Gauge(
            "batch_queue_depth",
            "Batches waiting for the database writer",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.db_buffered_rows = Gauge(
            "db_buffered_rows",
            "Rows held in memory until the database accepts them",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        #: rows the database refused for their own values, kept in ``rejected_rows``
        self.db_rows_rejected_total = Counter(
            "db_rows_rejected_total",
            "Rows the database refused for their values, set aside in rejected_rows",
            ["table"],
            namespace=ns,
            registry=reg,
        )
        # zero from the start: an alert's increase() sees the first one (deploy/prometheus)
        for table in ("gateways", "devices", "ports", "device_events", "frames", "device_sessions"):
            self.db_rows_rejected_total.labels(table=table)
        #: commands finished, by command name and final status (acked, failed, dead)
        self.commands_finished_total = Counter(
            "commands_finished_total",
            "Commands finished, by protocol, command and final status",
            ["protocol", "command", "status"],
            namespace=ns,
            registry=reg,
        )
        #: commands that gave up, by reason (no answer, offline, cancelled ...)
        self.commands_dead_total = Counter(
            "commands_dead_total",
            "Commands that ended dead, by reason",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        #: commands waiting in the outbox, by state (pending, sent)
        self.outbox_backlog = Gauge(
            "outbox_backlog",
            "Commands in the outbox not yet finished, by state",
            ["status"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=RECENT,
        )
        #: commands sent a second time for want of an answer
        self.commands_resent_total = Counter(
            "commands_resent_total",
            "Commands resent (same message id) after the ACK timeout, by protocol and command",
            ["protocol", "command"],
            namespace=ns,
            registry=reg,
        )
        #: from the API call to the pile's answer
        self.command_latency_seconds = Histogram(
            "command_latency_seconds",
            "Time from a command's creation (the API call) to the pile's answer",
            ["protocol", "command"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60),
            namespace=ns,
            registry=reg,
        )
        #: settlements committed, and resends of an already committed one
        self.settlements_committed_total = Counter(
            "settlements_committed_total",
            "Settlements (AP3000 0x03, BKV end reports) committed, by protocol",
            ["protocol"],
            namespace=ns,
            registry=reg,
        )
        #: settlements stored without a price (the error is on the order, for review)
        self.settlements_unpriced_total = Counter(
            "settlements_unpriced_total",
            "Settlements stored and acknowledged without a price (pricing error)",
            namespace=ns,
            registry=reg,
        )
        #: orders marked for a person to look at (review_reason set)
        self.orders_for_review_total = Counter(
            "orders_for_review_total",
            "Orders marked for review: unpriced, or naming another device's order",
            namespace=ns,
            registry=reg,
        )
        #: devices claimed again after the process was declared stopped or lost entries
        self.devices_reasserted_total = Counter(
            "devices_reasserted_total",
            "Held devices re-claimed in the session directory after an outage or stall",
            namespace=ns,
            registry=reg,
        )
        self.settlements_duplicate_total = Counter(
            "settlements_duplicate_total",
            "Settlement resends that changed nothing",
            namespace=ns,
            registry=reg,
        )
        # -- the event stream (chargegw.domain.events) --
        #: event-stream (SSE) clients connected to this process
        self.event_stream_subscribers = Gauge(
            "event_stream_subscribers",
            "Event stream (SSE) subscribers connected to this process",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        #: events written to event-stream clients (replayed and live)
        self.events_streamed_total = Counter(
            "events_streamed_total",
            "Events sent to event stream subscribers, replayed or live",
            namespace=ns,
            registry=reg,
        )
        #: subscribers disconnected because their buffer was full
        self.event_stream_slow_disconnects_total = Counter(
            "event_stream_slow_disconnects_total",
            "Event stream subscribers disconnected for not keeping up (buffer full)",
            namespace=ns,
            registry=reg,
        )
        #: committed events still without an id, at the last look (once a second)
        self.events_unsequenced = Gauge(
            "events_unsequenced",
            "Committed events waiting for their id at the last sweep",
            namespace=ns,
            registry=reg,
            multiprocess_mode=RECENT,
        )
        #: from an event's time to its fan-out in this process
        self.event_fanout_delay_seconds = Histogram(
            "event_fanout_delay_seconds",
            "Time from an event (server time of the change) to its fan-out in this process",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            namespace=ns,
            registry=reg,
        )
        #: times the event hub (re)connected to the database after losing it
        self.event_hub_reconnects_total = Counter(
            "event_hub_reconnects_total",
            "Times the event hub reconnected to the database after losing it",
            namespace=ns,
            registry=reg,
        )
        #: events deleted by retention
        self.events_deleted_total = Counter(
            "events_deleted_total",
            "Events deleted by retention (events_retention_days)",
            namespace=ns,
            registry=reg,
        )

        self._api_hygiene_metrics(ns, reg)
        self._api_key_metrics(ns, reg)
        self._webhook_metrics(ns, reg)
        self._operations_metrics(ns, reg)
        self._housekeeping_metrics(ns, reg)

    def _api_hygiene_metrics(self, ns: str, reg: CollectorRegistry) -> None:
        """Rate limits, body sizes and the call audit of the HTTP API."""
        self.api_rate_limited_total = Counter(
            "api_rate_limited",
            "HTTP requests refused with 429, by scope (key, global, auth)",
            ["scope"],
            namespace=ns,
            registry=reg,
        )
        self.api_in_flight = Gauge(
            "api_requests_in_flight",
            "HTTP requests being served (until their answer starts)",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.api_busy_total = Counter(
            "api_busy",
            "HTTP requests answered 503 busy: the process served `http_max_in_flight` already",
            namespace=ns,
            registry=reg,
        )
        self.api_body_too_large_total = Counter(
            "api_body_too_large",
            "HTTP requests refused with 413: the body was larger than allowed",
            namespace=ns,
            registry=reg,
        )
        self.api_audit_unsaved = Gauge(
            "api_audit_unsaved",
            "Call audit rows held in memory until the database takes them",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        self.api_audit_lost_total = Counter(
            "api_audit_lost",
            "Call audit rows not stored (written to the log instead), by reason",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        for reason in ("overflow", "shutdown", "rejected"):  # zero from the start, as above
            self.api_audit_lost_total.labels(reason=reason)

    def _api_key_metrics(self, ns: str, reg: CollectorRegistry) -> None:
        """API keys (chargegw.domain.auth, chargegw.api.scopes)."""
        #: requests refused for their key, by ``reason`` (missing_key, unknown_key,
        #: key_expired, key_revoked, signature_*, network, scope, device)
        self.api_auth_refused_total = Counter(
            "api_auth_refused",
            "HTTP requests refused with 401 or 403 for their API key, by reason",
            ["reason"],
            namespace=ns,
            registry=reg,
        )

    def _webhook_metrics(self, ns: str, reg: CollectorRegistry) -> None:
        """Webhook delivery (chargegw.domain.webhook_delivery)."""
        #: every attempt, by ``result``: delivered, or why it failed (timeout, connect,
        #: dns, tls, closed, protocol, too_large, redirect, gone, status_4xx, status_5xx,
        #: private_address, invalid_url, cancelled)
        self.webhook_attempts_total = Counter(
            "webhook_attempts",
            "Webhook attempts, by result (delivered or the reason it failed)",
            ["result"],
            namespace=ns,
            registry=reg,
        )
        #: deliveries finished, by ``result``: delivered, failed (given up), cancelled
        self.webhook_deliveries_total = Counter(
            "webhook_deliveries",
            "Webhook deliveries finished, by result (delivered, failed, cancelled)",
            ["result"],
            namespace=ns,
            registry=reg,
        )
        #: from the event (its server time) to the receiver's 2xx
        self.webhook_delivery_latency_seconds = Histogram(
            "webhook_delivery_latency_seconds",
            "Time from an event to the receiver's 2xx answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            namespace=ns,
            registry=reg,
        )
        #: open deliveries (queued, pending, delivering) by ``subscription_id``, as the
        #: engine last counted them (every process reports the same figures)
        self.webhook_backlog = Gauge(
            "webhook_backlog",
            "Webhook deliveries not finished yet, by subscription",
            ["subscription_id"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=RECENT,
        )
        #: attempts running in this process
        self.webhook_in_flight = Gauge(
            "webhook_in_flight",
            "Webhook attempts in flight in this process",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        #: subscriptions disabled automatically, by ``reason`` (failing, gone)
        self.webhook_subscriptions_disabled_total = Counter(
            "webhook_subscriptions_disabled",
            "Webhook subscriptions disabled automatically, by reason (failing, gone)",
            ["reason"],
            namespace=ns,
            registry=reg,
        )

    def _operations_metrics(self, ns: str, reg: CollectorRegistry) -> None:
        """What an operator's alerts and dashboards ask besides the above (issue 14):
        command outcomes, backlog age, settlement ingest, process health."""
        #: first attempts written to a pile (the denominator of the resend ratio)
        self.commands_sent_total = Counter(
            "commands_sent",
            "Commands written to a pile (first attempt), by protocol and command",
            ["protocol", "command"],
            namespace=ns,
            registry=reg,
        )
        #: start commands by ``outcome``: acked, refused (the pile said no), timeout (no
        #: answer to the send and the resend), offline (expired while the device was
        #: offline), failed (anything else: cancelled, cannot encode, after_failed ...)
        self.start_commands_total = Counter(
            "start_commands",
            "Start commands finished (AP3000 0x82, BKV start), by protocol and outcome",
            ["protocol", "outcome"],
            namespace=ns,
            registry=reg,
        )
        #: age of the oldest open command in the whole outbox, at the last scan
        self.outbox_oldest_pending_seconds = Gauge(
            "outbox_oldest_pending_seconds",
            "Age of the oldest open (pending or sent) command at the last outbox scan, 0 if none",
            namespace=ns,
            registry=reg,
            multiprocess_mode=RECENT,
        )
        #: settlement reports received whose commit (and so the pile's ACK) is pending
        self.settlements_waiting = Gauge(
            "settlements_waiting",
            "Settlement reports not committed yet: their ACK to the pile waits on the database",
            namespace=ns,
            registry=reg,
            multiprocess_mode=SUM,
        )
        #: from a settlement report's arrival to its commit (retries included)
        self.settlement_ingest_seconds = Histogram(
            "settlement_ingest_seconds",
            "Time from a settlement report's arrival to its commit, by protocol",
            ["protocol"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            namespace=ns,
            registry=reg,
        )
        # -- process health, per worker (chargegw.process_health samples them) --
        self.worker_behind = Gauge(
            "worker_behind",
            "1 while the worker's event loop lags past overload_lag_s: it answers devices "
            "late and takes no new device connections' silence against them",
            ["worker"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.worker_up = Gauge(
            "worker_up",
            "1 while the worker process runs",
            ["worker"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.workers_configured = Gauge(
            "workers_configured",
            "Worker processes the node is configured to run (--workers)",
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.worker_starts_total = Counter(
            "worker_starts",
            "Times a worker process started, by worker index (restarts included)",
            ["worker"],
            namespace=ns,
            registry=reg,
        )
        self.event_loop_lag_seconds = Histogram(
            "event_loop_lag_seconds",
            "How late a periodic timer fires on the worker's event loop",
            ["worker"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            namespace=ns,
            registry=reg,
        )
        self.process_resident_memory_bytes = Gauge(
            "process_resident_memory_bytes",
            "Resident memory of the worker process",
            ["worker"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.process_open_fds = Gauge(
            "process_open_fds",
            "Open file descriptors of the worker process",
            ["worker"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.process_max_fds = Gauge(
            "process_max_fds",
            "Open-file limit (soft RLIMIT_NOFILE) of the worker process",
            ["worker"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )
        self.process_cpu_seconds_total = Counter(
            "process_cpu_seconds",
            "CPU time (user and system) of the worker process",
            ["worker"],
            namespace=ns,
            registry=reg,
        )

    def _housekeeping_metrics(self, ns: str, reg: CollectorRegistry) -> None:
        """Scheduled data housekeeping (docs/operations.md, "Housekeeping"): each ``task``
        (audit_partitions, device_events, events, commands, webhook_deliveries,
        call_audit) runs in one process at a time; :meth:`housekeeping_done` counts it."""
        self.housekeeping_runs_total = Counter(
            "housekeeping_runs",
            "Housekeeping passes of this process (finding another at work counts), by task, result",
            ["task", "result"],
            namespace=ns,
            registry=reg,
        )
        self.housekeeping_rows_deleted_total = Counter(
            "housekeeping_rows_deleted",
            "Rows deleted by housekeeping past their retention, by task",
            ["task"],
            namespace=ns,
            registry=reg,
        )
        self.housekeeping_partitions_total = Counter(
            "housekeeping_partitions",
            "Partitions created ahead or dropped past the retention, by table and action",
            ["table", "action"],
            namespace=ns,
            registry=reg,
        )
        self.housekeeping_last_success_timestamp_seconds = Gauge(
            "housekeeping_last_success_timestamp_seconds",
            "Unix time of the last housekeeping pass that completed, by task",
            ["task"],
            namespace=ns,
            registry=reg,
            multiprocess_mode=MAX,
        )

    def housekeeping_done(self, job: str, *, deleted: int = 0) -> None:
        """A housekeeping pass of ``job`` completed, deleting ``deleted`` rows."""
        self.housekeeping_runs_total.labels(task=job, result="ok").inc()
        if deleted:
            self.housekeeping_rows_deleted_total.labels(task=job).inc(deleted)
        self.housekeeping_last_success_timestamp_seconds.labels(task=job).set_to_current_time()

    def housekeeping_failed(self, job: str) -> None:
        """A housekeeping pass of ``job`` failed (it is retried at its next turn)."""
        self.housekeeping_runs_total.labels(task=job, result="failed").inc()

    @property
    def multiprocess_dir(self) -> str | None:
        """The shared directory of the node's workers' values (None: this process only)."""
        return self._multiprocess_dir

    def render(self) -> tuple[bytes, str]:
        """The exposition of every metric and its content type, for ``GET /metrics``:
        with several workers, of all the node's workers (any of them answers)."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
