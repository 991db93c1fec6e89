"""The chaos run: the platform under faults, and the proof that it keeps its promises.

``python -m chargesim.chaos`` creates a fresh database, starts ``chargegw serve
--workers 3``, simulates hundreds of piles of both protocols, drives charging sessions
through the API and at the piles while a fault driver kills workers, takes the database
away or makes it read-only, drops connections and makes the piles lose ACKs, resend
end reports with other live readings and leave optional tags out. After a quiet period
it checks the platform's invariants against the database and the piles' ledgers and
reports every violation with the frames involved. See docs/chaos.md.

>>> from chargesim.chaos import ChaosOptions
>>> ChaosOptions(piles=500).ap3000_piles, ChaosOptions(piles=500).bkv_gateways
(350, 30)
"""

from chargesim.chaos.checks import INVARIANTS, InvariantResult, Violation
from chargesim.chaos.options import FAULT_KINDS, ChaosError, ChaosOptions
from chargesim.chaos.runner import ChaosResult, run_chaos

__all__ = [
    "FAULT_KINDS",
    "INVARIANTS",
    "ChaosError",
    "ChaosOptions",
    "ChaosResult",
    "InvariantResult",
    "Violation",
    "run_chaos",
]
