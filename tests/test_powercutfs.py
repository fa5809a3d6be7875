"""The power-cut file system itself (issue 12): a cut keeps what was synced, and only that."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashsos.evidence.files import fsync_dir
from powercutfs import PowerCutFS


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerCutFS]:
    with PowerCutFS(tmp_path) as fs:
        yield fs


def write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def test_a_cut_keeps_what_was_synced_and_nothing_else(tmp_path: Path) -> None:
    fs = PowerCutFS(tmp_path)
    (fs.backing / "before.txt").write_bytes(b"there at mount")
    with fs:
        cut_and_remount(fs)


def cut_and_remount(fs: PowerCutFS) -> None:
    root = fs.mount_point
    write(root / "synced", b"A" * 10_000, sync=True)
    write(root / "named-only", b"never synced", sync=False)
    fsync_dir(root)
    with open(root / "synced", "ab") as f:  # appended after the sync: lost
        f.write(b"B" * 500)
    write(root / "renamed.tmp", b"renamed", sync=True)
    os.replace(root / "renamed.tmp", root / "renamed")
    fsync_dir(root)
    (root / "sub").mkdir()
    write(root / "reverted", b"old", sync=True)
    fsync_dir(root)
    os.replace(root / "renamed", root / "reverted")  # not followed by a dir fsync
    write(root / "data-synced-name-not", b"x", sync=True)  # its name is not durable
    write(root / "sub" / "inside", b"in", sync=True)  # sub's listing never synced
    fs.cut()
    assert not (root / "sub").exists()  # unmounted: nothing in the mount point
    fs.mount()
    assert (root / "before.txt").read_bytes() == b"there at mount"  # durable from the start
    assert (root / "synced").read_bytes() == b"A" * 10_000
    assert (root / "named-only").read_bytes() == b""
    assert not (root / "data-synced-name-not").exists()
    assert (root / "renamed").read_bytes() == b"renamed"
    assert (root / "reverted").read_bytes() == b"old"
    assert (root / "sub").is_dir() and list((root / "sub").iterdir()) == []


def test_an_unmount_without_a_cut_keeps_everything(fs: PowerCutFS) -> None:
    write(fs.mount_point / "f", b"kept", sync=False)
    fs.unmount()
    assert (fs.backing / "f").read_bytes() == b"kept"
