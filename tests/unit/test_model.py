"""The state model: the table of legal moves, derived group state, and the retry schedule."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import pytest

from taskomatic import defaults
from taskomatic.model import LIVE, MOVES, TERMINAL, Group, Move, State, sources, target
from taskomatic.queue import backoff

N, R, W, C, F, X = (
    State.NEW,
    State.RUNNING,
    State.WAITING,
    State.COMPLETE,
    State.FAILED,
    State.CANCELLED,
)

EXPECTED = {
    Move.CLAIM: {N: R},
    Move.COMPLETE: {R: C, W: C},
    Move.AWAIT_JOB: {R: W},
    Move.RETRY_LATER: {R: N, W: N},
    Move.FAIL: {R: F, W: F},
    Move.CANCEL: {N: X},
    Move.RETRY: {F: N, X: N},
    Move.TAKE_OVER: {R: R, W: W},
    Move.REQUEST_STOP: {R: R, W: W},
    Move.NOTE: {R: R, W: W},
    Move.STOPPED: {R: X, W: X},
}
"""DESIGN.md §1 drawn as a table: for each move, where it may start and where it leads."""


def test_states_are_the_documented_set() -> None:
    """The UI shows exactly six states, three of them terminal."""
    assert {s.value for s in State} == {
        "new",
        "running",
        "waiting",
        "complete",
        "failed",
        "cancelled",
    }
    assert {C, F, X} == TERMINAL
    assert {N, R, W} == LIVE
    assert all(s.terminal for s in TERMINAL) and not any(s.terminal for s in LIVE)


@pytest.mark.parametrize("move", list(Move))
def test_each_move_has_exactly_its_documented_sources_and_targets(move: Move) -> None:
    """The guard of every UPDATE (its sources) and its result match the design."""
    assert set(sources(move)) == set(EXPECTED[move])
    for src, dst in EXPECTED[move].items():
        assert target(move, src) is dst


@pytest.mark.parametrize("move", list(Move))
def test_illegal_moves_raise(move: Move) -> None:
    """A move from any state outside its sources is refused, naming the move and the state."""
    for state in set(State) - set(EXPECTED[move]):
        with pytest.raises(ValueError, match=f"{move} is not a legal move from {state}"):
            target(move, state)


def test_the_table_has_no_other_rows() -> None:
    """Nothing beyond the documented moves can change a task's state."""
    assert len(MOVES) == sum(len(v) for v in EXPECTED.values())
    assert len(set(MOVES)) == len(MOVES)


def test_only_retry_leaves_a_terminal_state_and_complete_is_final() -> None:
    """Finished tasks stay finished, except failed/cancelled ones an operator retries."""
    leaving = {(m, src) for m, src, _ in MOVES if src in TERMINAL}
    assert leaving == {(Move.RETRY, F), (Move.RETRY, X)}


@pytest.mark.parametrize(
    ("counts", "state"),
    [
        ({C: 3, N: 1}, "running"),
        ({C: 3, W: 1, F: 1}, "running"),
        ({C: 2, F: 1, X: 2}, "failed"),
        ({C: 2, X: 1}, "cancelled"),
        ({C: 4}, "complete"),
    ],
)
def test_group_state_is_derived_from_its_tasks(counts: dict[State, int], state: str) -> None:
    """A group runs while any task is live; then a failure outranks a cancellation."""
    group = Group(uuid.uuid4(), "g", None, datetime.now(UTC), counts)
    assert group.state == state


def test_backoff_doubles_per_attempt_within_the_jitter_band() -> None:
    """Each retry delay lies in base·2^(n-1)·(1±jitter) for attempt n."""
    random.seed(1)
    jitter = defaults.RETRY_JITTER
    for attempt in range(1, 8):
        middle = min(
            defaults.RETRY_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1),
            defaults.RETRY_BACKOFF_MAX_SECONDS,
        )
        samples = [backoff(attempt) for _ in range(300)]
        assert all(middle * (1 - jitter) <= d <= middle * (1 + jitter) for d in samples)
        # Jitter really spreads the delays (retries of a batch do not stampede together).
        assert max(samples) - min(samples) > middle * jitter


def test_backoff_grows_until_the_maximum() -> None:
    """Later attempts never wait less (beyond jitter) than earlier ones, up to the bound."""
    lows = [backoff(n) for n in range(1, 12)]
    assert lows[-1] > lows[0] * 100


@pytest.mark.parametrize("attempt", [20, 1_000, 100_000])
def test_backoff_is_bounded_even_for_huge_attempt_counts(attempt: int) -> None:
    """A task allowed very many attempts waits at most the maximum (with jitter), never errors."""
    top = defaults.RETRY_BACKOFF_MAX_SECONDS
    delays = [backoff(attempt) for _ in range(50)]
    assert all(
        top * (1 - defaults.RETRY_JITTER) <= d <= top * (1 + defaults.RETRY_JITTER) for d in delays
    )
