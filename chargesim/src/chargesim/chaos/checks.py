"""The invariants of a chaos run, checked against the database and the piles' ledgers.

The database is read by column name (the schema may gain columns). The piles' side is a
:class:`SimSnapshot` taken after the quiet period: their ledgers (every session they
ended, as reported, and whether the server acknowledged it), which ports charge which
session, who holds a connection, and the start and stop commands each pile received.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterable
from typing import Any, Final

import asyncpg

from chargeproto import ap3000, bkv
from chargesim import LedgerEntry, SimulatedAp3000Pile, SimulatedBkvGateway, Simulator
from chargesim.chaos.driver import ApiCall

OPEN: Final = frozenset({"pending", "starting", "charging", "stopping"})
FINAL: Final = frozenset({"acked", "failed", "dead"})
#: half the reporting unit: AP3000 energy is in 0.01 kWh, BKV energy in 0.001 kWh
_ENERGY_TOLERANCE: Final = {"ap3000": 0.005, "bkv": 0.0005}
#: violations per invariant whose audit frames are looked up
FRAMES_FOR: Final = 15
#: a pile connected this long, with the database up, is reachable: a command for it
#: must not die "offline" (seconds; several ACK timeouts and a dead-process sweep)
REACHABLE_S: Final = 15.0
#: a pile whose connection opened or closed this recently is not compared with the
#: online flag (the platform writes it in batches; seconds)
SETTLING_S: Final = 5.0

INVARIANTS: Final = {
    "a": "every command ends acked, failed or dead with a reason; none lost",
    "b": "every ended session has exactly one order, settled, with its energy and duration",
    "c": "no order is open on a port the pile reports idle",
    "d": "devices.online matches whether the pile holds a connection",
    "e": "no card below zero; every card deduction matches its order, one per order",
    "f": "no settlement applied twice; no settled order without a session",
    "g": "no settlement the pile was acknowledged for is missing in the database",
    "h": "no stop reaches the pile before its own start",
    "i": "one Idempotency-Key, one answer; a duplicate start is accepted once",
    "j": "no command dies 'offline' while its pile is connected",
    "q": "every settlement acknowledged by the end of the quiet period",
}


@dataclasses.dataclass(slots=True)
class Violation:
    """One broken invariant, with what identifies it and the evidence."""

    invariant: str
    what: str
    device_id: str | None = None
    port: int | None = None
    orders: list[str] = dataclasses.field(default_factory=list)
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: wall-clock time (Unix seconds) around which the audit frames are looked up
    at: float | None = None
    frames: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class InvariantResult:
    """How many things an invariant looked at, and what it found wrong."""

    key: str
    title: str
    checked: int = 0
    violations: list[Violation] = dataclasses.field(default_factory=list)

    def add(self, what: str, **fields: Any) -> None:
        self.violations.append(Violation(self.key, what, **fields))

    def to_json(self) -> dict[str, Any]:
        return {
            "invariant": self.key,
            "title": self.title,
            "checked": self.checked,
            "violations": len(self.violations),
            "items": [v.to_json() for v in self.violations],
        }


# --- the piles' side ---------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Control:
    """A start or stop command a pile received (``t``: the pile's monotonic clock)."""

    device_id: str
    port: int
    start: bool
    t: float
    order_id: str | None = None
    seq: int | None = None


@dataclasses.dataclass(slots=True)
class SimSnapshot:
    """What the piles know, at one moment."""

    ledger: list[LedgerEntry]
    #: (device, port) -> the running session's order id (AP3000) or business number
    charging: dict[tuple[str, int], str | int]
    connected: dict[str, bool]
    controls: list[Control]
    ports: int
    #: device -> (opened, closed) of the pile's connections (closed None: open)
    spans: dict[str, list[tuple[float, float | None]]] = dataclasses.field(default_factory=dict)
    taken_at: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def take(cls, sim: Simulator) -> SimSnapshot:
        charging: dict[tuple[str, int], str | int] = {}
        connected: dict[str, bool] = {}
        controls: list[Control] = []
        ports = 0
        spans: dict[str, list[tuple[float, float | None]]] = {}
        for pile in sim.piles:
            log = [(span.opened, span.closed) for span in pile.connection_log]
            for device_id in pile.device_ids():
                connected[device_id] = pile.connected
                spans[device_id] = log
            if isinstance(pile, SimulatedAp3000Pile):
                ports += len(pile.ports)
                for p in pile.ports:
                    if p.session is not None:
                        charging[(pile.phy_id, p.index + 1)] = p.session.order_id
                for r in pile.received(0x82):
                    m = r.message
                    if isinstance(m, ap3000.ChargeControl):
                        controls.append(
                            Control(
                                pile.phy_id,
                                m.port + 1,
                                m.charge_command == 1,
                                r.t,
                                order_id=m.order_id,
                            )
                        )
            elif isinstance(pile, SimulatedBkvGateway):
                for sock in pile.sockets.values():
                    device_id = bkv.socket_id(pile.gateway_id, sock.number)
                    ports += len(sock.jacks)
                    for jack in sock.jacks:
                        if jack.session is not None:
                            charging[(device_id, jack.port + 1)] = jack.session.business_no
                for r in pile.received():
                    m = r.message
                    if isinstance(m, bkv.ChargeControl):
                        controls.append(
                            Control(
                                bkv.socket_id(pile.gateway_id, m.socket),
                                m.port + 1,
                                m.switch == 1,
                                r.t,
                                seq=m.seq,
                            )
                        )
        return cls(list(sim.ledger()), charging, connected, controls, ports, spans)


# --- the database's side -----------------------------------------------------------------


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


@dataclasses.dataclass(slots=True)
class DbState:
    """The rows the checks need, read by column name."""

    commands: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    settlement_events: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]
    cards: list[dict[str, Any]]
    card_transactions: list[dict[str, Any]]
    order_charges: dict[str, dict[str, Any]]

    @classmethod
    async def load(cls, conn: asyncpg.Connection[Any]) -> DbState:
        async def rows(sql: str) -> list[dict[str, Any]]:
            return [dict(r) for r in await conn.fetch(sql)]

        commands = await rows(
            """SELECT command_id, device_id, name, status, order_no, correlation, attempts,
                      created_at, sent_at, finished_at, result_code, result_text, dead_reason
               FROM commands ORDER BY command_id"""
        )
        orders = await rows(
            """SELECT order_no, device_id, port, protocol, status, start_mode,
                      device_initiated, business_no, card_id, created_at, started_at,
                      ended_at, duration_s, energy_kwh, failure_reason,
                      settlement::text AS settlement
               FROM orders ORDER BY created_at, order_no"""
        )
        for order in orders:
            order["settlement"] = _json(order["settlement"])
        events = await rows(
            """SELECT id, device_id, at, reason, detail::text AS detail FROM device_events
               WHERE kind = 'settlement' ORDER BY id"""
        )
        for event in events:
            event["detail"] = _json(event["detail"]) or {}
        devices = {
            r["device_id"]: r
            for r in await rows(
                "SELECT device_id, protocol, online, offline_reason, last_seen_at FROM devices"
            )
        }
        cards = await rows("SELECT card_id, status, balance_cent FROM cards ORDER BY card_id")
        transactions = await rows(
            """SELECT id, card_id, kind, amount_cent, balance_after_cent, order_no,
                      shortfall_cent FROM card_transactions ORDER BY id"""
        )
        charges = {
            r["order_no"]: r
            for r in await rows(
                """SELECT order_no, card_id, amount_cent, card_charged_cent, shortfall_cent
                   FROM order_charges"""
            )
        }
        return cls(commands, orders, events, devices, cards, transactions, charges)


