"""Unchanged device, gateway and port state is not rewritten until ``state_refresh_s``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

from chargegw.metrics import Metrics
from chargegw.store.writer import (
    BatchWriter,
    DeviceRow,
    GatewayRow,
    PortRow,
    _Batch,
    _Stamps,
    port_mask,
)

from .waiting import eventually


def _writer(refresh_s: float) -> BatchWriter:
    return BatchWriter(lambda: None, Metrics(), refresh_s=refresh_s)


def test_a_repeated_state_row_is_put_once_per_refresh_period() -> None:
    writer = _writer(3600.0)
    port = ("04000001", 1)
    first = datetime.now(UTC)
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0, reported_at=first))
    assert writer.pending("ports")[port]["reported_at"] == first
    # the same values again (newer timestamps only): no upsert, only the timestamp moves
    for _ in range(2):
        later = datetime.now(UTC)
        writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0, reported_at=later))
        assert writer.pending("ports")[port]["reported_at"] == first
        assert writer.pending_touches("ports") == {port: later}
    # a changed value is written at once, as is another port or another column set
    writer.put_port(PortRow("04000001", 1, status="charging", voltage_v=220.0))
    assert writer.pending("ports")[port]["status"] == "charging"
    writer.put_port(PortRow("04000001", 2, status="idle", voltage_v=220.0))
    writer.put_port(PortRow("04000001", 1, status="charging"))
    assert set(writer.pending("ports")) == {port, ("04000001", 2)}  # port 1 coalesced
    # rows carrying a dict (attributes) are compared too
    writer.put_device(DeviceRow("04000001", protocol="ap3000", attributes={"a": 1}))
    writer.put_device(DeviceRow("04000001", protocol="ap3000", attributes={"a": 1}))
    writer.put_device(DeviceRow("04000001", protocol="ap3000", attributes={"a": 2}))
    assert writer.pending("devices")["04000001"]["attributes"] == {"a": 2}


async def test_unchanged_state_is_written_again_after_the_refresh_period() -> None:
    writer = _writer(0.05)
    upserts = 0

    def put() -> int:
        """Put the same gateway again; how many puts were upserts (not only touches)."""
        nonlocal upserts
        seen = datetime.now(UTC)
        writer.put_gateway(GatewayRow("82231214000001", protocol="bkv", last_seen_at=seen))
        if writer.pending("gateways")["82231214000001"]["last_seen_at"] == seen:
            upserts += 1
        return upserts

    await eventually(put, lambda n: n >= 3, what="three upserts", timeout=2.0, interval=0.01)


async def test_touches_move_timestamps_forward_only(db_pool: asyncpg.Pool) -> None:
    writer = BatchWriter(lambda: db_pool, Metrics(), refresh_s=3600.0)
    writer.start()
    try:
        t0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
        writer.put_gateway(GatewayRow("04000001", protocol="ap3000", last_seen_at=t0))
        writer.put_device(
            DeviceRow("04000001", protocol="ap3000", gateway_id="04000001", last_seen_at=t0)
        )
        writer.put_port(PortRow("04000001", 1, status="idle", reported_at=t0))
        await writer.drained()
        t1, t2 = t0 + timedelta(minutes=3), t0 + timedelta(minutes=6)
        writer.put_gateway(GatewayRow("04000001", protocol="ap3000", last_seen_at=t1))
        writer.put_device(
            DeviceRow("04000001", protocol="ap3000", gateway_id="04000001", last_seen_at=t2)
        )
        writer.touch_device("04000001", None, t2)  # a heartbeat
        writer.touch_device("04000001", t1, None)  # an older one arriving late
        writer.put_port(PortRow("04000001", 1, status="idle", reported_at=t2))
        assert not writer.pending("devices") and not writer.pending("ports")
        await writer.drained()
        device = await db_pool.fetchrow("SELECT * FROM devices WHERE device_id = '04000001'")
        port = await db_pool.fetchrow("SELECT * FROM ports WHERE device_id = '04000001'")
        gateway = await db_pool.fetchval(
            "SELECT last_seen_at FROM gateways WHERE gateway_id = '04000001'"
        )
        assert device["last_seen_at"] == t2 and device["last_heartbeat_at"] == t2
        assert port["reported_at"] == t2 and port["status"] == "idle"
        assert gateway == t1
    finally:
        await writer.close()


def test_a_failed_batch_keeps_the_latest_port_report_time_of_its_touches() -> None:
    """A batch the database refused is written again with the rows put meanwhile: each
    device's touched times (port report time included) keep the later of the two."""
    t0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    t1, t2 = t0 + timedelta(minutes=3), t0 + timedelta(minutes=6)
    failed, newer = _Batch(), _Batch()
    failed.touched_devices["04000001"] = (t1, t1, t2)
    newer.touched_devices["04000001"] = (t2, None, t1)
    newer.touched_devices["04000002"] = (None, None, t0)
    failed.absorb(newer)
    assert failed.touched_devices == {"04000001": (t2, t1, t2), "04000002": (None, None, t0)}


