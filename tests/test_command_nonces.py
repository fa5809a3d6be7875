"""Command nonces survive a restart for the skew window (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dashsos.evidence.diskstate import STATE
from dashsos.fleet.commands import CommandRefused, CommandVerifier, sign

KEY = b"k" * 32


def test_replay_after_restart_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "command-nonces"
    now = [1_700_000_000.0]
    first = CommandVerifier("car-1", KEY, max_skew=30, clock=lambda: now[0])
    first.persist_to(store)
    payload = sign("car-1", KEY, "trigger", ts=now[0], nonce="a1b2c3d4e5f60718")
    first.verify("trigger", payload)

    now[0] += 5  # the car restarts within the skew window; the command is replayed
    again = CommandVerifier("car-1", KEY, max_skew=30, clock=lambda: now[0])
    again.persist_to(store)
    with pytest.raises(CommandRefused) as refused:
        again.verify("trigger", payload)
    assert refused.value.code == "replayed"
    # A new command still works, and is itself remembered.
    again.verify("trigger", sign("car-1", KEY, "trigger", ts=now[0], nonce="fresh-nonce-01"))
    assert "fresh-nonce-01" in store.read_text()


def test_old_nonces_are_dropped_at_start_and_a_short_line_ignored(tmp_path: Path) -> None:
    store = tmp_path / "command-nonces"
    store.write_text("1000.0 old-nonce-0001\n1700000000.0 kept-nonce-001\n17000")
    verifier = CommandVerifier("car-1", KEY, max_skew=30, clock=lambda: 1_700_000_010.0)
    verifier.persist_to(store)
    assert store.read_text() == "1700000000.0 kept-nonce-001\n"


def test_unwritable_store_keeps_working_in_memory(tmp_path: Path) -> None:
    store = tmp_path / "missing-dir" / "command-nonces"
    verifier = CommandVerifier("car-1", KEY, max_skew=30, clock=lambda: 1_700_000_000.0)
    verifier.persist_to(store)
    payload = sign("car-1", KEY, "trigger", ts=1_700_000_000.0, nonce="a1b2c3d4e5f60718")
    verifier.verify("trigger", payload)
    with pytest.raises(CommandRefused):
        verifier.verify("trigger", payload)
    assert STATE.state == "error"
    STATE.worked("the test's own")  # the state is per process
