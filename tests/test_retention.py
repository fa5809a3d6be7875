"""Retention: uploaded incidents go oldest first; evidence nobody else holds always stays."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dashsos.evidence import retention
from dashsos.evidence.retention import PruneReport, Quota, incident_bytes, prune

CLIP = 10_000
DAY1 = "20240501T080000Z-aaaaaa"
DAY2 = "20240502T080000Z-bbbbbb"
DAY3 = "20240503T080000Z-cccccc"
DAY4 = "20240504T080000Z-dddddd"


class Usage(NamedTuple):
    total: int
    used: int
    free: int


@pytest.fixture(autouse=True)
def roomy_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    # By default a filesystem so big that only max_bytes matters.
    monkeypatch.setattr(retention, "disk_usage", lambda _path: Usage(10**15, 0, 10**14))


def set_disk(monkeypatch: pytest.MonkeyPatch, total: int, free: int) -> list[Path]:
    asked: list[Path] = []

    def usage(path: Path) -> Usage:
        asked.append(Path(path))
        return Usage(total, total - free, free)

    monkeypatch.setattr(retention, "disk_usage", usage)
    return asked


def make(root: Path, incident_id: str, *, uploaded: bool = False, acknowledged: bool = False,
         mtime: float | None = None) -> int:
    """An incident whose files total exactly CLIP bytes; returns that size."""
    directory = root / incident_id
    directory.mkdir(parents=True)
    record = json.dumps({"id": incident_id, "vehicle_id": "car-7", "status": "saved",
                         "acknowledged": acknowledged}).encode()
    (directory / "incident.json").write_bytes(record)
    used = len(record)
    if uploaded:
        marker = json.dumps({"uploaded": True, "at": "2024-05-05T00:00:00Z",
                             "acknowledged_by": "desk 3"}).encode()
        (directory / "upload.json").write_bytes(marker)
        used += len(marker)
    (directory / "clip.mp4").write_bytes(bytes(CLIP - used))
    if mtime is not None:
        os.utime(directory, (mtime, mtime))
    assert incident_bytes(directory) == CLIP
    return CLIP


def remaining(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_uploaded_incidents_pruned_oldest_first(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # Created newest first, and with mtimes that disagree: the id's timestamp decides.
    for i, incident_id in enumerate([DAY4, DAY3, DAY2, DAY1]):
        make(tmp_path, incident_id, uploaded=True, mtime=1_000_000 + i)
    with caplog.at_level(logging.WARNING, logger="dashsos.evidence.retention"):
        report = prune(tmp_path, Quota(max_bytes=2 * CLIP + 500, max_percent=0,
                                       min_free_bytes=0))
    assert report.pruned == [DAY1, DAY2]
    assert remaining(tmp_path) == [DAY3, DAY4]
    assert report.used_bytes == 2 * CLIP
    assert report.limit_bytes == 2 * CLIP + 500
    assert report.kept_unsafe == []
    assert not report.over_quota
    messages = [r.getMessage() for r in caplog.records]
    assert any(DAY1 in m and str(CLIP) in m for m in messages)
    assert any(DAY2 in m and str(CLIP) in m for m in messages)


def test_within_quota_nothing_is_touched(tmp_path: Path) -> None:
    make(tmp_path, DAY1, uploaded=True)
    make(tmp_path, DAY2, uploaded=True)
    report = prune(tmp_path, Quota(max_bytes=2 * CLIP, max_percent=0, min_free_bytes=0))
    assert report == PruneReport(used_bytes=2 * CLIP, limit_bytes=2 * CLIP,
                                 free_bytes=10**14)
    assert remaining(tmp_path) == [DAY1, DAY2]


def test_not_uploaded_incidents_are_kept_and_reported(tmp_path: Path) -> None:
    make(tmp_path, DAY1)  # oldest, but the dispatcher never got it
    make(tmp_path, DAY2, uploaded=True)
    make(tmp_path, DAY3, uploaded=True)
    make(tmp_path, DAY4)
    report = prune(tmp_path, Quota(max_bytes=2 * CLIP, max_percent=0, min_free_bytes=0))
    assert report.pruned == [DAY2, DAY3]
    assert report.kept_unsafe == [DAY1]
    assert not report.over_quota
    assert remaining(tmp_path) == [DAY1, DAY4]


def test_over_quota_when_only_unsent_evidence_is_left(tmp_path: Path) -> None:
    make(tmp_path, DAY1)
    make(tmp_path, DAY2, uploaded=True)
    make(tmp_path, DAY3)
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0))
    assert report.pruned == [DAY2]
    assert report.kept_unsafe == [DAY1, DAY3]
    assert report.over_quota
    assert report.used_bytes == 2 * CLIP
    assert remaining(tmp_path) == [DAY1, DAY3]
    assert report.as_dict() == {
        "used_bytes": 2 * CLIP, "limit_bytes": CLIP, "free_bytes": 10**14 + CLIP,
        "pruned": [DAY2], "kept_unsafe": [DAY1, DAY3], "over_quota": True}
    json.dumps(report.as_dict())


@pytest.mark.parametrize("marker", [
    b'{"uploaded": false}',
    b'{"uploaded": "yes"}',
    b'{"uploaded": 1}',
    b"[true]",
    b"",
    b"\xff\xfe garbage",
])
def test_anything_but_a_clear_yes_keeps_the_incident(tmp_path: Path, marker: bytes) -> None:
    make(tmp_path, DAY1)
    (tmp_path / DAY1 / "upload.json").write_bytes(marker)
    report = prune(tmp_path, Quota(max_bytes=1, max_percent=0, min_free_bytes=0))
    assert report.pruned == [] and report.kept_unsafe == [DAY1] and report.over_quota
    assert (tmp_path / DAY1).is_dir()


def test_acknowledged_counts_as_delivered(tmp_path: Path) -> None:
    make(tmp_path, DAY1, acknowledged=True)
    make(tmp_path, DAY2)
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0))
    assert report.pruned == [DAY1]
    assert remaining(tmp_path) == [DAY2]


def test_open_incident_is_never_deleted(tmp_path: Path) -> None:
    make(tmp_path, DAY1, uploaded=True)  # uploaded so far, but still recording
    make(tmp_path, DAY2, uploaded=True)
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0),
                   open_ids={DAY1})
    assert report.pruned == [DAY2]
    assert report.kept_unsafe == [DAY1]
    assert not report.over_quota
    assert remaining(tmp_path) == [DAY1]


def test_min_free_bytes_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for incident_id in (DAY1, DAY2, DAY3, DAY4):
        make(tmp_path, incident_id, uploaded=True)
    asked = set_disk(monkeypatch, total=10**9, free=5_000)
    # No byte or percent limit: only free space drives pruning. 5 000 free, 25 000 wanted.
    report = prune(tmp_path, Quota(max_bytes=0, max_percent=0, min_free_bytes=25_000))
    assert report.pruned == [DAY1, DAY2]
    assert report.free_bytes == 25_000
    assert report.limit_bytes == 0
    assert not report.over_quota
    assert remaining(tmp_path) == [DAY3, DAY4]
    assert asked and all(p == tmp_path for p in asked)


def test_min_free_bytes_unreachable_without_deleting_evidence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, DAY1)
    set_disk(monkeypatch, total=10**9, free=100)
    report = prune(tmp_path, Quota(max_bytes=0, max_percent=0, min_free_bytes=10**6))
    assert report.pruned == [] and report.kept_unsafe == [DAY1] and report.over_quota


def test_percent_limit_from_filesystem_size(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for incident_id in (DAY1, DAY2, DAY3, DAY4):
        make(tmp_path, incident_id, uploaded=True)
    set_disk(monkeypatch, total=1_000_000, free=900_000)
    report = prune(tmp_path, Quota(max_bytes=0, max_percent=2.5, min_free_bytes=0))
    assert report.limit_bytes == 25_000
    assert report.pruned == [DAY1, DAY2]
    # Both limits set: the smaller wins.
    report = prune(tmp_path, Quota(max_bytes=10**9, max_percent=1.0, min_free_bytes=0))
    assert report.limit_bytes == 10_000
    assert report.pruned == [DAY3]
    assert remaining(tmp_path) == [DAY4]


def test_leftover_deleting_dirs_are_finished(tmp_path: Path) -> None:
    make(tmp_path, DAY2)
    leftover = tmp_path / f".{DAY1}.deleting"
    (leftover / "deep").mkdir(parents=True)
    (leftover / "clip.mp4").write_bytes(bytes(5000))
    (leftover / "deep" / "x").write_bytes(b"x")
    (tmp_path / ".not-ours").mkdir()  # hidden, but not a deletion: left alone
    report = prune(tmp_path, Quota(max_bytes=0, max_percent=0, min_free_bytes=0))
    assert not leftover.exists()
    assert remaining(tmp_path) == [".not-ours", DAY2]
    assert report.used_bytes == CLIP and report.pruned == []


def test_power_cut_mid_deletion_is_finished_next_time(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path, DAY1, uploaded=True)
    make(tmp_path, DAY2, uploaded=True)
    real_rmtree = shutil.rmtree

    def cut(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(shutil, "rmtree", cut)
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0))
    # Renamed away first: what is left never looks like an incident.
    assert report.pruned == [DAY1]
    assert remaining(tmp_path) == [f".{DAY1}.deleting", DAY2]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0))
    assert report.pruned == []
    assert remaining(tmp_path) == [DAY2]


def test_ids_without_a_timestamp_are_ordered_by_mtime(tmp_path: Path) -> None:
    make(tmp_path, "manual-b", uploaded=True, mtime=2_000_000_000)
    make(tmp_path, "manual-a", uploaded=True, mtime=1_000_000_000)  # 2001
    make(tmp_path, DAY1, uploaded=True, mtime=1_900_000_000)  # id says 2024
    report = prune(tmp_path, Quota(max_bytes=CLIP, max_percent=0, min_free_bytes=0),
                   now=2_100_000_000)
    assert report.pruned == ["manual-a", DAY1]
    assert remaining(tmp_path) == ["manual-b"]


def test_stray_files_are_not_incidents(tmp_path: Path) -> None:
    make(tmp_path, DAY1, uploaded=True)
    (tmp_path / "README").write_text("not an incident")
    (tmp_path / "link").symlink_to(tmp_path / DAY1)
    report = prune(tmp_path, Quota(max_bytes=1, max_percent=0, min_free_bytes=0))
    assert report.pruned == [DAY1]
    assert remaining(tmp_path) == ["README", "link"]


def test_missing_incidents_dir(tmp_path: Path) -> None:
    report = prune(tmp_path / "incidents", Quota(max_bytes=5, max_percent=0,
                                                 min_free_bytes=0))
    assert report == PruneReport(used_bytes=0, limit_bytes=5, free_bytes=10**14)
    assert not (tmp_path / "incidents").exists()


def test_incident_bytes_counts_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(bytes(100))
    (tmp_path / "sub" / "b").write_bytes(bytes(23))
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert incident_bytes(tmp_path) == 123
    assert incident_bytes(tmp_path / "gone") == 0


def test_space_for_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_disk(monkeypatch, total=10**9, free=10_000)
    quota = Quota(max_bytes=1, max_percent=0, min_free_bytes=4_000)
    assert retention.space_for_recording(tmp_path, quota, 6_000)
    assert not retention.space_for_recording(tmp_path, quota, 6_001)
    # Before the first incident the directory may not exist yet.
    assert retention.space_for_recording(tmp_path / "incidents", quota, 0)
