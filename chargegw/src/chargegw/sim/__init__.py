"""Device simulator: piles that speak real protocol bytes to a server over TCP.

For tests, demos and load. The protocol-neutral machinery (connections, reconnects,
faults, frame records) is :class:`SimulatedPile`; :class:`SimulatedAp3000Pile` speaks
AP3000 through chargeproto. :class:`Simulator` runs many piles against one address.

>>> from chargegw.sim import Simulator, make_ap3000_piles
>>> sim = Simulator("127.0.0.1", 8900, make_ap3000_piles(3), accel=60, seed=1)
>>> sim["04000001"].phy_id
'04000001'
"""

from ._timing import Timing
from .ap3000 import (
    Ap3000Intervals,
    ChargeSession,
    PortStatus,
    SimPort,
    SimulatedAp3000Pile,
    StoredSettlement,
    ap3000_phy_id,
    iccid_for,
    make_ap3000_piles,
    type_code_for_ports,
)
from .pile import Faults, Flow, FrameRecord, PileStats, SimulatedPile
from .runner import Simulator, SimulatorStats

__all__ = [
    "Ap3000Intervals",
    "ChargeSession",
    "Faults",
    "Flow",
    "FrameRecord",
    "PileStats",
    "PortStatus",
    "SimPort",
    "SimulatedAp3000Pile",
    "SimulatedPile",
    "Simulator",
    "SimulatorStats",
    "StoredSettlement",
    "Timing",
    "ap3000_phy_id",
    "iccid_for",
    "make_ap3000_piles",
    "type_code_for_ports",
]
