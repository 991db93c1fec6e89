"""The state machines as tables (domain/machine.py): the upgrade target (firmware.py) and
the parameter group (params.py). Every state is reachable, final states have no exits,
every pair not in a table is refused, and a random walk never leaves the table."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chargegw.domain.firmware import TARGET_STATES, TargetEvent, TargetState
from chargegw.domain.machine import StateMachine, TransitionError
from chargegw.domain.params import GROUP_STATES, ParamEvent, ParamStatus

#: (machine, states, events, final states)
MACHINES: list[tuple[StateMachine[Any, Any], type[enum.Enum], type[enum.Enum], set[Any]]] = [
    (
        TARGET_STATES,
        TargetState,
        TargetEvent,
        {TargetState.VERIFIED, TargetState.FAILED, TargetState.CANCELLED},
    ),
    # a group never ends: new desired values start it again
    (GROUP_STATES, ParamStatus, ParamEvent, set()),
]
IDS = [machine.name for machine, *_ in MACHINES]


@pytest.mark.parametrize(("machine", "states", "events", "final"), MACHINES, ids=IDS)
def test_every_state_is_reachable(
    machine: StateMachine[Any, Any], states: Any, events: Any, final: set[Any]
) -> None:
    assert machine.reachable() == set(states)


@pytest.mark.parametrize(("machine", "states", "events", "final"), MACHINES, ids=IDS)
def test_final_states_have_no_exits_and_the_others_have(
    machine: StateMachine[Any, Any], states: Any, events: Any, final: set[Any]
) -> None:
    for state in states:
        assert bool(machine.exits(state)) == (state not in final), state


@pytest.mark.parametrize(("machine", "states", "events", "final"), MACHINES, ids=IDS)
def test_every_event_moves_something(
    machine: StateMachine[Any, Any], states: Any, events: Any, final: set[Any]
) -> None:
    used = {event for _, event in machine.transitions}
    assert used == set(events)


@pytest.mark.parametrize(("machine", "states", "events", "final"), MACHINES, ids=IDS)
def test_pairs_not_in_the_table_are_refused(
    machine: StateMachine[Any, Any], states: Any, events: Any, final: set[Any]
) -> None:
    for state in (None, *states):
        for event in events:
            if (state, event) in machine.transitions:
                assert machine.check(state, event) == machine.next(state, event)
                continue
            assert machine.next(state, event) is None
            with pytest.raises(TransitionError) as caught:
                machine.check(state, event)
            assert caught.value.current == state and caught.value.event == event


@pytest.mark.parametrize(
    ("machine", "state", "event"),
    [
        # a transfer restarts, never a finished upgrade
        (TARGET_STATES, TargetState.VERIFIED, TargetEvent.RESTARTED),
        (TARGET_STATES, TargetState.CANCELLED, TargetEvent.STARTED),
        (TARGET_STATES, TargetState.FAILED, TargetEvent.VERIFIED),
        # cancelling a job leaves rebooting devices to be verified (docs/firmware.md)
        (TARGET_STATES, TargetState.REBOOTING, TargetEvent.CANCELLED),
        (TARGET_STATES, TargetState.QUEUED, TargetEvent.TRANSFERRED),
        (TARGET_STATES, None, TargetEvent.STARTED),
        # only a pending set command is accepted or acknowledged
        (GROUP_STATES, ParamStatus.APPLYING, ParamEvent.SET_ACCEPTED),
        (GROUP_STATES, ParamStatus.VERIFIED, ParamEvent.ACKNOWLEDGED),
        # a group that is not in progress has no command to fail
        (GROUP_STATES, ParamStatus.VERIFIED, ParamEvent.FAILED),
        (GROUP_STATES, ParamStatus.PENDING, ParamEvent.REAPPLIED),
        (GROUP_STATES, None, ParamEvent.MATCHED),
    ],
)
def test_illegal_transitions(machine: StateMachine[Any, Any], state: Any, event: Any) -> None:
    with pytest.raises(TransitionError, match=event.value):
        machine.check(state, event)


def test_sql_parameters_come_from_the_table() -> None:
    assert TARGET_STATES.step(TargetEvent.CANCELLED) == ("cancelled", ["queued", "transferring"])
    assert TARGET_STATES.step(TargetEvent.FAILED) == (
        "failed",
        ["queued", "rebooting", "transferring"],
    )
    assert GROUP_STATES.step(ParamEvent.FAILED) == ("failed", ["applying", "pending"])
    assert GROUP_STATES.step(ParamEvent.REAPPLIED) == ("pending", ["mismatch"])


def test_an_event_with_several_targets_has_no_single_step() -> None:
    class State(enum.Enum):
        A = "a"
        B = "b"

    class Event(enum.Enum):
        GO = "go"

    machine = StateMachine[State, Event](
        "test", {(None, Event.GO): State.A, (State.A, Event.GO): State.B}
    )
    with pytest.raises(ValueError, match="2 targets"):
        machine.step(Event.GO)
    assert machine.sources(Event.GO) == ["a"]


@pytest.mark.parametrize(("machine", "states", "events", "final"), MACHINES, ids=IDS)
@given(data=st.data())
def test_a_random_walk_stays_in_the_table(
    machine: StateMachine[Any, Any], states: Any, events: Any, final: set[Any], data: Any
) -> None:
    state = None
    for event in data.draw(st.lists(st.sampled_from(list(events)), max_size=30)):
        target = machine.next(state, event)
        if target is None:
            with pytest.raises(TransitionError):
                machine.check(state, event)
            continue  # refused: the row stays as it is
        assert state not in final, "a final state was left"
        assert target in set(states)
        state = target
