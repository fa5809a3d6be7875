"""Writing files that survive an ignition cut: temp name, fsync, rename, fsync the dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int = 0o777) -> None:
    """`mkdir -p` whose new names survive a power cut: a directory entry is durable only
    once its parent is fsynced, and everything under a lost directory is lost with it."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            continue  # made meanwhile, by whoever also syncs it
        fsync_dir(directory.parent)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def commit(partial: Path, final: Path) -> None:
    """Give a finished file its real name, durably."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    fsync_dir(final.parent)


def free_space(path: Path) -> dict[str, int]:
    usage = shutil.disk_usage(path)
    return {"free_bytes": usage.free, "total_bytes": usage.total}
