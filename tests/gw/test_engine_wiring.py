"""Drivers and engines meet only through domain/ports.py: the engines register their
handlers with the drivers, the drivers' codecs check the engines' commands, and the
state SQL takes its states from the tables."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from chargegw.app import Gateway
from chargegw.config import Settings
from chargegw.domain import firmware, params
from chargegw.domain.device_selector import Selector
from chargegw.domain.ports import Inbound
from chargegw.drivers import ap3000_commands, bkv_commands
from chargegw.drivers.ap3000_commands import Ap3000Commands
from chargegw.drivers.base import Hooks
from chargegw.drivers.bkv_commands import BkvCommands
from chargeproto import ap3000, bkv

GENERIC: dict[str, dict[str, Any]] = {
    "ap3000": ap3000_commands.GENERIC,
    "bkv": bkv_commands.GENERIC,
}


@pytest.mark.parametrize("group", list(params.GROUPS.values()), ids=list(params.GROUPS))
def test_every_group_names_commands_its_driver_builds(group: params.Group) -> None:
    assert group.set_command in GENERIC[group.protocol]
    assert group.read_command is None or group.read_command in GENERIC[group.protocol]


def test_parameters_are_checked_with_the_drivers_encoding() -> None:
    params.use_encodings({"ap3000": Ap3000Commands(), "bkv": BkvCommands()})
    device = params.ANY_DEVICE["bkv"]
    with pytest.raises(params.ParamsError) as caught:
        params.prepare("bkv", device, "socket_params", {"power_limit_w": 7000.0}, None)
    assert caught.value.field == "power_limit_w"
    fields = {"power_limit_w": 500.04}
    assert params.prepare("bkv", device, "socket_params", fields, None) == {"power_limit_w": 500.0}


def _registration() -> Inbound[ap3000.Registration]:
    message = ap3000.Registration(
        phy_id="04000001",
        msg_id=1,
        firmware_version=312,
        port_count=2,
        virtual_id=0,
        device_type=1,
    )
    link: Any = None  # the handlers below do not touch the connection
    return Inbound(link, message, "04000001", "04000001", None, lambda reply: None)


def test_hooks_take_their_protocol_only_and_a_failing_handler_stops_no_other() -> None:
    hooks = Hooks("ap3000", ap3000.Ap3000Message)
    with pytest.raises(TypeError, match="not a ap3000 message"):
        hooks.on(bkv.Heartbeat, lambda inbound: None)
    heard: list[str] = []

    def broken(inbound: Inbound[ap3000.Registration]) -> None:
        raise RuntimeError("an engine's bug")

    hooks.on(ap3000.Registration, broken)
    hooks.on(ap3000.Registration, lambda inbound: heard.append(inbound.owner))
    assert hooks.wants(ap3000.Registration) and not hooks.wants(ap3000.Heartbeat)
    hooks.tell(_registration())
    assert heard == ["04000001"]


def test_the_gateway_registers_the_engines_with_both_drivers() -> None:
    values: dict[str, Any] = {"dsn": "postgresql://unused/none", "device_port": 0}
    gateway = Gateway(Settings(**values))
    ap3000_hooks = gateway.drivers["ap3000"].hooks
    bkv_hooks = gateway.drivers["bkv"].hooks
    ap3000_wanted: set[type[Any]] = {*params.PROTOCOL_REPLIES["ap3000"], *firmware.AP3000_MESSAGES}
    bkv_wanted: set[type[Any]] = {
        *params.PROTOCOL_REPLIES["bkv"],
        bkv.StatusCluster,
        bkv.SocketState,
        bkv.Heartbeat,
    }
    assert all(ap3000_hooks.wants(cls) for cls in ap3000_wanted)
    assert all(bkv_hooks.wants(cls) for cls in bkv_wanted)
    assert not ap3000_hooks.wants(ap3000.Settlement)  # settlements are the driver's own


async def test_cancelling_leaves_a_rebooting_target_to_be_verified(db_dsn: str) -> None:
    """The cancel statement moves only the states the table lets it move."""
    conn = await asyncpg.connect(db_dsn)
    try:
        for device_id in ("04000001", "04000002"):
            await conn.execute(
                """INSERT INTO devices (device_id, protocol, device_type, firmware, online)
                   VALUES ($1, 'ap3000', 1, '312', true)""",
                device_id,
            )
        spec = firmware.validate_image(
            protocol="ap3000",
            family="F8",
            device_type=1,
            version="313",
            packet_size=None,
            body=bytes(600),
            max_bytes=1 << 20,
        )
        image = await firmware.store_image(conn, spec, bytes(600))
        job_id = await firmware.create_job(
            conn,
            firmware_id=image["firmware_id"],
            selector_raw={"device_ids": ["04000001", "04000002"]},
            selector=Selector(device_ids=("04000001", "04000002")),
            concurrency=2,
            rate_per_min=2,
            force=False,
        )
        # one transfer is over and awaits the reboot, the other still queued
        await conn.execute(
            "UPDATE upgrade_targets SET state = $1 WHERE target_id = '04000001'",
            firmware.TargetState.REBOOTING.value,
        )
        await firmware.cancel_job(conn, job_id)
        view = await firmware.job_view(conn, job_id)
    finally:
        await conn.close()
    states = {d["device_id"]: d["state"] for d in view["devices"]}
    assert states == {"04000001": "rebooting", "04000002": "cancelled"}
    assert view["counts"]["rebooting"] == 1 and view["counts"]["cancelled"] == 1
