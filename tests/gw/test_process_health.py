"""A gateway's process health figures (chargegw.process_health), with the worker label."""

from __future__ import annotations

from chargegw.app import Gateway

from .metric_values import sample
from .waiting import eventually


async def test_a_gateway_reports_its_process_health(gateway: Gateway) -> None:
    m = gateway.metrics
    assert sample(m, "chargegw_worker_up", worker="0") == 1
    assert sample(m, "chargegw_workers_configured") == 1
    assert sample(m, "chargegw_worker_starts_total", worker="0") == 1
    assert sample(m, "chargegw_process_open_fds", worker="0") > 3
    assert sample(m, "chargegw_process_max_fds", worker="0") >= 64
    assert sample(m, "chargegw_process_resident_memory_bytes", worker="0") > 10_000_000
    assert sample(m, "chargegw_process_cpu_seconds_total", worker="0") > 0
    # the lag probe ticks every 0.5 s
    await eventually(lambda: sample(m, "chargegw_event_loop_lag_seconds_count", worker="0") >= 1)
    await gateway.stop()
    assert sample(m, "chargegw_worker_up", worker="0") == 0
