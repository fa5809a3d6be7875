"""Evidence anyone can check: a signed manifest of every file's SHA-256.

The car holds an Ed25519 key. manifest.json lists each file's hash and size and embeds the
public key; manifest.sig signs the exact bytes of manifest.json. A desk pins the key's
fingerprint so a manifest re-signed by some other key is rejected.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dashsos.evidence.files import fsync_dir, make_dirs, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
UPLOAD_MARKER = "upload.json"
MANIFEST_FILES = ("clip.mp4", "track.gpx", "track.vtt", "incident.json")
# Written after the manifest or still being written: never part of the evidence.
NOT_EVIDENCE = frozenset({MANIFEST, SIGNATURE, UPLOAD_MARKER})
IN_PROGRESS_SUFFIXES = (".partial", ".tmp")
CHUNK = 1 << 20


def fingerprint_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Accept a pasted fingerprint with or without its prefix, in either case."""
    text = text.strip().lower()
    return text if text.startswith("ed25519:") else "ed25519:" + text


class DeviceKey:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        if not path.exists():
            return cls._create(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("device key %s was readable by others (mode %o); tightened to 600",
                        path, mode)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # `from None`: the parser's message must not carry key material into a log.
            raise ValueError(f"{path}: not a readable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> DeviceKey:
        make_dirs(path.parent, 0o700)
        device = cls.generate()
        pem = device._key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        # Write under a temporary name, then rename: a power cut leaves no half-written key.
        # O_EXCL with 0600 means the secret is never readable by others, not even briefly.
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        log.warning("created device key %s (%s)", path, device.fingerprint)
        return device

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_key)

    def public_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo
                                            ).decode()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def canonical_json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
            + "\n").encode()


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 and size, read in chunks: a clip can be larger than the Pi's free RAM."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def is_evidence_name(name: str) -> bool:
    return name not in NOT_EVIDENCE and not name.endswith(IN_PROGRESS_SUFFIXES)


def evidence_files(directory: Path) -> list[str]:
    """Regular files that belong in the manifest (symlinks and subdirectories do not)."""
    names = []
    for entry in os.scandir(directory):
        if is_evidence_name(entry.name) and entry.is_file(follow_symlinks=False):
            names.append(entry.name)
    return sorted(names)


def write_manifest(directory: Path, key: DeviceKey, metadata: dict[str, Any]) -> dict[str, Any]:
    names = evidence_files(directory)
    missing = [name for name in MANIFEST_FILES if name not in names]
    if missing:
        log.warning("incident %s: signing without %s", directory.name, ", ".join(missing))
    files: dict[str, Any] = {}
    for name in names:
        sha256, size = hash_file(directory / name)
        files[name] = {"sha256": sha256, "bytes": size}
    manifest: dict[str, Any] = {
        "version": 1,
        "incident": directory.name,
        "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "key": {"algorithm": "ed25519", "fingerprint": key.fingerprint,
                "public_key_pem": key.public_pem()},
        "metadata": metadata,
        "files": files,
    }
    data = canonical_json(manifest)
    write_atomic(directory / MANIFEST, data)
    write_atomic(directory / SIGNATURE, base64.b64encode(key.sign(data)) + b"\n")
    return manifest


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    # Parsed manifest; only to be believed when ok is True.
    manifest: dict[str, Any] | None = None


def verify(directory: Path, trusted_fingerprints: Iterable[str] | None = None) -> VerifyResult:
    result = VerifyResult(ok=False)
    problems = result.problems
    if not directory.is_dir():
        problems.append(f"{directory}: not a directory")
        return result
    try:
        data = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        problems.append(f"{MANIFEST}: missing")
        return result
    except OSError as exc:
        problems.append(f"{MANIFEST}: cannot be read ({exc.strerror or exc})")
        return result
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        problems.append(f"{MANIFEST}: not valid JSON")
        return result
    if not isinstance(manifest, dict):
        problems.append(f"{MANIFEST}: not a JSON object")
        return result
    result.manifest = manifest
    version = manifest.get("version")
    if type(version) is not int or version != 1:  # not `true`, which equals 1
        problems.append(f"{MANIFEST}: unsupported version {version!r}")

    public_key = _check_key(manifest.get("key"), problems)
    if public_key is not None:
        result.fingerprint = fingerprint_of(public_key)
        _check_signature(directory, data, public_key, problems)
        if trusted_fingerprints is not None:
            trusted = {normalise_fingerprint(f) for f in trusted_fingerprints}
            if result.fingerprint not in trusted:
                problems.append(f"key {result.fingerprint}: not among the trusted keys")

    listed = _check_files(directory, manifest.get("files"), problems)
    if listed is not None:
        _check_extras(directory, listed, problems)
    result.ok = not problems
    return result


