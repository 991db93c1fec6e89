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


def test_a_full_collection_frees_cycles_and_freezes_the_survivors() -> None:
    """What the probe does every ``gc_full_s``: garbage in cycles is freed (the frozen
    objects too: it unfreezes first), what survives is frozen."""
    import gc
    import weakref

    from chargegw.metrics import Metrics
    from chargegw.process_health import ProcessHealth

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    health = ProcessHealth(Metrics(), 0, 1, gc_full_s=300.0)
    try:
        kept = Node()
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        health.collect_and_freeze()  # the cycle is in use: frozen
        assert gc.get_freeze_count() > 0
        del a, b  # garbage now, but frozen: CPython's own passes do not see it
        gc.collect()
        assert alive() is not None
        health.collect_and_freeze()
        assert alive() is None and kept.other is None
    finally:
        gc.unfreeze()