def test_refresh_zero_writes_every_time() -> None:
    writer = _writer(0.0)
    for _ in range(3):
        seen = datetime.now(UTC)
        writer.put_device(
            DeviceRow("04000001", protocol="ap3000", voltage_v=220.0, last_seen_at=seen)
        )
        assert writer.pending("devices")["04000001"]["last_seen_at"] == seen  # upserted
    assert not writer.pending_touches("devices")


def test_a_repeated_report_is_known_until_a_row_of_its_device_changes() -> None:
    """``repeated`` lets a driver skip building the rows of a report equal to the last
    one; any changed row of the device (another report's), or ``forget``, ends that."""
    writer = _writer(3600.0)
    same, key = writer.repeated("04000001", (0, 0), 18, 30, 220.0)
    assert not same
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0))
    writer.remember_repeat("04000001", key)
    assert writer.repeated("04000001", (0, 0), 18, 30, 220.0) == (True, key)
    assert not writer.repeated("04000001", (0, 1), 18, 30, 220.0)[0]  # other content
    assert not writer.repeated("04000002", (0, 0), 18, 30, 220.0)[0]  # another device
    # the same row again changes nothing; another report's changed row does
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0))
    assert writer.repeated("04000001", (0, 0), 18, 30, 220.0)[0]
    writer.put_port(PortRow("04000001", 1, status="charging", power_w=180.0))
    assert not writer.repeated("04000001", (0, 0), 18, 30, 220.0)[0]
    writer.remember_repeat("04000001", key)
    writer.put_device(DeviceRow("04000001", protocol="ap3000", firmware="7"))
    assert not writer.repeated("04000001", (0, 0), 18, 30, 220.0)[0]
    writer.remember_repeat("04000001", key)
    writer.forget("p", ("04000001", 2))
    assert not writer.repeated("04000001", (0, 0), 18, 30, 220.0)[0]
    # without a refresh period every row is written: nothing is ever a repeat
    plain = _writer(0.0)
    plain.remember_repeat("04000001", plain.repeated("04000001", 1)[1])
    assert not plain.repeated("04000001", 1)[0]


def test_forgetting_a_device_forgets_its_ports_and_its_last_report() -> None:
    """A device that comes back (from another connection or process, whose rows may
    have changed meanwhile) gets its port rows written again, equal or not."""
    writer = _writer(3600.0)
    port = ("04000001", 1)
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0))
    _, key = writer.repeated("04000001", 1)
    writer.remember_repeat("04000001", key)
    writer._take()
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0))
    assert port not in writer.pending("ports")  # unchanged: a touch at most
    writer.forget("d", "04000001")
    assert not writer.repeated("04000001", 1)[0]
    writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0))
    assert writer.pending("ports")[port]["status"] == "idle"
    writer.put_port(PortRow("04000002", 1, status="idle", voltage_v=220.0))
    writer._take()
    writer.put_port(PortRow("04000002", 1, status="idle", voltage_v=220.0))
    assert not writer.pending("ports")  # another device's memory stays


def test_a_port_mask_covers_ports_1_to_31() -> None:
    assert port_mask([1, 2]) == 0b11
    assert port_mask([3, 0, 32, 200, -1]) == 0b100
    assert port_mask([]) == 0


# keys crowded into few low bits (long probe chains, wrap-around at the end of the
# table) and spread over the whole range of hash(), never -1 (hash() never returns it)
_KEYS = st.one_of(
    st.integers(0, 40).map(lambda n: n * 1024 + 1023),
    st.integers(-(2**63) + 1, 2**63 - 1).filter(lambda n: n != -1),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _KEYS, _KEYS),
        st.tuples(st.just("forget"), _KEYS, st.none()),
        st.tuples(st.just("get"), _KEYS, st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=3000,
)


@settings(max_examples=60, deadline=None)
@given(_OPS)
def test_the_writers_memory_answers_as_a_dict_would(ops: list[tuple[str, int, int]]) -> None:
    """The compact table behind the writer's memory of unchanged rows: whatever the
    puts, forgets, growths and clears, it answers as a dict."""
    stamps, model = _Stamps(), dict[int, int]()
    for op, key, value in ops:
        if op == "put":
            assert stamps.put(key, value) == (model.get(key) == value)
            model[key] = value
        elif op == "forget":
            stamps.forget(key)
            model.pop(key, None)
        elif op == "clear":
            stamps.clear()
            model.clear()
        assert stamps.get(key if key is not None else 0) == model.get(
            key if key is not None else 0, -1
        )
    for key, value in model.items():
        assert stamps.get(key) == value
    assert len(stamps) >= len(model)


def test_the_writers_memory_grows_and_drops_forgotten_entries() -> None:
    stamps = _Stamps()
    for key in range(1, 5001):
        stamps.put(key * 7919, key)
    for key in range(1, 4001):
        stamps.forget(key * 7919)
    for key in range(5001, 9001):  # growths on the way drop the forgotten entries
        stamps.put(key * 7919, key)
    assert all(stamps.get(key * 7919) == -1 for key in range(1, 4001))
    assert all(stamps.get(key * 7919) == key for key in range(4001, 9001))
    assert len(stamps) < 9000
