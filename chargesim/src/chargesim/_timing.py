"""Simulated time: protocol intervals divided by an acceleration factor, with jitter."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """How simulated (pile) seconds map to real seconds.

    ``accel`` divides every protocol interval: a 180 s heartbeat with ``accel=60`` is
    sent every 3 real seconds, and a charge runs 60 pile seconds per real second.
    ``jitter`` spreads intervals (and start times) by up to plus or minus that fraction.
    """

    accel: float = 1.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not self.accel > 0:
            raise ValueError(f"accel must be > 0, got {self.accel}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def real(self, pile_s: float) -> float:
        """Real seconds for ``pile_s`` simulated seconds, without jitter."""
        return pile_s / self.accel

    def spread(self, pile_s: float, rng: random.Random) -> float:
        """Real seconds for ``pile_s`` simulated seconds, jittered by plus or minus ``jitter``."""
        return self.real(pile_s) * (1.0 + rng.uniform(-self.jitter, self.jitter))

    def pile_seconds(self, real_s: float) -> float:
        """Simulated seconds elapsed in ``real_s`` real seconds."""
        return real_s * self.accel


def backoff_s(
    failures: int, rng: random.Random, *, minimum: float, maximum: float, jitter: float
) -> float:
    """Reconnect delay after ``failures`` consecutive failures: doubling, capped, jittered."""
    if failures <= 0:
        return 0.0
    base = min(maximum, minimum * 2.0 ** (failures - 1))
    return base * (1.0 + rng.uniform(-jitter, jitter))
