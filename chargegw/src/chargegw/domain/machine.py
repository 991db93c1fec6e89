"""State machines as tables: ``(state, event) -> state``, nothing else is legal.

A machine's states and events are enums; its table is the only place that says which
transitions exist. ``None`` stands for "no row yet" (the state a row is created from).
Code asks :meth:`StateMachine.check` before it writes a row's state, and SQL that moves
many rows at once takes the target and the states it may move from out of the table
(:meth:`StateMachine.step`), as parameters, never as literals.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class TransitionError(ValueError):
    """An event the table has no transition for in the current state."""

    def __init__(self, machine: str, current: enum.Enum | None, event: enum.Enum) -> None:
        state = "no row" if current is None else current.value
        super().__init__(f"{machine}: {event.value!r} is not allowed in state {state!r}")
        self.machine = machine
        self.current = current
        self.event = event


class StateMachine(Generic[S, E]):
    """A transition table with the questions code and tests ask of it."""

    def __init__(self, name: str, transitions: Mapping[tuple[S | None, E], S]) -> None:
        self.name = name
        self.transitions = dict(transitions)

    def next(self, current: S | None, event: E) -> S | None:
        """The state after ``event``, or None when the pair is not in the table."""
        return self.transitions.get((current, event))

    def check(self, current: S | None, event: E) -> S:
        """The state after ``event``; ``TransitionError`` when the pair is not legal."""
        target = self.transitions.get((current, event))
        if target is None:
            raise TransitionError(self.name, current, event)
        return target

    def sources(self, event: E) -> list[str]:
        """The states (their values, for SQL) ``event`` moves a row from."""
        return sorted(
            current.value
            for (current, on), _ in self.transitions.items()
            if on == event and current is not None
        )

    def step(self, event: E) -> tuple[str, list[str]]:
        """``(target, sources)`` of an event with one target, as SQL parameters:
        ``SET state = $target WHERE state = ANY($sources)``."""
        targets = {t for (_, on), t in self.transitions.items() if on == event}
        if len(targets) != 1:
            raise ValueError(f"{self.name}: {event.value!r} has {len(targets)} targets")
        return next(iter(targets)).value, self.sources(event)

    def exits(self, current: S) -> frozenset[E]:
        """The events with a transition out of ``current``."""
        return frozenset(on for (state, on) in self.transitions if state == current)

    def reachable(self) -> frozenset[S]:
        """Every state a row can get to from no row."""
        found: set[S] = set()
        frontier: list[S | None] = [None]
        while frontier:
            current = frontier.pop()
            for (state, _), target in self.transitions.items():
                if state == current and target not in found:
                    found.add(target)
                    frontier.append(target)
        return frozenset(found)


def state_values(states: frozenset[S] | tuple[S, ...] | list[S]) -> list[str]:
    """The states' values, sorted: a ``text[]`` parameter."""
    return sorted(s.value for s in states)