# --- matching sessions and orders --------------------------------------------------------


def _end_time(report: Any) -> str | None:
    value = getattr(report, "end_time", None)
    return value if isinstance(value, str) else None


#: BKV end reports: (sub-command, TLV command) of each kind, as settlement fields name them
_REPORT_KINDS: Final[dict[type, tuple[int | None, int | None]]] = {
    bkv.EndReport: (0x02, None),
    bkv.PowerTierEndReport: (0x18, None),
    bkv.FeeModeEndReport: (None, 0x1004),
}


def _same_values(entry: LedgerEntry, fields: dict[str, Any]) -> bool:
    """Whether a settlement's fields (an order's ``settlement``, an event's ``detail``)
    describe the BKV session ``entry``: the kind of report, port, energy, minutes, end
    time, and the business number: the same, or absent from both (the report left tag
    0x0A out). Live readings do not count."""
    if not isinstance(fields, dict):
        return False
    if fields.get("business_no") != (None if entry.tag_omitted else entry.business_no):
        return False
    kind = _REPORT_KINDS.get(type(entry.report))
    if kind is not None and (fields.get("sub_cmd"), fields.get("bkv_cmd")) != kind:
        return False
    if fields.get("port") is not None and fields.get("port") != entry.port - 1:
        return False
    energy, minutes = fields.get("energy_kwh"), fields.get("duration_min")
    if not isinstance(energy, int | float) or not isinstance(minutes, int):
        return False
    if abs(energy - entry.energy_kwh) > _ENERGY_TOLERANCE["bkv"]:
        return False
    if minutes * 60 != entry.duration_s:
        return False
    return fields.get("end_time") == _end_time(entry.report)


