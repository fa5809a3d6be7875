"""A FUSE file system that loses what a power cut loses (issue 12): a passthrough over a
backing directory that remembers what has reached "the medium", and a `cut()` that
rewrites the backing directory to that and nothing more (like LazyFS, in Python).

Durability, as a disk with a volatile write cache and a strict POSIX reading give it:

- A file's data is durable as it was at its last fsync/fdatasync (or after each write
  through an O_SYNC/O_DSYNC descriptor): later writes and truncations are lost, and a
  file never synced comes back empty.
- A name (create, mkdir, rename, unlink, link, symlink) is durable only once its parent
  directory is fsynced; that fsync makes the directory's whole listing durable at once.
  A file's own fsync does NOT make its new name durable. ext4 happens to commit it with
  the file in most cases, but POSIX and other file systems (and ext4 without a journal)
  do not promise it; the stricter rule catches the missing directory fsync.
- A directory's listing is durable only for a directory itself durably named (from the
  root down); everything under the root at mount time is durable.
- Not modelled: syncfs/sync() (FUSE does not pass them on), modes and times changed after
  a name became durable, torn writes within one fsync.

How: every file and directory gets an id at creation (the backing inode number can be
reused). A file fsync copies the ranges written since into `store/<id>`; a directory fsync
records its listing (name -> id, kind, mode) in `store/durable.json`. Both are written as
they happen, outside the mount, so killing this process (the power going) loses nothing
of what was durable. `rebuild()` then empties the backing directory and recreates it from
the store.

Run `python powercutfs.py BACKING MOUNT STORE` (foreground); tests use `PowerCutFS`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DURABLE = "durable.json"


class Passthrough:
    """The fusepy operations: each passes through to the backing directory, and keeps the
    books on what is durable."""

    def __init__(self, backing: Path, store: Path) -> None:
        self.backing = backing
        self.store = store
        self.ids: dict[int, int] = {}  # backing inode -> id of the object living there
        self.next_id = 1
        self.dirty: dict[int, list[tuple[int, int]]] = {}  # id -> written ranges
        self.sync_fhs: set[int] = set()  # descriptors opened O_SYNC/O_DSYNC
        self.listings: dict[str, dict[str, list[Any]]] = {}  # dir id -> durable entries
        self.snapshot()

    # --- the books ---

    def _new_id(self, ino: int) -> int:
        self.ids[ino] = self.next_id
        self.next_id += 1
        return self.ids[ino]

    def _id(self, ino: int) -> int:
        return self.ids[ino] if ino in self.ids else self._new_id(ino)

    def snapshot(self) -> None:
        """What is there at mount time is durable."""
        shutil.rmtree(self.store, ignore_errors=True)
        self.store.mkdir(parents=True)
        self.root = self._id(os.lstat(self.backing).st_ino)
        for directory, _, files in os.walk(self.backing):
            self._record_listing(Path(directory))
            for name in files:
                path = Path(directory) / name
                if path.is_file() and not path.is_symlink():
                    shutil.copyfile(path, self.store / str(self._id(path.lstat().st_ino)))
        self._save()

    def _record_listing(self, directory: Path) -> None:
        entries: dict[str, list[Any]] = {}
        for entry in os.scandir(directory):
            st = entry.stat(follow_symlinks=False)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else \
                "link" if stat.S_ISLNK(st.st_mode) else "file"
            target = os.readlink(entry.path) if kind == "link" else None
            entries[entry.name] = [self._id(st.st_ino), kind, stat.S_IMODE(st.st_mode), target]
        self.listings[str(self._id(os.lstat(directory).st_ino))] = entries

    def _save(self) -> None:
        tmp = self.store / (DURABLE + ".tmp")
        tmp.write_text(json.dumps({"root": self.root, "listings": self.listings}))
        os.replace(tmp, self.store / DURABLE)

    def _mark(self, ino: int, start: int, end: int) -> None:
        if end > start:
            self.dirty.setdefault(self._id(ino), []).append((start, end))

    def _persist(self, fd: int) -> None:
        """fsync: the data written since the last one reaches the medium."""
        st = os.fstat(fd)
        ident = self._id(st.st_ino)
        ranges = self.dirty.pop(ident, [])
        out = os.open(self.store / str(ident), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for start, end in ranges:
                end = min(end, st.st_size)
                if end > start:
                    os.pwrite(out, os.pread(fd, end - start, start), start)
            os.ftruncate(out, st.st_size)
        finally:
            os.close(out)

    def _real(self, path: str) -> str:
        return str(self.backing) + path

    # --- fusepy operations ---

    def __call__(self, op: str, *args: Any) -> Any:
        """fusepy calls the object; what is not here (xattrs, locks...) is not supported."""
        method = getattr(self, op, None)
        if op in ("init", "destroy"):
            return None
        if method is None or op.startswith("_"):
            raise OSError(errno.ENOSYS, op)
        return method(*args)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._real(path))
        return {key: getattr(st, key) for key in (
            "st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
            "st_uid", "st_ino")}

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._real(path), mode):
            raise OSError(errno.EACCES, path)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._real(path))
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._real(path), times, follow_symlinks=False)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        os.mknod(self._real(path), mode, dev)
        self._new_id(os.lstat(self._real(path)).st_ino)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)
        self._new_id(os.lstat(self._real(path)).st_ino)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._real(target))
        self._new_id(os.lstat(self._real(target)).st_ino)

    def link(self, target: str, source: str) -> None:
        os.link(self._real(source), self._real(target))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    def open(self, path: str, flags: int) -> int:
        if flags & os.O_TRUNC:
            self.truncate(path, 0)
        # The kernel gives append writes their offset: pwrite must not append again.
        # Read-write even for a writer: an fsync reads back what it must keep.
        flags &= ~(os.O_APPEND | os.O_TRUNC | os.O_CREAT | os.O_ACCMODE)
        fd = os.open(self._real(path), flags | os.O_RDWR)
        if flags & (os.O_SYNC | os.O_DSYNC):
            self.sync_fhs.add(fd)
        return fd

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fd = os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        self._new_id(os.fstat(fd).st_ino)  # a new file, even on a reused inode number
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        written = os.pwrite(fh, data, offset)
        self._mark(os.fstat(fh).st_ino, offset, offset + written)
        if fh in self.sync_fhs:
            self._persist(fh)
        return written

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        before = os.lstat(self._real(path)).st_size
        if fh is None:
            os.truncate(self._real(path), length)
        else:
            os.ftruncate(fh, length)
        self._mark(os.lstat(self._real(path)).st_ino, min(before, length), max(before, length))

    def flush(self, path: str, fh: int) -> None:
        pass  # close() is not a sync

    def release(self, path: str, fh: int) -> None:
        self.sync_fhs.discard(fh)
        os.close(fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._persist(fh)  # the store is the medium: the host's own fsync adds nothing

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str, fh: int) -> None:
        pass

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        self._record_listing(Path(self._real(path)))
        self._save()


def rebuild(backing: Path, store: Path) -> None:
    """After the cut: the backing directory holds the durable state, nothing more."""
    durable = json.loads((store / DURABLE).read_text())
    listings: dict[str, dict[str, list[Any]]] = durable["listings"]
    for child in list(backing.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

    def fill(directory: Path, ident: int) -> None:
        for name, (child, kind, mode, target) in listings.get(str(ident), {}).items():
            path = directory / name
            if kind == "dir":
                path.mkdir()
                fill(path, child)
                path.chmod(mode)
            elif kind == "link":
                path.symlink_to(target)
            else:
                content = store / str(child)
                if content.exists():
                    shutil.copyfile(content, path)
                else:
                    path.touch()  # named, never synced: empty, as with delayed allocation
                path.chmod(mode)

    fill(backing, durable["root"])


def mounted(mount: Path) -> bool:
    target = str(mount.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class PowerCutFS:
    """The file system as a child process: `mount()`, `cut()` (kill it, unmount, keep
    only what was durable), `unmount()` (a clean stop: everything stays). Use it with
    `with`: the mount never outlives the test."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mount_point = root / "mnt"
        self.store = root / "durable-store"
        self.log = root / "powercutfs.log"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def mount(self, timeout: float = 10) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mount_point),
                 str(self.store)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not mounted(self.mount_point):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._force_unmount()
                raise RuntimeError(f"powercutfs did not mount:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def cut(self) -> None:
        """The power goes: the file system dies with whatever it had not made durable."""
        self._force_unmount()
        rebuild(self.backing, self.store)
        self.cuts += 1

    def unmount(self) -> None:
        if self.process is not None and self.process.poll() is None:
            subprocess.run(["fusermount", "-u", str(self.mount_point)], capture_output=True)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._force_unmount()

    def _force_unmount(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None
        if mounted(self.mount_point):
            subprocess.run(["fusermount", "-u", "-z", str(self.mount_point)],
                           capture_output=True)

    def __enter__(self) -> PowerCutFS:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def main() -> None:
    from fuse import FUSE  # fusepy, over libfuse2

    backing, mount, store = (Path(arg).resolve() for arg in sys.argv[1:4])
    # Single-threaded: the books need no lock. Kernel caches are write-through (no
    # writeback_cache), so every write() reaches us before it returns; big_writes lets
    # a large write() come in 128 KiB requests rather than 4 KiB pages, as a disk sees it.
    FUSE(Passthrough(backing, store), str(mount), foreground=True, nothreads=True,
         big_writes=True, max_write=131072)


if __name__ == "__main__":
    main()
