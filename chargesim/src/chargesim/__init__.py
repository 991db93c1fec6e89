"""Device simulator: piles that speak real protocol bytes to a server over TCP.

For tests, demos and load. The protocol-neutral machinery (connections, reconnects,
faults, frame records) is :class:`SimulatedPile`; :class:`SimulatedAp3000Pile` speaks
AP3000 and :class:`SimulatedBkvGateway` BKV through chargeproto. :class:`Simulator` runs
many piles of either protocol against one address.

>>> from chargesim import Simulator, make_ap3000_piles
>>> sim = Simulator("127.0.0.1", 8900, make_ap3000_piles(3), accel=60, seed=1)
>>> sim["04000001"].phy_id
'04000001'
>>> sim.add(make_bkv_gateways(1, sockets=2)[0])
>>> sim["82231214000001"].protocol
'bkv'
"""

from chargesim._timing import Timing
from chargesim.ap3000 import (
    Ap3000Intervals,
    ChargeSession,
    PortStatus,
    SimPort,
    SimulatedAp3000Host,
    SimulatedAp3000Pile,
    StoredSettlement,
    UpgradeFaults,
    ap3000_phy_id,
    iccid_for,
    make_ap3000_piles,
    type_code_for_ports,
)
from chargesim.bkv import (
    BkvGatewayStats,
    BkvIntervals,
    BkvJack,
    BkvSession,
    BkvSocket,
    PendingEndReport,
    SimulatedBkvGateway,
    bkv_gateway_id,
    bkv_iccid_for,
    make_bkv_gateways,
)
from chargesim.pile import (
    ConnectionSpan,
    Faults,
    Flow,
    FrameRecord,
    LedgerEntry,
    PileStats,
    SimulatedPile,
)
from chargesim.runner import Simulator, SimulatorStats

__version__ = "0.1.0"

__all__ = [
    "Ap3000Intervals",
    "BkvGatewayStats",
    "BkvIntervals",
    "BkvJack",
    "BkvSession",
    "BkvSocket",
    "ChargeSession",
    "ConnectionSpan",
    "Faults",
    "Flow",
    "FrameRecord",
    "LedgerEntry",
    "PendingEndReport",
    "PileStats",
    "PortStatus",
    "SimPort",
    "SimulatedAp3000Host",
    "SimulatedAp3000Pile",
    "SimulatedBkvGateway",
    "SimulatedPile",
    "Simulator",
    "SimulatorStats",
    "StoredSettlement",
    "Timing",
    "UpgradeFaults",
    "ap3000_phy_id",
    "bkv_gateway_id",
    "bkv_iccid_for",
    "iccid_for",
    "make_ap3000_piles",
    "make_bkv_gateways",
    "type_code_for_ports",
]
