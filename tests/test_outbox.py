"""The durable outbox: nothing stored is lost to a restart, a crash or a corrupt file, and
the bound drops location messages, never incident ones."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dashsos.fleet.outbox import Outbox, OutboxMessage

REPO = Path(__file__).resolve().parent.parent


def _ids(messages: list[OutboxMessage]) -> list[int]:
    return [m.id for m in messages]


def test_order_and_fields_are_kept(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    first = outbox.add("dashsos/car1/incident", b"\x00one", qos=2, retain=True)
    second = outbox.add("dashsos/car1/location", b"two", qos=0, kind="location")
    third = outbox.add("dashsos/car1/incident", b"three")
    assert first < second < third
    messages = outbox.pending()
    assert _ids(messages) == [first, second, third]
    one = messages[0]
    assert (one.topic, one.payload, one.qos, one.retain, one.kind) == (
        "dashsos/car1/incident", b"\x00one", 2, True, "incident")
    assert isinstance(one.payload, bytes) and isinstance(one.retain, bool)
    assert messages[1].retain is False and messages[1].qos == 0
    assert one.created <= messages[2].created
    assert len(outbox) == 3
    outbox.close()


def test_survives_a_restart_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    outbox = Outbox(path)
    ids = [outbox.add("t", b"%d" % n) for n in range(5)]
    outbox.remove(ids[1])
    outbox.remove(ids[4])  # the newest: its id must not come back after the restart
    outbox.close()

    outbox = Outbox(path)
    assert [(m.id, m.payload) for m in outbox.pending()] == [
        (ids[0], b"0"), (ids[2], b"2"), (ids[3], b"3")]
    assert outbox.add("t", b"later") > ids[4]
    outbox.close()


def test_remove_is_idempotent(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    kept, gone = outbox.add("t", b"kept"), outbox.add("t", b"gone")
    outbox.remove(gone)
    outbox.remove(gone)
    outbox.remove(12345)  # never existed
    assert _ids(outbox.pending()) == [kept]
    outbox.close()


def test_pending_pages_after_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    ids = [outbox.add("t", b"%d" % n) for n in range(7)]
    seen: list[int] = []
    after = 0
    while page := outbox.pending(after_id=after, limit=3):
        assert len(page) <= 3
        seen += _ids(page)
        after = page[-1].id
    assert seen == ids
    assert _ids(outbox.pending(after_id=ids[4])) == ids[5:]
    assert outbox.pending(limit=0) == []
    outbox.close()


def test_bound_drops_oldest_locations_first(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db", max_messages=4)
    incident = outbox.add("t", b"i1")
    locations = [outbox.add("t", b"l%d" % n, kind="location") for n in range(3)]
    newest = outbox.add("t", b"l3", kind="location")  # full: the oldest location goes
    assert _ids(outbox.pending()) == [incident, locations[1], locations[2], newest]
    second = outbox.add("t", b"i2")  # an incident makes room the same way
    assert _ids(outbox.pending()) == [incident, locations[2], newest, second]
    assert outbox.dropped == 2 and len(outbox) == 4
    outbox.close()


def test_incidents_are_never_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path / "state.db", max_messages=2)
    outbox.add("t", b"l", kind="location")
    ids = [outbox.add("t", b"i%d" % n) for n in range(4)]
    assert all(i > 0 for i in ids)
    assert _ids(outbox.pending()) == ids  # the location made room once, then over the bound
    assert outbox.counts() == {"incident": 4, "location": 0}
    assert outbox.dropped == 1
    over = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(over) == 2 and "stored anyway" in over[0].getMessage()
    outbox.close()


def test_new_location_refused_when_only_incidents(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db", max_messages=2)
    incidents = [outbox.add("t", b"i1"), outbox.add("t", b"i2")]
    assert outbox.add("t", b"where", kind="location") == -1
    assert outbox.add("t", b"where", kind="location") == -1
    assert _ids(outbox.pending()) == incidents and outbox.dropped == 2
    outbox.remove(incidents[0])  # room again
    assert outbox.add("t", b"where", kind="location") > incidents[1]
    outbox.close()


def test_smaller_bound_after_restart_drops_enough(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    outbox = Outbox(path)
    for n in range(6):
        outbox.add("t", b"l%d" % n, kind="location")
    outbox.close()
    outbox = Outbox(path, max_messages=3)
    newest = outbox.add("t", b"l6", kind="location")
    assert [m.payload for m in outbox.pending()] == [b"l4", b"l5", b"l6"]
    assert outbox.pending()[-1].id == newest and outbox.dropped == 4
    outbox.close()


def test_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    assert outbox.counts() == {"incident": 0, "location": 0}
    for _ in range(3):
        outbox.add("t", b"i")
    location = [outbox.add("t", b"l", kind="location") for _ in range(2)]
    outbox.remove(location[0])
    assert outbox.counts() == {"incident": 3, "location": 1}
    assert len(outbox) == 4
    outbox.close()


def test_rejects_unknown_kind_and_bad_qos(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    with pytest.raises(ValueError, match="kind"):
        outbox.add("t", b"x", kind="telemetry")
    for qos in (-1, 3):
        with pytest.raises(ValueError, match="qos"):
            outbox.add("t", b"x", qos=qos)
    assert len(outbox) == 0
    outbox.close()


def test_two_threads_adding_lose_nothing(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "state.db")
    per_thread = 100
    start = threading.Barrier(2)
    added: dict[str, list[int]] = {"a": [], "b": []}

    def adder(name: str) -> None:
        start.wait()
        for n in range(per_thread):
            added[name].append(outbox.add(f"t/{name}", b"%d" % n))

    threads = [threading.Thread(target=adder, args=(name,)) for name in added]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    everything = added["a"] + added["b"]
    assert len(set(everything)) == 2 * per_thread
    stored = outbox.pending(limit=1000)
    assert sorted(everything) == _ids(stored)
    for name, ids in added.items():  # each thread's messages in the order it added them
        mine = [m for m in stored if m.topic == f"t/{name}"]
        assert _ids(mine) == ids and [m.payload for m in mine] == [
            b"%d" % n for n in range(per_thread)]
    outbox.close()


def _wreck_page_one(path: Path) -> None:
    """A real database whose schema page is damaged (SQLITE_CORRUPT, not NOTADB)."""
    outbox = Outbox(path)
    outbox.add("t", b"lost")
    outbox.close()
    with open(path, "r+b") as f:
        f.seek(100)  # past the 100-byte header, into the schema
        f.write(b"\xff" * 3000)


@pytest.mark.parametrize("damage", ["garbage", "wrecked"])
def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     damage: str) -> None:
    path = tmp_path / "state.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 400)
        # SQLite drops a journal this broken itself; it must not trouble the new database.
        (tmp_path / "state.db-wal").write_bytes(b"nor is this a journal")
    else:
        _wreck_page_one(path)
    bad = path.read_bytes()

    outbox = Outbox(path)
    asides = sorted(tmp_path.glob("state.db.corrupt-*"))
    main = [p for p in asides if not p.name.endswith(("-wal", "-shm"))]
    assert len(main) == 1 and main[0].read_bytes() == bad
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "moved aside" in errors[0].getMessage()

    assert len(outbox) == 0
    message = outbox.add("t", b"fresh")
    outbox.close()
    outbox = Outbox(path)
    assert _ids(outbox.pending()) == [message]
    outbox.close()


def test_unopenable_path_is_not_moved_aside(tmp_path: Path) -> None:
    # "Cannot open" is not corruption: nothing may be renamed for it.
    path = tmp_path / "state.db"
    path.mkdir()
    with pytest.raises(sqlite3.OperationalError):
        Outbox(path)
    assert path.is_dir() and not list(tmp_path.glob("*.corrupt-*"))


_WRITER = """
import sys
from pathlib import Path
from dashsos.fleet.outbox import Outbox

outbox = Outbox(Path(sys.argv[1]))
n = 0
while True:
    n += 1
    kind = "location" if n % 3 == 0 else "incident"
    print(outbox.add("dashsos/car1/" + kind, b"%d" % n, kind=kind), flush=True)
"""


def test_sigkill_mid_stream_loses_no_returned_id(tmp_path: Path) -> None:
    """Every id add() returned, and the writer printed, is there after a SIGKILL.

    This kills the process, not the power: the page cache survives, so it checks that add()
    commits before it returns. Surviving a power cut rests on synchronous=FULL."""
    path = tmp_path / "state.db"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "daemon"), env.get("PYTHONPATH", "")) if p)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    printed: list[int] = []
    try:
        for line in writer.stdout:
            printed.append(int(line))
            if len(printed) >= 200:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
    rest, errors = writer.communicate(timeout=10)
    # Lines already in the pipe were printed after add() returned: they count too. Only a
    # line cut short by the kill does not.
    printed += [int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n")]
    assert writer.returncode == -signal.SIGKILL, errors
    assert len(printed) >= 200, errors

    outbox = Outbox(path)
    stored = set(_ids(outbox.pending(limit=100_000)))
    assert set(printed) <= stored
    assert printed == sorted(printed)
    outbox.close()