def _check_extras(directory: Path, listed: set[str], problems: list[str]) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        problems.append(f"{directory}: cannot be listed ({exc.strerror or exc})")
        return
    for entry in entries:
        if entry.name in listed or not is_evidence_name(entry.name):
            continue
        kind = "" if entry.is_file(follow_symlinks=False) else " (not a regular file)"
        problems.append(f"{entry.name}: not in the manifest{kind}")


def _check_key(key: Any, problems: list[str]) -> Ed25519PublicKey | None:
    if not isinstance(key, dict) or key.get("algorithm") != "ed25519" \
            or not isinstance(key.get("public_key_pem"), str):
        problems.append(f"{MANIFEST}: no Ed25519 public key")
        return None
    try:
        public_key = serialization.load_pem_public_key(key["public_key_pem"].encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):  # UnicodeError is a ValueError
        public_key = None
    if not isinstance(public_key, Ed25519PublicKey):
        problems.append(f"{MANIFEST}: public key is not a valid Ed25519 key")
        return None
    actual = fingerprint_of(public_key)
    if key.get("fingerprint") != actual:
        problems.append(f"{MANIFEST}: key fingerprint {key.get('fingerprint')!r} "
                        f"does not match its public key ({actual})")
    return public_key


def _check_signature(directory: Path, data: bytes, public_key: Ed25519PublicKey,
                     problems: list[str]) -> None:
    try:
        text = (directory / SIGNATURE).read_bytes()
    except FileNotFoundError:
        problems.append(f"{SIGNATURE}: missing")
        return
    except OSError as exc:
        problems.append(f"{SIGNATURE}: cannot be read ({exc.strerror or exc})")
        return
    body = text.removesuffix(b"\r\n") if text.endswith(b"\r\n") else text.removesuffix(b"\n")
    try:
        signature = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        problems.append(f"{SIGNATURE}: not base64 text")
        return
    if base64.b64encode(signature) != body:
        # Base64 has slack (padding bits); a file that is not exactly what was written is
        # reported, even if it decodes to the same signature.
        problems.append(f"{SIGNATURE}: not in canonical base64 form")
        return
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        problems.append(f"{SIGNATURE}: signature does not match {MANIFEST}")


def _check_files(directory: Path, files: Any, problems: list[str]) -> set[str] | None:
    """Check each listed file; returns the listed names, or None if the list is unusable."""
    if not isinstance(files, dict):
        problems.append(f"{MANIFEST}: no file list")
        return None
    for name, entry in sorted(files.items()):
        if not is_evidence_name(name) or name in (".", "..") or "/" in name or "\0" in name:
            # Signed or not, a manifest never sends the verifier outside the directory.
            problems.append(f"{MANIFEST}: {name!r} is not a file name an incident can hold")
            continue
        expected_hash = entry.get("sha256") if isinstance(entry, dict) else None
        expected_size = entry.get("bytes") if isinstance(entry, dict) else None
        if not isinstance(expected_hash, str) or type(expected_size) is not int:
            problems.append(f"{name}: the manifest's entry is malformed")
            continue
        _check_file(directory / name, expected_hash, expected_size, problems)
    return set(files)


def _check_file(path: Path, expected_hash: str, expected_size: int,
                problems: list[str]) -> None:
    name = path.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        problems.append(f"{name}: listed in the manifest but missing")
        return
    except OSError as exc:
        problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
        return
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"{name}: not a regular file")
        return
    if st.st_size != expected_size:
        problems.append(f"{name}: size differs from the manifest "
                        f"({st.st_size} bytes, manifest says {expected_size})")
        return
    try:
        actual, _ = hash_file(path)
    except OSError as exc:
        problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
        return
    if actual != expected_hash.lower():
        problems.append(f"{name}: content differs from the manifest "
                        f"(sha256 {actual}, manifest says {expected_hash})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dashsos verify",
                                     description="Check an incident's signed manifest.")
    parser.add_argument("directory", type=Path, help="the incident directory")
    parser.add_argument("--trust", action="append", metavar="FINGERPRINT",
                        help="accept only this key (repeat for several)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # callers want the exit code, not an exit
        return exc.code if isinstance(exc.code, int) else 2
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"dashsos verify: {directory}: not a directory", file=sys.stderr)
        return 2
    result = verify(directory, args.trust)
    if result.ok:
        count = len(result.manifest["files"]) if result.manifest else 0
        print(f"OK: {directory} signed by {result.fingerprint}, {count} files")
        return 0
    for problem in result.problems:
        print(problem, file=sys.stderr)
    print(f"FAILED: {directory}: {len(result.problems)} problem(s)", file=sys.stderr)
    return 1
