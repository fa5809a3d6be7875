"""Signed evidence: the device key, the manifest, and every way a verifier must say no."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from dashsos.evidence import signing
from dashsos.evidence.signing import DeviceKey, canonical_json, verify, write_manifest

FILES = {
    "clip.mp4": bytes(range(256)) * 40,
    "track.gpx": b"<gpx><trk><trkseg><trkpt lat='52.5' lon='13.4'/></trkseg></trk></gpx>\n",
    "track.vtt": b"WEBVTT\n\n00:00.000 --> 00:01.000\n52.5, 13.4\n",
    "incident.json": b'{"id": "20240501T101500Z-abc123", "vehicle_id": "car-7", '
                     b'"status": "saved"}\n',
}


def make_incident(root: Path, key: DeviceKey, name: str = "20240501T101500Z-abc123") -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    for file, data in FILES.items():
        (directory / file).write_bytes(data)
    write_manifest(directory, key, {"vehicle_id": "car-7"})
    return directory


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DeviceKey:
    return DeviceKey.load_or_create(tmp_path_factory.mktemp("keys") / "device.key")


@pytest.fixture
def incident(tmp_path: Path, key: DeviceKey) -> Path:
    return make_incident(tmp_path, key)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the device key ---------------------------------------------------------------------


def test_key_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "device.key"
    first = DeviceKey.load_or_create(path)
    assert mode(path) == 0o600
    assert mode(path.parent) & 0o077 == 0
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not path.with_name("device.key.tmp").exists()
    second = DeviceKey.load_or_create(path)
    assert second.fingerprint == first.fingerprint
    assert second.sign(b"x") == first.sign(b"x")  # Ed25519 is deterministic


def test_key_fingerprint_is_sha256_of_raw_public_key(key: DeviceKey) -> None:
    public = serialization.load_pem_public_key(key.public_pem().encode())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key.fingerprint == "ed25519:" + hashlib.sha256(raw).hexdigest()


def test_loose_permissions_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "device.key"
    original = DeviceKey.load_or_create(path)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="dashsos.evidence.signing"):
        again = DeviceKey.load_or_create(path)
    assert mode(path) == 0o600
    assert again.fingerprint == original.fingerprint
    assert any("644" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [
    b"",
    b"not a key at all",
    b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0IG1hdGVyaWFs\n-----END PRIVATE KEY-----\n",
])
def test_corrupt_key_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "device.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ValueError, match="device.key") as info:
        DeviceKey.load_or_create(path)
    assert "c2VjcmV0" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="not an Ed25519"):
        DeviceKey.load_or_create(path)


# --- the manifest -----------------------------------------------------------------------


def test_manifest_round_trip(incident: Path, key: DeviceKey) -> None:
    result = verify(incident)
    assert result.ok, result.problems
    assert result.problems == []
    assert result.fingerprint == key.fingerprint
    manifest = json.loads((incident / "manifest.json").read_bytes())
    assert result.manifest == manifest
    assert manifest["version"] == 1
    assert manifest["incident"] == incident.name
    assert manifest["created"].endswith("Z")
    assert manifest["key"] == {"algorithm": "ed25519", "fingerprint": key.fingerprint,
                               "public_key_pem": key.public_pem()}
    assert manifest["metadata"] == {"vehicle_id": "car-7"}
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for name, data in FILES.items()}
    # Canonical bytes: anyone can re-serialise and get the signed bytes back.
    assert (incident / "manifest.json").read_bytes() == canonical_json(manifest)
    signature = base64.b64decode((incident / "manifest.sig").read_bytes())
    assert len(signature) == 64
    assert (incident / "manifest.sig").read_bytes().endswith(b"\n")
    assert verify(incident, [key.fingerprint]).ok


def test_in_progress_files_and_upload_marker_are_not_evidence(tmp_path: Path,
                                                              key: DeviceKey) -> None:
    directory = tmp_path / "inc"
    directory.mkdir()
    (directory / "clip.mp4.partial").write_bytes(b"half a clip")
    (directory / "incident.json.tmp").write_bytes(b"{")
    (directory / "notes.txt").write_bytes(b"driver statement")
    (directory / "sub").mkdir()
    manifest = write_manifest(directory, key, {})
    assert sorted(manifest["files"]) == ["notes.txt"]
    (directory / "sub").rmdir()
    (directory / "upload.json").write_text('{"uploaded": true}')
    assert verify(directory).ok


def test_upload_marker_written_later_still_verifies(incident: Path) -> None:
    (incident / "upload.json").write_text(
        '{"uploaded": true, "at": "2024-05-01T10:20:00Z", "acknowledged_by": "desk 3"}\n')
    assert verify(incident).ok


def flip_clip_byte(d: Path) -> None:
    data = bytearray((d / "clip.mp4").read_bytes())
    data[1234] ^= 0x01
    (d / "clip.mp4").write_bytes(bytes(data))


def truncate_gpx(d: Path) -> None:
    with open(d / "track.gpx", "r+b") as f:
        f.truncate(10)


def edit_manifest(d: Path, change: Any) -> None:
    manifest = json.loads((d / "manifest.json").read_bytes())
    change(manifest)
    (d / "manifest.json").write_bytes(canonical_json(manifest))


def change_hash(m: dict[str, Any]) -> None:
    m["files"]["track.vtt"]["sha256"] = "0" * 64


def change_metadata(m: dict[str, Any]) -> None:
    m["metadata"]["vehicle_id"] = "car-8"


def resign_with_other_key(d: Path) -> None:
    other = DeviceKey.generate()
    (d / "manifest.sig").write_bytes(
        base64.b64encode(other.sign((d / "manifest.json").read_bytes())) + b"\n")


@pytest.mark.parametrize(("tamper", "expected"), [
    (flip_clip_byte, "clip.mp4: content differs from the manifest (sha256 "),
    (truncate_gpx, "track.gpx: size differs from the manifest (10 bytes"),
    (lambda d: (d / "track.vtt").unlink(), "track.vtt: listed in the manifest but missing"),
    (lambda d: (d / "extra.txt").write_text("x"), "extra.txt: not in the manifest"),
    (lambda d: (d / "extra").mkdir(), "extra: not in the manifest (not a regular file)"),
    (lambda d: edit_manifest(d, change_hash), "manifest.sig: signature does not match"),
    (lambda d: edit_manifest(d, change_metadata), "manifest.sig: signature does not match"),
    (resign_with_other_key, "manifest.sig: signature does not match manifest.json"),
    (lambda d: (d / "manifest.sig").unlink(), "manifest.sig: missing"),
    (lambda d: (d / "manifest.sig").write_bytes(b""), "manifest.sig: signature does not match"),
    (lambda d: (d / "manifest.sig").write_bytes(b"\xff\xfe junk"), "manifest.sig: not base64"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda d: (d / "manifest.json").write_bytes(b""), "manifest.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_bytes(os.urandom(300) + b"\xff"),
     "manifest.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_bytes(b"[1, 2]"), "manifest.json: not a JSON object"),
    (lambda d: (d / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000),
     "manifest.json: not valid JSON"),
    (lambda d: (d / "clip.mp4").unlink() or (d / "clip.mp4").symlink_to(d / "track.gpx"),
     "clip.mp4: not a regular file"),
    (lambda d: (d / "clip.mp4").write_bytes(b""), "clip.mp4: size differs"),
])
def test_tampering_is_detected(incident: Path, tamper: Any, expected: str) -> None:
    tamper(incident)
    result = verify(incident)
    assert not result.ok
    assert any(p.startswith(expected) for p in result.problems), result.problems


@pytest.mark.parametrize(("change", "expected"), [
    ({"version": 2}, "manifest.json: unsupported version 2"),
    ({"version": True}, "manifest.json: unsupported version True"),
    ({"key": None}, "manifest.json: no Ed25519 public key"),
    ({"key": {"algorithm": "rsa", "public_key_pem": ""}}, "manifest.json: no Ed25519"),
    ({"key": {"algorithm": "ed25519", "public_key_pem": "junk"}},
     "manifest.json: public key is not a valid Ed25519 key"),
    ({"key": {"algorithm": "ed25519", "public_key_pem": "\ud800"}},
     "manifest.json: public key is not a valid Ed25519 key"),
    ({"files": None}, "manifest.json: no file list"),
    ({"files": ["clip.mp4"]}, "manifest.json: no file list"),
    ({"files": {"clip.mp4": "abc"}}, "clip.mp4: the manifest's entry is malformed"),
    ({"files": {"clip.mp4": {"sha256": 5, "bytes": 1}}}, "clip.mp4: the manifest's entry"),
    ({"files": {"clip.mp4": {"sha256": "00", "bytes": "1"}}}, "clip.mp4: the manifest's entry"),
    ({"files": {"clip.mp4": {"sha256": "00", "bytes": True}}}, "clip.mp4: the manifest's entry"),
    ({"files": {"../clip.mp4": {"sha256": "00", "bytes": 1}}},
     "manifest.json: '../clip.mp4' is not a file name"),
    ({"files": {"..": {"sha256": "00", "bytes": 1}}}, "manifest.json: '..' is not a file name"),
    ({"files": {"manifest.sig": {"sha256": "00", "bytes": 1}}},
     "manifest.json: 'manifest.sig' is not a file name"),
])
def test_malformed_manifest_is_a_problem_not_a_crash(incident: Path, key: DeviceKey,
                                                     change: dict[str, Any],
                                                     expected: str) -> None:
    # Re-signed with the device's own key: the verifier must still catch what is wrong.
    edit_manifest(incident, lambda m: m.update(change))
    data = (incident / "manifest.json").read_bytes()
    (incident / "manifest.sig").write_bytes(base64.b64encode(key.sign(data)) + b"\n")
    result = verify(incident)
    assert not result.ok
    assert any(p.startswith(expected) for p in result.problems), result.problems


def test_signature_with_altered_padding_bits_is_reported(incident: Path) -> None:
    # 64 bytes encode as 86 characters plus "=="; the last character carries 4 unused bits,
    # so changing one of them decodes to the very same signature. Still not what was written.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = bytearray((incident / "manifest.sig").read_bytes())
    assert text[-3:] == b"==\n"
    text[-4] = alphabet[alphabet.index(text[-4]) ^ 1]
    assert base64.b64decode(bytes(text)) == base64.b64decode(
        (incident / "manifest.sig").read_bytes())
    (incident / "manifest.sig").write_bytes(bytes(text))
    result = verify(incident)
    assert result.problems == ["manifest.sig: not in canonical base64 form"]


def test_signature_with_crlf_still_verifies(incident: Path) -> None:
    text = (incident / "manifest.sig").read_bytes()
    (incident / "manifest.sig").write_bytes(text.replace(b"\n", b"\r\n"))
    assert verify(incident).ok


def test_fingerprint_that_does_not_match_the_key(incident: Path, key: DeviceKey) -> None:
    edit_manifest(incident, lambda m: m["key"].update(fingerprint="ed25519:" + "ab" * 32))
    data = (incident / "manifest.json").read_bytes()
    (incident / "manifest.sig").write_bytes(base64.b64encode(key.sign(data)) + b"\n")
    result = verify(incident)
    assert not result.ok
    assert result.problems == [f"manifest.json: key fingerprint 'ed25519:{'ab' * 32}' "
                               f"does not match its public key ({key.fingerprint})"]


def test_wholesale_re_signing_is_caught_only_by_pinning(incident: Path, key: DeviceKey) -> None:
    # Someone edits the clip and signs a fresh manifest with their own key: self-consistent,
    # so only a pinned fingerprint tells it apart.
    forger = DeviceKey.generate()
    flip_clip_byte(incident)
    write_manifest(incident, forger, {"vehicle_id": "car-7"})
    assert verify(incident).ok
    result = verify(incident, [key.fingerprint])
    assert not result.ok
    assert result.fingerprint == forger.fingerprint
    assert result.problems == [f"key {forger.fingerprint}: not among the trusted keys"]


def test_trusted_fingerprint_accepted_in_any_case_with_or_without_prefix(
        incident: Path, key: DeviceKey) -> None:
    bare = key.fingerprint.removeprefix("ed25519:")
    assert verify(incident, [bare.upper()]).ok
    assert verify(incident, ["ed25519:" + "0" * 64, key.fingerprint]).ok
    assert not verify(incident, []).ok


def test_not_a_directory(tmp_path: Path) -> None:
    result = verify(tmp_path / "nope")
    assert not result.ok and result.problems == [f"{tmp_path / 'nope'}: not a directory"]


# Every single-byte change anywhere in a signed incident must be caught.


class Pristine:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = {p.name: p.read_bytes() for p in directory.iterdir()}

    def __repr__(self) -> str:  # keeps Hypothesis' failure report readable
        return f"Pristine({self.directory})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, key: DeviceKey) -> Pristine:
    return Pristine(make_incident(tmp_path_factory.mktemp("flip"), key))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_byte_flip_is_detected(pristine: Pristine, data: st.DataObject) -> None:
    directory, originals = pristine.directory, pristine.files
    name = data.draw(st.sampled_from(sorted(originals)), label="file")
    original = originals[name]
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    changed = bytearray(original)
    changed[position] ^= mask
    (directory / name).write_bytes(bytes(changed))
    try:
        result = verify(directory)
        assert not result.ok
        # A changed manifest.json shows as "manifest.sig: signature does not match manifest.json".
        assert any(name in p for p in result.problems), result.problems
    finally:
        (directory / name).write_bytes(original)


# --- the command ------------------------------------------------------------------------


def test_main_ok(incident: Path, key: DeviceKey, capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main([str(incident)]) == 0
    out = capsys.readouterr().out
    assert out == f"OK: {incident} signed by {key.fingerprint}, 4 files\n"
    assert signing.main([str(incident), "--trust", key.fingerprint]) == 0


def test_main_problems(incident: Path, key: DeviceKey,
                       capsys: pytest.CaptureFixture[str]) -> None:
    flip_clip_byte(incident)
    (incident / "extra.txt").write_text("x")
    assert signing.main([str(incident)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith("clip.mp4: content differs from the manifest")
    assert lines[1] == "extra.txt: not in the manifest"
    assert lines[-1] == f"FAILED: {incident}: 2 problem(s)"


def test_main_untrusted(incident: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main([str(incident), "--trust", "ed25519:" + "1" * 64,
                         "--trust", "ed25519:" + "2" * 64]) == 1
    assert "not among the trusted keys" in capsys.readouterr().err


def test_main_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main([]) == 2
    assert signing.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert signing.main([str(tmp_path / "file")]) == 2
    assert signing.main([str(tmp_path), "--bogus"]) == 2