class Matcher:
    """Which orders and settlement events belong to which ended session.

    AP3000: the order number is the pile's order id. BKV: device, port and the business
    number; an order or event without a business number (the report left tag 0x0A out)
    belongs to the session whose settlement values it carries.
    """

    def __init__(self, ledger: list[LedgerEntry], orders: list[dict[str, Any]]) -> None:
        self.by_order_id: dict[str, LedgerEntry] = {}
        self.by_port: dict[tuple[str, int], list[LedgerEntry]] = collections.defaultdict(list)
        for entry in ledger:
            if entry.order_id is not None:
                self.by_order_id[entry.order_id] = entry
            else:
                self.by_port[(entry.device_id, entry.port)].append(entry)
        self.orders_by_no = {o["order_no"]: o for o in orders}
        self.orders_by_port: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(
            list
        )
        for order in orders:
            self.orders_by_port[(order["device_id"], order["port"])].append(order)

    def sessions_of_order(self, order: dict[str, Any]) -> list[LedgerEntry]:
        """The sessions an order stands for (normally one; none for a phantom)."""
        if order["protocol"] == "ap3000":
            entry = self.by_order_id.get(order["order_no"])
            return [] if entry is None else [entry]
        candidates = self.by_port.get((order["device_id"], order["port"]), [])
        settlement = order["settlement"] if isinstance(order["settlement"], dict) else {}
        business_no = order["business_no"]
        if business_no is None:
            business_no = settlement.get("business_no")
        if business_no is not None:
            return [e for e in candidates if e.business_no == business_no]
        return [e for e in candidates if _same_values(e, settlement)]

    def orders_of_session(self, entry: LedgerEntry) -> list[dict[str, Any]]:
        """The orders that stand for a session (exactly one when all is well)."""
        if entry.order_id is not None:
            order = self.orders_by_no.get(entry.order_id)
            return [] if order is None else [order]
        return [
            o
            for o in self.orders_by_port.get((entry.device_id, entry.port), [])
            if entry in self.sessions_of_order(o)
        ]

    def sessions_of_event(self, event: dict[str, Any]) -> list[LedgerEntry]:
        """The sessions a settlement event's detail describes."""
        detail = event["detail"]
        order_id = detail.get("order_id")
        if isinstance(order_id, str):
            entry = self.by_order_id.get(order_id)
            return [] if entry is None else [entry]
        port = detail.get("port")
        if not isinstance(port, int):
            return []
        candidates = self.by_port.get((event["device_id"], port + 1), [])
        return [e for e in candidates if _same_values(e, detail)]


def _wall(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _order_brief(order: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "order_no",
        "status",
        "business_no",
        "device_initiated",
        "energy_kwh",
        "duration_s",
        "failure_reason",
    )
    return {k: order.get(k) for k in keys}


def _entry_brief(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "order_id": entry.order_id,
        "business_no": entry.business_no,
        "started_by": entry.started_by,
        "energy_kwh": entry.energy_kwh,
        "duration_s": entry.duration_s,
        "stop_reason": entry.stop_reason,
        "copies_sent": entry.copies_sent,
        "copies_changed": entry.copies_changed,
        "acked": entry.acked,
        "acks_lost": entry.acks_lost,
        "tag_omitted": entry.tag_omitted,
        "ended_at": dt.datetime.fromtimestamp(entry.ended_at, dt.UTC).isoformat(),
    }


# --- the invariants ----------------------------------------------------------------------


def check_all(
    sim: SimSnapshot,
    db: DbState,
    calls: list[ApiCall],
    database_faults: list[tuple[float, float]] | None = None,
) -> list[InvariantResult]:
    """Every invariant, in the order of :data:`INVARIANTS`; ``database_faults`` are the
    (begin, end) wall-clock times of the outages and read-only periods."""
    matcher = Matcher(sim.ledger, db.orders)
    return [
        check_commands(db, calls),
        check_sessions_settled(sim, matcher),
        check_open_orders(sim, db),
        check_online(sim, db),
        check_cards(db),
        check_no_double_settlement(sim, db, matcher),
        check_acked_present(sim, matcher),
        check_stop_after_start(sim, db),
        check_idempotency(calls, database_faults or []),
        check_offline_deaths(sim, db, database_faults or []),
        check_quiet(sim),
    ]


def _result(key: str) -> InvariantResult:
    return InvariantResult(key, INVARIANTS[key])


def check_commands(db: DbState, calls: list[ApiCall]) -> InvariantResult:
    """a: final states with reasons; what the API accepted exists."""
    result = _result("a")
    by_id = {c["command_id"]: c for c in db.commands}
    orders = {o["order_no"] for o in db.orders}
    for command in db.commands:
        result.checked += 1
        status = command["status"]
        common = {
            "device_id": command["device_id"],
            "orders": [command["order_no"]] if command["order_no"] else [],
            "at": _wall(command["created_at"]),
            "detail": {k: _jsonable(v) for k, v in command.items()},
        }
        if status not in FINAL:
            result.add(
                f"command {command['command_id']} ({command['name']}) stuck in {status}", **common
            )
        elif status == "failed" and command["result_code"] is None and not command["result_text"]:
            result.add(f"command {command['command_id']} failed without a result", **common)
        elif status == "dead" and not command["dead_reason"]:
            result.add(f"command {command['command_id']} dead without a reason", **common)
    for call in calls:
        if not call.accepted or not isinstance(call.body, dict):
            continue
        result.checked += 1
        command_id, order_no = call.body.get("command_id"), call.body.get("order_no")
        common = {
            "device_id": call.device_id,
            "port": call.port,
            "at": call.at,
            "detail": call.to_json(),
        }
        if command_id is not None and command_id not in by_id:
            result.add(
                f"command {command_id} accepted by the API (202) is not in the database",
                orders=[order_no] if order_no else [],
                **common,
            )
        if order_no and call.path.endswith("/start") and order_no not in orders:
            result.add(
                f"order {order_no} accepted by the API (202) is not in the database",
                orders=[order_no],
                **common,
            )
    return result


def check_sessions_settled(sim: SimSnapshot, matcher: Matcher) -> InvariantResult:
    """b: one order per ended session, settled, with the session's values."""
    result = _result("b")
    for entry in sim.ledger:
        if entry.dropped:
            continue
        orders = matcher.orders_of_session(entry)
        settled = [o for o in orders if o["status"] == "settled"]
        if not entry.acked and not settled:
            continue  # still held by the pile: invariant q
        result.checked += 1
        common = {
            "device_id": entry.device_id,
            "port": entry.port,
            "orders": [o["order_no"] for o in orders],
            "at": entry.ended_at,
            "detail": {"session": _entry_brief(entry), "orders": [_order_brief(o) for o in orders]},
        }
        name = entry.order_id or f"business number {entry.business_no}"
        if len(orders) != 1 or len(settled) != 1:
            states = ", ".join(o["status"] for o in orders) or "none"
            result.add(
                f"session {name} has {len(orders)} orders ({states}), {len(settled)} settled",
                **common,
            )
            continue
        order = settled[0]
        energy, duration = order["energy_kwh"], order["duration_s"]
        tolerance = _ENERGY_TOLERANCE[entry.protocol]
        if energy is None or abs(energy - entry.energy_kwh) > tolerance:
            result.add(
                f"session {name}: energy {energy} kWh, the pile reported {entry.energy_kwh}",
                **common,
            )
        elif duration != entry.duration_s:
            result.add(
                f"session {name}: duration {duration} s, the pile reported {entry.duration_s}",
                **common,
            )
    return result


def check_open_orders(sim: SimSnapshot, db: DbState) -> InvariantResult:
    """c: an open order's port charges that order's session."""
    result = _result("c")
    result.checked = sim.ports
    for order in db.orders:
        if order["status"] not in OPEN:
            continue
        key = (order["device_id"], order["port"])
        running = sim.charging.get(key)
        common = {
            "device_id": key[0],
            "port": key[1],
            "orders": [order["order_no"]],
            "at": _wall(order["created_at"]),
            "detail": _order_brief(order),
        }
        if running is None:
            result.add(
                f"order {order['order_no']} is {order['status']} but the port is idle", **common
            )
        elif order["protocol"] == "ap3000" and running != order["order_no"]:
            result.add(
                f"order {order['order_no']} is {order['status']} but the port charges "
                f"order {running}",
                **common,
            )
        elif order["protocol"] == "bkv" and order["business_no"] not in (None, running):
            result.add(
                f"order {order['order_no']} is {order['status']} but the port charges "
                f"business number {running}",
                **common,
            )
    return result


def check_online(sim: SimSnapshot, db: DbState) -> InvariantResult:
    """d: the online flag of every simulated device."""
    result = _result("d")
    recent = sim.taken_at - SETTLING_S
    for device_id, connected in sorted(sim.connected.items()):
        spans = sim.spans.get(device_id, [])
        if spans and (spans[-1][0] >= recent or (spans[-1][1] or 0.0) >= recent):
            continue  # just connected or disconnected: the flag may be on its way
        result.checked += 1
        row = db.devices.get(device_id)
        if row is None:
            result.add("device unknown to the platform", device_id=device_id)
        elif bool(row["online"]) != connected:
            state = "online" if row["online"] else f"offline ({row['offline_reason']})"
            pile = "holds a connection" if connected else "holds no connection"
            result.add(
                f"device shown {state} but the pile {pile}",
                device_id=device_id,
                at=_wall(row["last_seen_at"]),
                detail={k: _jsonable(v) for k, v in row.items()},
            )
    return result


def check_cards(db: DbState) -> InvariantResult:
    """e: balances, the ledger adding up, deductions matching their orders."""
    result = _result("e")
    ledger: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for tx in db.card_transactions:
        ledger[tx["card_id"]].append(tx)
    for card in db.cards:
        result.checked += 1
        card_id, balance = card["card_id"], card["balance_cent"]
        entries = ledger.get(card_id, [])
        if balance < 0:
            result.add(f"card {card_id} balance {balance} below zero")
        total = sum(tx["amount_cent"] for tx in entries)
        if total != balance:
            result.add(
                f"card {card_id}: balance {balance}, its ledger adds up to {total}",
                detail={"transactions": [_jsonable_row(t) for t in entries]},
            )
        elif entries and entries[-1]["balance_after_cent"] != balance:
            result.add(
                f"card {card_id}: balance {balance}, last ledger row says "
                f"{entries[-1]['balance_after_cent']}"
            )
    charges_per_order: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for tx in db.card_transactions:
        if tx["kind"] == "charge":
            charges_per_order[tx["order_no"]].append(tx)
    for order_no, txs in charges_per_order.items():
        result.checked += 1
        charge = db.order_charges.get(order_no)
        common = {
            "orders": [order_no],
            "detail": {
                "transactions": [_jsonable_row(t) for t in txs],
                "charge": _jsonable_row(charge),
            },
        }
        if len(txs) > 1:
            result.add(f"order {order_no} charged to a card {len(txs)} times", **common)
        if charge is None:
            result.add(f"card deduction for order {order_no} without an order charge", **common)
            continue
        if -txs[0]["amount_cent"] != charge["card_charged_cent"]:
            result.add(
                f"order {order_no}: card deduction {-txs[0]['amount_cent']}, order charge "
                f"says {charge['card_charged_cent']}",
                **common,
            )
        if txs[0]["card_id"] != charge["card_id"]:
            result.add(
                f"order {order_no}: deducted from card {txs[0]['card_id']}, charged to "
                f"{charge['card_id']}",
                **common,
            )
    for order_no, charge in db.order_charges.items():
        if charge["card_charged_cent"] and order_no not in charges_per_order:
            result.checked += 1
            result.add(
                f"order {order_no}: {charge['card_charged_cent']} charged to card "
                f"{charge['card_id']} without a ledger row",
                orders=[order_no],
            )
    return result


def check_no_double_settlement(sim: SimSnapshot, db: DbState, matcher: Matcher) -> InvariantResult:
    """f: per session at most one settled order and one applied settlement event; every
    settled order stands for a session."""
    result = _result("f")
    settled = [o for o in db.orders if o["status"] == "settled"]
    per_session: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    entries: dict[int, LedgerEntry] = {}
    for order in settled:
        result.checked += 1
        sessions = matcher.sessions_of_order(order)
        if not sessions:
            result.add(
                f"settled order {order['order_no']} stands for no session the pile ended",
                device_id=order["device_id"],
                port=order["port"],
                orders=[order["order_no"]],
                at=_wall(order["ended_at"]),
                detail=_order_brief(order),
            )
        for entry in sessions:
            per_session[id(entry)].append(order)
            entries[id(entry)] = entry
        # an order without a business number may also be a second settlement of a session
        # known by its business number: look by values
        if order["protocol"] == "bkv" and order["business_no"] is None:
            settlement = order["settlement"] if isinstance(order["settlement"], dict) else {}
            for entry in matcher.by_port.get((order["device_id"], order["port"]), []):
                if entry not in sessions and _same_values(entry, settlement):
                    per_session[id(entry)].append(order)
                    entries[id(entry)] = entry
    for key, orders in per_session.items():
        if len(orders) > 1:
            entry = entries[key]
            result.add(
                f"session {entry.order_id or entry.business_no} settled {len(orders)} times",
                device_id=entry.device_id,
                port=entry.port,
                orders=[o["order_no"] for o in orders],
                at=entry.ended_at,
                detail={
                    "session": _entry_brief(entry),
                    "orders": [_order_brief(o) for o in orders],
                },
            )
    applied: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in db.settlement_events:
        if event["reason"] != "applied":
            continue
        for entry in matcher.sessions_of_event(event):
            applied[id(entry)].append(event)
            entries[id(entry)] = entry
    for key, events in applied.items():
        if len(events) > 1:
            entry = entries[key]
            result.add(
                f"settlement of session {entry.order_id or entry.business_no} applied "
                f"{len(events)} times",
                device_id=entry.device_id,
                port=entry.port,
                at=entry.ended_at,
                orders=[o["order_no"] for o in matcher.orders_of_session(entry)],
                detail={
                    "session": _entry_brief(entry),
                    "events": [_jsonable_row(e) for e in events],
                },
            )
    return result


def check_acked_present(sim: SimSnapshot, matcher: Matcher) -> InvariantResult:
    """g: what the pile deleted on the server's word is in the database."""
    result = _result("g")
    for entry in sim.ledger:
        if not entry.acked:
            continue
        result.checked += 1
        if any(o["status"] == "settled" for o in matcher.orders_of_session(entry)):
            continue
        port_orders = matcher.orders_by_port.get((entry.device_id, entry.port), [])
        if entry.business_no is not None and any(
            o["status"] == "settled" and _same_values(entry, o["settlement"] or {})
            for o in port_orders
        ):
            continue
        result.add(
            f"session {entry.order_id or entry.business_no} acknowledged, no settled order",
            device_id=entry.device_id,
            port=entry.port,
            at=entry.ended_at,
            orders=[o["order_no"] for o in matcher.orders_of_session(entry)],
            detail={"session": _entry_brief(entry)},
        )
    return result


def check_stop_after_start(sim: SimSnapshot, db: DbState) -> InvariantResult:
    """h: for every order with a start and a stop command, the pile did not receive the
    stop before the start."""
    result = _result("h")
    by_order: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for command in db.commands:
        if command["order_no"] and command["name"] in ("start", "stop"):
            by_order[command["order_no"]].setdefault(command["name"], command)
    ap_first: dict[tuple[str, bool], float] = {}
    bkv_first: dict[tuple[str, int, bool, int], float] = {}
    for c in sim.controls:
        if c.order_id is not None:
            ap_first.setdefault((c.order_id, c.start), c.t)
        elif c.seq is not None:
            bkv_first.setdefault((c.device_id, c.port, c.start, c.seq), c.t)
    orders = {o["order_no"]: o for o in db.orders}
    for order_no, pair in by_order.items():
        start, stop = pair.get("start"), pair.get("stop")
        order = orders.get(order_no)
        if start is None or stop is None or order is None:
            continue
        if order["protocol"] == "ap3000":
            t_start = ap_first.get((order_no, True))
            t_stop = ap_first.get((order_no, False))
        else:
            key = (order["device_id"], order["port"])
            t_start = bkv_first.get((*key, True, start["correlation"] or -1))
            t_stop = bkv_first.get((*key, False, stop["correlation"] or -1))
        if t_start is None or t_stop is None:
            continue
        result.checked += 1
        if t_stop < t_start:
            result.add(
                f"the stop of order {order_no} reached the pile {t_start - t_stop:.2f} s "
                "before its start",
                device_id=order["device_id"],
                port=order["port"],
                orders=[order_no],
                at=_wall(start["created_at"]),
                detail={
                    "start": _jsonable_row(start),
                    "stop": _jsonable_row(stop),
                    "order": _order_brief(order),
                },
            )
    return result


def _during(at: float, faults: list[tuple[float, float]], margin: float = 3.0) -> bool:
    return any(begin - margin <= at <= end + margin for begin, end in faults)


def check_idempotency(calls: list[ApiCall], faults: list[tuple[float, float]]) -> InvariantResult:
    """i: duplicate start requests. With one key: the same answer, not an error or a 409
    for the repeat (outside database faults, where any request may fail); without a key:
    one accepted, the other refused (409)."""
    result = _result("i")
    groups: dict[int, list[ApiCall]] = collections.defaultdict(list)
    for call in calls:
        if call.group is not None and call.action.startswith("api_start_duplicate"):
            groups[call.group].append(call)
    for group in groups.values():
        result.checked += 1
        first = group[0]
        answers = [c for c in group if c.status is not None and 200 <= c.status < 300]
        common = {
            "device_id": first.device_id,
            "port": first.port,
            "at": first.at,
            "detail": {"calls": [c.to_json() for c in group]},
        }
        bodies = {
            (c.body.get("order_no"), c.body.get("command_id"))
            for c in answers
            if isinstance(c.body, dict)
        }
        if first.idempotency_key is not None:
            others = [c for c in group if c.status is not None and not 200 <= c.status < 300]
            if len(bodies) > 1:
                result.add(
                    f"Idempotency-Key {first.idempotency_key} answered "
                    f"{len(bodies)} different orders",
                    orders=sorted(str(b[0]) for b in bodies),
                    **common,
                )
            elif answers and others and not _during(first.at, faults):
                result.add(
                    f"Idempotency-Key {first.idempotency_key}: one request accepted, its "
                    f"repeat answered {others[0].status} instead of the same answer",
                    orders=sorted(str(b[0]) for b in bodies),
                    **common,
                )
        elif len(answers) > 1:
            result.add(
                f"two identical starts without a key both accepted ({len(bodies)} "
                "orders on one port)",
                orders=sorted(str(b[0]) for b in bodies),
                **common,
            )
    return result


def _reachable_s(
    spans: list[tuple[float, float | None]],
    begin: float,
    end: float,
    faults: list[tuple[float, float]],
) -> float:
    """The longest stretch within [begin, end] with the pile connected (one connection)
    and no database fault."""
    longest = 0.0
    for opened, closed in spans:
        a, b = max(opened, begin), min(closed if closed is not None else end, end)
        pieces = [(a, b)] if b > a else []
        for f_begin, f_end in faults:
            pieces = [
                part
                for x, y in pieces
                for part in ((x, min(y, f_begin)), (max(x, f_end), y))
                if part[1] > part[0]
            ]
        longest = max([longest, *(y - x for x, y in pieces)])
    return longest


def check_offline_deaths(
    sim: SimSnapshot, db: DbState, faults: list[tuple[float, float]]
) -> InvariantResult:
    """j: a command dead "offline" had no chance: its pile was never connected for
    :data:`REACHABLE_S` with the database up between the command's creation and death."""
    result = _result("j")
    for command in db.commands:
        if command["status"] != "dead" or command["dead_reason"] != "offline":
            continue
        result.checked += 1
        begin = command["created_at"].timestamp()
        ended = command["finished_at"] or command["expires_at"]
        end = ended.timestamp()
        spans = sim.spans.get(command["device_id"], [])
        reachable = _reachable_s(spans, begin, end, faults)
        if reachable >= REACHABLE_S:
            result.add(
                f"command {command['command_id']} ({command['name']}) died 'offline' though "
                f"its pile was connected for {reachable:.0f} s with the database up",
                device_id=command["device_id"],
                orders=[command["order_no"]] if command["order_no"] else [],
                at=begin,
                detail={
                    "command": _jsonable_row(command),
                    "connections": [
                        s for s in spans if (s[1] is None or s[1] > begin) and s[0] < end
                    ],
                },
            )
    return result


def check_quiet(sim: SimSnapshot) -> InvariantResult:
    """q: nothing left unacknowledged at the piles."""
    result = _result("q")
    for entry in sim.ledger:
        result.checked += 1
        if entry.dropped or entry.acked:
            continue
        result.add(
            f"session {entry.order_id or entry.business_no}: report sent "
            f"{entry.copies_sent} times, never acknowledged",
            device_id=entry.device_id,
            port=entry.port,
            at=entry.ended_at,
            detail={"session": _entry_brief(entry)},
        )
    return result


# --- evidence ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _jsonable_row(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: _jsonable(v) for k, v in row.items()}


def _frame_devices(device_id: str) -> list[str]:
    gateway, sep, socket = device_id.rpartition("-")
    return [device_id, gateway] if sep and socket.isdigit() else [device_id]


async def attach_frames(
    conn: asyncpg.Connection[Any], results: Iterable[InvariantResult], *, per: int = FRAMES_FOR
) -> None:
    """Audit frames (hex) of the device around each violation's time, for the first
    ``per`` violations of every invariant."""
    for result in results:
        for violation in result.violations[:per]:
            if violation.device_id is None:
                continue
            at = violation.at
            devices = _frame_devices(violation.device_id)
            if at is None:
                rows = await conn.fetch(
                    """SELECT received_at, connection_id, device_id, direction, command, hex
                       FROM frames WHERE device_id = ANY($1::text[])
                       ORDER BY received_at DESC, id DESC LIMIT 8""",
                    devices,
                )
                rows = list(reversed(rows))
            else:
                moment = dt.datetime.fromtimestamp(at, dt.UTC)
                rows = await conn.fetch(
                    """SELECT received_at, connection_id, device_id, direction, command, hex
                       FROM frames WHERE device_id = ANY($1::text[])
                         AND received_at BETWEEN $2 AND $3
                         AND command NOT IN ('0x21', '0x0000', '0x1000/0x1017')
                       ORDER BY received_at, id LIMIT 12""",
                    devices,
                    moment - dt.timedelta(seconds=3),
                    moment + dt.timedelta(seconds=90),
                )
            violation.frames = [
                {
                    "received_at": r["received_at"].isoformat(),
                    "connection_id": r["connection_id"],
                    "device_id": r["device_id"],
                    "direction": r["direction"],
                    "command": r["command"],
                    "hex": r["hex"],
                }
                for r in rows
            ]
